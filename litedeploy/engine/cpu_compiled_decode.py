"""Decode steps on CPU compiled whole with torch.compile: the CPU counterpart of CUDA graphs.

At small batches on a CPU, eager PyTorch spends more time dispatching the ~60 small ops of each
layer (norms, RoPE, casts, the paged-attention gather and masking) than in the weight-only
quantized matmuls themselves. Compiling the whole step (embedding, every layer, LM head) lets
Inductor fuse each run of small ops into one C++ loop; the matmuls stay PyTorch's kernels.

Two graphs serve every plain decode step: batch 1, and any batch of 2 or more (a dynamic batch
dimension: no ladder, no padding rows, which on a CPU would cost their full compute). Where the
quantized linears keep bf16 copies for many rows (layers/cpu_batched_weights.py), the batched
graph is two: 2..7 rows (packed kernels) and 8 or more (the copies), each a dynamic range. The block
table's width is dynamic too (at least 2 columns, so width 1 needs no graph of its own): each
row reads its own blocks, padded to the batch's longest, and masks the slots past its context,
as kernels/reference.py's decode rows do. Prefill, mixed steps (their decode rows too), bursts
and batches whose padding would more than double the blocks read stay on the eager path.

The graphs compile in a background thread over a scratch two-block cache, while the eager path
serves; the engine thread switches over at the first step after `status` turns "on". A failed
compile (no C++ compiler, ...) leaves the engine eager with one warning.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from litedeploy.engine.cpu_compile_cache import point_inductor_at_cache
from litedeploy.engine.input_builder import HostStepInputs
from litedeploy.engine.kv_cache import KVCache
from litedeploy.layers.cpu_batched_weights import BATCHED_MIN_ROWS, has_bf16_copies
from litedeploy.models.decoder import DecoderForCausalLM

logger = logging.getLogger(__name__)

MIN_TABLE_COLUMNS = 2  # a dynamic dimension of size 1 would be specialized into a third graph
# the warm-up's dynamic sizes must differ from each other: the tracer gives equal sizes one
# symbol ("duck sizing"), and its graphs would then only take steps where they are equal
WARM_UP_CACHE_BLOCKS, WARM_UP_COLUMNS, WARM_UP_BATCH = 5, 3, 2
WARM_UP_MANY_ROWS = BATCHED_MIN_ROWS + 1  # the many-rows graph's warm-up batch (not 3 or 5)
MAX_ROWS = 1 << 16  # the many-rows range's upper end (a dynamic range needs one)
# The compile starts once the engine has run no step for this long. Tracing and code generation
# hold the GIL most of the time, and every op of an eager step waits for it: a reply that runs
# beside the compile took 20 s to its first token instead of 8 (`litedeploy chat` fed at start).
QUIET_BEFORE_COMPILE_S = 2.0


class _WholeBlocksBackend:
    """Paged attention of one decode token per row, written with static-shaped ops only (no host
    reads of the context lengths), so the compiler can trace it: store the new K/V, gather each
    row's blocks, mask the slots at or past the row's context length."""

    def __init__(self, kv_cache: KVCache, slots: torch.Tensor, tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float):
        self.kv_cache, self.slots, self.tables = kv_cache, slots, tables
        self.context_lens, self.scale = context_lens, scale

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        k_cache, v_cache = self.kv_cache.k_caches[layer_idx], self.kv_cache.v_caches[layer_idx]
        batch, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slots, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slots, v.to(v_cache.dtype))
        # index by the 2-D table and name every size: a flat gather viewed as (batch, -1) made
        # Inductor divide by the symbolic sizes for every key it loaded (2x the attention time)
        rows, columns = self.tables.shape
        length = columns * k_cache.shape[1]
        keys = k_cache[self.tables].view(rows, length, num_kv_heads, head_dim)
        values = v_cache[self.tables].view(rows, length, num_kv_heads, head_dim)
        valid = (torch.arange(length, device=q.device)[None, :]
                 < self.context_lens[:, None])  # [B, L]
        # slots past the context hold whatever the cache had, possibly NaN bits: zero them, or
        # 0 * NaN would leak through the probabilities
        values = torch.where(valid[:, :, None, None], values, 0).to(q.dtype)
        group = num_heads // num_kv_heads
        grouped_q = q.view(batch, num_kv_heads, group, 1, head_dim)
        # broadcast-and-sum instead of bmm: Inductor fuses these into its own loops
        keys = keys.to(q.dtype).permute(0, 2, 1, 3)[:, :, None]  # [B, KVH, 1, L, D]
        scores = (grouped_q * keys).sum(-1) * self.scale  # [B, KVH, G, L]
        scores = scores.float().masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype)
        out = (probs[..., None] * values.permute(0, 2, 1, 3)[:, :, None]).sum(3)  # [B, KVH, G, D]
        return out.reshape(batch, num_heads, head_dim)


def _decode_step(model: DecoderForCausalLM, kv_cache: KVCache, input_ids: torch.Tensor,
                 positions: torch.Tensor, rope_lens: torch.Tensor | None, slots: torch.Tensor,
                 tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    backend = _WholeBlocksBackend(kv_cache, slots, tables, context_lens, scale)
    hidden = model(input_ids, positions, backend, rope_lens)
    return model.compute_logits(hidden)


# Before each call the compiled step checks ~3000 guards on its ~370 input tensors (weights, KV
# caches): ~0.9 ms of a ~9.5 ms step. Guarding whole modules by their dict tags (unchanged dict:
# skip the subtree) halves that; the weights and caches are never reassigned after loading.
_CHEAP_GUARDS = torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True,
                                           max_saved_pointers_for_recursive_dict_tags_check=4096)


def _table_columns(block_size: int, context_lens: list[int]) -> list[int]:
    return [-(-length // block_size) for length in context_lens]


class CompiledCPUDecode:
    """Plugs into ModelRunner where the CUDA graphs go (`can_run(host)` / `run(host)`).

    `status`: "compiling" (the eager path serves), "on", or "off" (`off_reason` says why)."""

    def __init__(self, model: DecoderForCausalLM, kv_cache: KVCache, scale: float,
                 eager_run: Callable[[HostStepInputs], torch.Tensor], max_batch_size: int = 2,
                 dynamic_batch: bool = True):
        if kv_cache.quant_bits:
            raise ValueError("the compiled CPU decode needs a float KV cache (--quant-policy 0)")
        if model.config.tp_size != 1:
            raise ValueError("the compiled CPU decode runs with --tp 1 only")
        self.model, self.kv_cache, self.scale = model, kv_cache, scale
        self.eager_run = eager_run  # where a step goes if the compiled one fails at run time
        self.block_size = kv_cache.shape.block_size
        self.dynamic_rope = model.rotary.is_dynamic
        # False: a graph for each of `static_batch_sizes` instead (side-by-side benchmarks)
        self.dynamic_batch = dynamic_batch
        self.max_batch_size = max_batch_size  # 1 (`litedeploy chat`): no batched graph to build
        self.static_batch_sizes: list[int] = []
        # bf16 copies for many rows: the batched graph splits at BATCHED_MIN_ROWS rows
        self.split_rows = has_bf16_copies(model) and max_batch_size >= BATCHED_MIN_ROWS
        self.status, self.off_reason = "compiling", ""
        self.compile_seconds: float | None = None
        self.done = threading.Event()  # set when status leaves "compiling"
        self.num_runs = 0
        self.last_step_at = time.monotonic()  # can_run() sees every step of the runner
        self.sizes: list[int] = []  # no CUDA-graph ladder: one graph for batch 1, one for 2+
        self._step = torch.compile(_decode_step, fullgraph=True)

    # ---- compiling -----------------------------------------------------------------------
    def start(self, background: bool = True) -> CompiledCPUDecode:
        """Compile, in a daemon thread (never joined: exiting mid-compile abandons it)."""
        if not background:
            self._compile()
            return self
        threading.Thread(target=self._compile_when_quiet, name="litedeploy-cpu-compile",
                         daemon=True).start()
        return self

    def _compile_when_quiet(self) -> None:
        while time.monotonic() - self.last_step_at < QUIET_BEFORE_COMPILE_S:
            time.sleep(0.1)
        self._compile()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the compile has finished or failed; returns the status."""
        self.done.wait(timeout)
        return self.status

    def _compile(self) -> None:
        start = time.perf_counter()
        try:
            point_inductor_at_cache()
            self._warm_up()
        except Exception as exc:  # noqa: BLE001 (no compiler, an Inductor bug...: serve eagerly)
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            self.off_reason = f"compile failed: {type(exc).__name__}: {first_line}"
            logger.warning("compiled CPU decode off (%s); decoding eagerly", self.off_reason)
            self.status = "off"
        else:
            self.compile_seconds = time.perf_counter() - start
            logger.info("compiled CPU decode on: compiled in %.1f s", self.compile_seconds)
            self.status = "on"  # one attribute write: the engine thread switches at its next step
        finally:
            self.done.set()

    def _warm_up(self) -> None:
        """Both graphs (batch 1, batch 2+) from throwaway steps over a small scratch cache: the
        live cache is never written (dim 0 of the caches is dynamic, so the graphs fit it)."""
        shape = dataclasses.replace(self.kv_cache.shape, num_blocks=WARM_UP_CACHE_BLOCKS)
        # an inference tensor or not, as the live cache is: the guards check its dispatch keys
        with torch.inference_mode(self.kv_cache.k_caches[0].is_inference()):
            scratch = KVCache(shape, torch.device("cpu"), quiet=True)
            for cache in (*scratch.k_caches, *scratch.v_caches):
                cache.zero_()
                torch._dynamo.mark_dynamic(cache, 0)  # the live cache's size follows free memory
        batched = [WARM_UP_BATCH] if self.max_batch_size > 1 else []
        if self.split_rows:
            batched.append(WARM_UP_MANY_ROWS)
        batches = [1, *(self.static_batch_sizes if not self.dynamic_batch else batched)]
        # no worker processes: on a small CPU the eager path keeps a core while this compiles
        with torch._inductor.config.patch(compile_threads=1), torch.inference_mode():
            for batch in batches:
                ids = np.zeros(batch, dtype=np.int64)
                context_len = (WARM_UP_COLUMNS - 1) * self.block_size + 1
                self._call(scratch, ids, ids + context_len - 1, ids + context_len,
                           np.arange(batch), [list(range(WARM_UP_COLUMNS))] * batch,
                           [context_len] * batch)

    # ---- serving -------------------------------------------------------------------------
    def can_run(self, host: HostStepInputs, num_steps: int = 1) -> bool:
        """Plain decode steps (every row one token, every row samples), once compiled; not when
        padding every row to the longest context would more than double the blocks read."""
        self.last_step_at = time.monotonic()
        if self.status != "on" or num_steps != 1 or not host.is_uniform_decode:
            return False
        if host.batch_size == 1:
            return True
        if host.batch_size > self.max_batch_size:  # no graph for it (compiled for batch 1 only)
            return False
        if not self.dynamic_batch and host.batch_size not in self.static_batch_sizes:
            return False
        columns = _table_columns(self.block_size, host.context_lens)
        return host.batch_size * max(columns) <= 2 * sum(columns) + host.batch_size

    @torch.inference_mode()
    def run(self, host: HostStepInputs) -> torch.Tensor:
        """Logits [batch, vocab] float32 of the decode step `host`."""
        try:
            # no recompiles here: a new graph would stall the serving thread for seconds
            with torch.compiler.set_stance("fail_on_recompile"):
                logits = self._call(self.kv_cache, host.input_ids, host.positions, host.rope_lens,
                                    host.slot_mapping, host.block_tables, host.context_lens)
        except Exception as exc:  # noqa: BLE001 (whatever broke, the eager path still serves)
            self.status = "off"
            self.off_reason = f"failed at run time: {type(exc).__name__}"
            logger.warning("compiled CPU decode off (%s: %s); decoding eagerly",
                           self.off_reason, (str(exc).strip().splitlines() or [""])[0][:200])
            return self.eager_run(host)  # it rewrites the same K/V slots: nothing half-done
        self.num_runs += 1
        return logits

    @_CHEAP_GUARDS
    def _call(self, kv_cache: KVCache, input_ids: np.ndarray, positions: np.ndarray,
              rope_lens: np.ndarray, slots: np.ndarray, block_tables: list[list[int]],
              context_lens: list[int]) -> torch.Tensor:
        batch = len(context_lens)
        columns = _table_columns(self.block_size, context_lens)
        tables = np.zeros((batch, max(MIN_TABLE_COLUMNS, *columns)), dtype=np.int64)
        for row, (table, num_columns) in enumerate(zip(block_tables, columns)):
            tables[row, :num_columns] = table[:num_columns]  # padding: block 0, masked
        inputs = [torch.from_numpy(np.asarray(a, dtype=np.int64))
                  for a in (input_ids, positions, rope_lens, slots, context_lens)]
        table_tensor = torch.from_numpy(tables)
        torch._dynamo.mark_dynamic(table_tensor, 1)  # one graph for every context length
        if batch > 1 and self.dynamic_batch:  # batch 1 keeps its own graph
            # split: the range decides, statically, which weights each graph uses
            few = batch < BATCHED_MIN_ROWS
            rows = ({} if not self.split_rows else {"min": 2, "max": BATCHED_MIN_ROWS - 1}
                    if few else {"min": BATCHED_MIN_ROWS, "max": MAX_ROWS})
            for tensor in (*inputs, table_tensor):
                torch._dynamo.mark_dynamic(tensor, 0, **rows)
        ids, pos, lens, slot_tensor, context_tensor = inputs
        return self._step(self.model, kv_cache, ids, pos, lens if self.dynamic_rope else None,
                          slot_tensor, table_tensor, context_tensor, self.scale)

    def status_text(self) -> str:
        if self.status == "on":
            return f"compiled (in {self.compile_seconds:.1f} s)"
        if self.status == "compiling":
            return "eager while compiling in the background"
        return f"eager ({self.off_reason})"
