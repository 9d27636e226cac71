"""Runs one scheduled batch through the model over the paged cache and returns the logits to sample.

Uniform decode batches replay a captured CUDA graph (see cuda_graph.py), or on CPU run a
torch.compile'd step once its background compile is done (cpu_compiled_decode.py); everything
else, and every batch with `eager_mode`, runs eagerly. Nothing here waits for the GPU: the only
host sync of a step is the sampler's `.tolist()`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from litedeploy import kernels
from litedeploy.engine.cpu_compile_cache import off_reason
from litedeploy.engine.cuda_graph import DecodeGraphs
from litedeploy.engine.forward_context import PagedKVBackend, StepInputs
from litedeploy.engine.input_builder import HostStepInputs, build_host_inputs, to_device
from litedeploy.engine.kv_cache import CacheShape, KVCache
from litedeploy.engine.multi_step import advance_decode_inputs, greedy_next
from litedeploy.engine.scheduler import SchedulerOutput
from litedeploy.models.decoder import DecoderForCausalLM

if TYPE_CHECKING:
    from litedeploy.engine.cpu_compiled_decode import CompiledCPUDecode

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, kv_cache: KVCache, device: torch.device,
                 max_batch_size: int = 1, max_context_len: int = 1, eager_mode: bool = True):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.shape.block_size
        self.scale = model.config.head_dim**-0.5
        self.graphs: DecodeGraphs | CompiledCPUDecode | None = None
        if device.type == "cuda":  # one-row linears (batch-1 decode): Triton GEMV, not cuBLAS
            kernels.use_dispatched_linears(model)
        if device.type == "cuda" and not eager_mode:
            self.graphs = DecodeGraphs(self.forward, max_batch_size, max_context_len,
                                       self.block_size, device)
            self.graphs.capture()
        # CPU: decode steps compiled in the background (cpu_compiled_decode.py), or why not
        self.cpu_compile_off_reason = off_reason(device, eager_mode, kv_cache.quant_bits,
                                                 model.config.tp_size)
        if self.cpu_compile_off_reason is None:
            from litedeploy.engine.cpu_compiled_decode import CompiledCPUDecode  # imports dynamo

            self.graphs = CompiledCPUDecode(model, kv_cache, self.scale, self._run_eager,
                                            max_batch_size).start()

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> torch.Tensor:
        """Logits [num_sampling_rows, vocab] float32, in batch order of the sequences that sample."""
        return self.run_host(build_host_inputs(batch, self.block_size))

    @torch.inference_mode()
    def run_host(self, host: HostStepInputs) -> torch.Tensor:
        """The same, from inputs already built on the host (TP ranks > 0 receive these)."""
        graphs = self.graphs  # read once: a CPU compile may finish between two steps
        if graphs is not None and graphs.can_run(host):
            return graphs.run(host)
        return self._run_eager(host)

    def _run_eager(self, host: HostStepInputs) -> torch.Tensor:
        return self.forward(to_device(host, self.device))

    @torch.inference_mode()
    def run_burst(self, host: HostStepInputs, num_steps: int) -> list[list[int]]:
        """`num_steps` greedy decode steps from one uniform decode batch, one host sync in all:
        token ids [num_steps][batch]. The block tables must already cover every step."""
        return list(self.start_burst(host, num_steps))

    @torch.inference_mode()
    def start_burst(self, host: HostStepInputs, num_steps: int) -> Iterable[list[int]]:
        """run_burst without waiting: the token ids of each step, yielded once that step has run
        (CUDA graphs); every step has been enqueued when this returns. Read them all before the
        next step of the engine."""
        if self.graphs is not None and self.graphs.can_run(host, num_steps):
            return self.graphs.run_burst(host, num_steps)
        inputs = to_device(host, self.device)
        steps = []
        for step in range(num_steps):
            tokens = greedy_next(self.forward(inputs))
            steps.append(tokens)
            if step == num_steps - 1:
                break
            advance_decode_inputs(inputs, tokens, self.block_size)
            inputs.max_context_len += 1
        return torch.stack(steps).tolist()

    @torch.inference_mode()
    def run_keeping_rows(self, batch: SchedulerOutput,
                         rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """run(), plus the final hidden states [len(rows), hidden] of these rows of the flat
        batch (prompt logprobs, engine/prompt_logprobs.py). Always eager: such a batch holds a
        prefill chunk, which no CUDA graph covers."""
        inputs = to_device(build_host_inputs(batch, self.block_size), self.device)
        hidden = self.hidden_states(inputs)
        kept = hidden[torch.tensor(rows, dtype=torch.int64).to(hidden.device)]
        return self.model.compute_logits(hidden[inputs.logits_indices]), kept

    def hidden_states(self, inputs: StepInputs) -> torch.Tensor:
        """The final-norm hidden states of every row: [num_tokens, hidden]."""
        backend = PagedKVBackend(self.kv_cache, inputs, self.scale)
        rope_lens = inputs.rope_lens if self.model.rotary.is_dynamic else None
        return self.model(inputs.input_ids, inputs.positions, backend, rope_lens)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits of the rows in `inputs.logits_indices`, or of every row when it is None."""
        hidden = self.hidden_states(inputs)
        if inputs.logits_indices is not None:
            hidden = hidden[inputs.logits_indices]
        return self.model.compute_logits(hidden)


@torch.inference_mode()
def warm_up_model(model: DecoderForCausalLM, num_tokens: int, num_logit_rows: int,
                  block_size: int, device: torch.device) -> None:
    """One eager forward of the largest prefill the scheduler may send, before the KV cache is
    sized: it compiles the Triton kernels and leaves its activation peak reserved by PyTorch's
    allocator, so the cache takes its share of what is really left. It runs over a one-block
    cache it never writes to (slot -1 everywhere); its outputs are meaningless."""
    cfg = model.config
    shape = CacheShape(1, block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                       next(model.parameters()).dtype)
    cache = KVCache(shape, device, quiet=True)
    num_logit_rows = min(num_logit_rows, num_tokens)
    as_long = {"dtype": torch.int64, "device": device}
    inputs = StepInputs(
        input_ids=torch.zeros(num_tokens, **as_long),
        positions=torch.arange(num_tokens, **as_long),
        rope_lens=torch.full((num_tokens,), num_tokens, **as_long),
        slot_mapping=torch.full((num_tokens,), -1, **as_long),
        block_tables=torch.zeros(1, -(-num_tokens // block_size), dtype=torch.int32, device=device),
        context_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        logits_indices=torch.arange(num_tokens - num_logit_rows, num_tokens, **as_long),
        max_q_len=num_tokens,
        max_context_len=num_tokens,
    )
    runner = ModelRunner(model, cache, device)
    runner.forward(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
