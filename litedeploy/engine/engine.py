"""LLMEngine: requests in, incremental outputs out, one `step()` at a time (synchronous).

The engine is the only place that touches the model. It is not thread-safe: AsyncEngine drives it
from one background thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random

import torch

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.block_manager import BlockManager
from litedeploy.engine.detokenizer import IncrementalDetokenizer
from litedeploy.engine.guided import GrammarCache, GuidedMatcher, register_cache
from litedeploy.engine.input_builder import build_host_inputs
from litedeploy.engine.kv_cache import KVCache, plan_cache
from litedeploy.engine.model_runner import ModelRunner, warm_up_model
from litedeploy.engine.multi_step import resolve_num_steps, row_can_burst
from litedeploy.engine.prompt_logprobs import check_request, run_batch
from litedeploy.engine.request import RequestOutput, RequestState
from litedeploy.engine.sampler import SampledToken, Sampler
from litedeploy.engine.scheduler import Scheduler, SchedulerOutput
from litedeploy.engine.sequence import Sequence
from litedeploy.errors import ModelLoadError, RequestError
from litedeploy.layers.cpu_batched_weights import attach_bf16_copies
from litedeploy.model_bundle import ModelBundle, load_bundle, resolve_model_path
from litedeploy.reference_generation import sampling_row

logger = logging.getLogger(__name__)

CPU_TP_WARM_UP_TOKENS = 32  # enough to run every collective of a forward; CPU needs no more


class LLMEngine:
    def __init__(self, bundle: ModelBundle, config: EngineConfig, workers=None):
        self.bundle = bundle
        self.config = config
        self.workers = workers  # a distributed.workers.WorkerGroup under --tp > 1
        self.model_config = bundle.model_config
        self.tokenizer = bundle.tokenizer
        self.device = bundle.device
        self.session_len = config.session_len or self.model_config.max_position_embeddings
        # activations first, so the cache gets what is left; on CPU only under TP, where a
        # short one checks that every rank's collectives pair up before serving
        if self.device.type == "cuda" or workers is not None:
            num_tokens = min(config.max_prefill_token_num, self.session_len)
            if self.device.type != "cuda":
                num_tokens = min(num_tokens, CPU_TP_WARM_UP_TOKENS)
            warm_up = (num_tokens, config.max_batch_size, config.cache_block_seq_len)
            if workers is not None:  # the forward all-reduces: every rank runs it together
                workers.call("warm_up", *warm_up)
            try:
                warm_up_model(bundle.model, *warm_up, self.device)
            except torch.OutOfMemoryError as exc:
                raise ModelLoadError(
                    f"a {num_tokens}-token prefill does not fit in GPU memory next to the "
                    "weights: lower --max-prefill-token-num or --max-batch-size, or raise "
                    "--max-gpu-memory") from exc
        # CPU, one process: bf16 copies of small quantized models for steps of many rows;
        # before the cache is sized, which takes what is left
        self.bf16_copy_bytes = 0
        if self.device.type == "cpu" and workers is None:
            self.bf16_copy_bytes = attach_bf16_copies(bundle.model, config.max_batch_size)
        cache_shape = plan_cache(
            self.model_config, config.cache_config(), bundle.dtype, self.device,
            max_useful_tokens=config.max_batch_size * self.session_len,
            min_free_across_ranks=workers.min_free_memory if workers is not None else None,
        )
        self.kv_cache = KVCache(cache_shape, self.device)
        self.block_manager = BlockManager(
            cache_shape.num_blocks, cache_shape.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_batch_size, config.max_prefill_token_num,
            self.session_len, config.prefill_interval,
        )
        runner_kwargs = dict(max_batch_size=config.max_batch_size,
                             max_context_len=self.session_len, eager_mode=config.eager_mode)
        if workers is not None:  # before rank 0 builds its runner: graph capture is collective
            workers.call("init_cache", cache_shape, runner_kwargs)
        self.runner = ModelRunner(bundle.model, self.kv_cache, self.device, **runner_kwargs)
        if workers is not None:
            from litedeploy.distributed.tp_runner import TPModelRunner

            self.runner = TPModelRunner(self.runner, workers)
        self.sampler = Sampler(self.device)
        # structured output: compiled grammars for this vocabulary (llguidance loads on first use)
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size,
                                     sorted(bundle.stop_token_ids))
        register_cache(self.grammars)
        self.num_scheduler_steps = resolve_num_steps(config.num_scheduler_steps, self.device)
        self.num_burst_steps = 0  # decode steps run inside multi-step bursts (introspection)
        self._seq_ids = itertools.count()
        self._requests: dict[str, Sequence] = {}
        self._finished_outputs: list[RequestOutput] = []
        self.num_preemptions = 0

    @classmethod
    def from_pretrained(cls, model_path: str | None = None,
                        config: EngineConfig | None = None) -> LLMEngine:
        config = config or EngineConfig()
        config.validate()
        if config.tp == 1:
            return cls(load_bundle(model_path, config), config)
        from litedeploy.distributed.workers import start_workers

        model_path = resolve_model_path(model_path)
        workers, rank0_config = start_workers(model_path, config)
        try:
            return cls(load_bundle(model_path, rank0_config), config, workers)
        except BaseException:
            workers.close()
            raise

    def close(self) -> None:
        """Stop tensor-parallel workers, if any (single-process engines hold nothing)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], gen: GenerationConfig) -> None:
        """Queue a request; raises RequestError at once when it can never be served."""
        gen.validate()
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already running")
        if not prompt_ids:
            raise RequestError("the prompt is empty: give at least one token")
        if max(prompt_ids) >= self.model_config.vocab_size or min(prompt_ids) < 0:
            raise RequestError(f"token ids must be in [0, {self.model_config.vocab_size})")
        check_request(gen, self.model_config.vocab_size, self.workers is not None)
        # max_new_tokens 0 (prompt logprobs only) still runs the step that would sample one
        max_new = 1 if gen.max_new_tokens == 0 else (
            gen.max_new_tokens or max(1, self.session_len - len(prompt_ids)))
        stop_ids = frozenset() if gen.ignore_eos else frozenset(
            set(self.bundle.stop_token_ids) | set(gen.stop_token_ids or ()))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, gen.skip_special_tokens)
        if gen.random_seed is None and not gen.is_greedy:
            # fixed per request, so its draws do not depend on what else is in the batch
            gen = dataclasses.replace(gen, random_seed=random.getrandbits(63))
        state = RequestState(request_id, gen, list(prompt_ids), stop_ids, detok)
        if gen.guided is not None:  # from the cache: AsyncEngine compiled it off this thread
            state.guided = GuidedMatcher(self.grammars.get(gen.guided))
        seq = Sequence(next(self._seq_ids), list(prompt_ids), len(prompt_ids), max_new,
                       payload=state, skip_prefix_cache=gen.prompt_logprobs is not None)
        self.scheduler.add(seq)  # raises RequestError when it can never fit
        self._requests[request_id] = seq

    def abort(self, request_id: str) -> bool:
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(seq.seq_id)
        state: RequestState = seq.payload
        state.finish_reason = "abort"
        self._finished_outputs.append(state.take_output(seq.num_cached_tokens))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished_outputs)

    # ---- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._finished_outputs = self._finished_outputs, []
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if batch.is_empty:
            if not self.scheduler.has_unfinished() and self.config.check_integrity:
                self.scheduler.check_integrity()
            return outputs
        num_steps = self._burst_length(batch)
        if num_steps > 1:
            return outputs + self._step_burst(batch, num_steps)
        try:
            logits = run_batch(self.runner, batch)  # runner.run + any prompt logprobs
            ready = self.scheduler.update(batch)
            rows = [self._sampling_row(seq) for seq in ready]
            sampled = self.sampler(logits, rows) if ready else []
        except Exception as exc:
            logger.exception("engine step failed")
            return outputs + self._fail_batch([item.seq for item in batch.scheduled], exc)
        for seq, token in zip(ready, sampled):
            state: RequestState = seq.payload
            if state.gen.max_new_tokens == 0:  # prompt logprobs only: the token is dropped
                state.finish_reason = "length"
            else:
                state.add_token(token, seq.max_new_tokens)
            if state.finish_reason is None:
                seq.append_token(token.token_id)
            else:
                self.scheduler.finish(seq)
                self._requests.pop(state.request_id, None)
            outputs.append(state.take_output(seq.num_cached_tokens))
        if not self.scheduler.has_unfinished() and self.config.check_integrity:
            self.scheduler.check_integrity()
        return outputs

    # ---- multi-step decoding (engine/multi_step.py) ---------------------------------------
    def _burst_length(self, batch: SchedulerOutput) -> int:
        """How many greedy decode steps this batch may run between two host syncs (1 = none)."""
        steps = self.num_scheduler_steps
        if steps <= 1 or not hasattr(self.runner, "run_burst"):
            return 1
        # admissions wait for a burst to end: burst only while none is due, and not past it
        if self.scheduler.admission_due():
            return 1
        # (a full batch admits nobody before a sequence finishes: the burst needs no cap then)
        if self.scheduler.num_waiting and not self.scheduler.is_full:
            steps = min(steps, self.scheduler.steps_until_admission() + 1)
        num_missing_blocks = 0
        for item in batch.scheduled:
            seq = item.seq
            if item.num_new_tokens != 1 or seq.num_computed_tokens + 1 != seq.num_tokens:
                return 1  # a prefill chunk: not a plain decode batch
            # a sequence may reach max_new_tokens inside the burst (the rest of its tokens
            # are dropped), but no position may pass the session length
            steps = min(steps, self.session_len - seq.num_tokens + 1)
            if steps <= 1 or not row_can_burst(self._sampling_row(seq)):
                return 1
        for item in batch.scheduled:
            seq = item.seq
            num_needed = self.block_manager.num_blocks_for(seq.num_computed_tokens + steps)
            num_missing_blocks += max(0, num_needed - len(seq.block_table))
        return steps if num_missing_blocks <= self.block_manager.num_free_blocks else 1

    def _step_burst(self, batch: SchedulerOutput, num_steps: int) -> list[RequestOutput]:
        seqs = [item.seq for item in batch.scheduled]
        for seq in seqs:  # blocks for every step up front: the device fills their slots alone
            self.block_manager.allocate(seq, num_steps)
        # CUDA graphs: every step is enqueued at once and its tokens come back step by step, so
        # the bookkeeping below overlaps the device's later steps (TP ranks: run_burst, synced)
        start_burst = getattr(self.runner, "start_burst", self.runner.run_burst)
        try:
            token_rows = start_burst(
                build_host_inputs(batch, self.block_manager.block_size), num_steps)
        except Exception as exc:
            logger.exception("engine step failed")
            return self._fail_batch(seqs, exc)
        self.num_burst_steps += num_steps
        self.scheduler.count_decode_steps(num_steps - 1)  # schedule() counted the first
        column = {seq.seq_id: index for index, seq in enumerate(seqs)}
        outputs = []
        for tokens in token_rows:
            for seq in self.scheduler.update(batch):  # finished ones drop out here
                state: RequestState = seq.payload
                token_id = tokens[column[seq.seq_id]]
                state.add_token(SampledToken(token_id), seq.max_new_tokens)
                if state.finish_reason is None:
                    seq.append_token(token_id)
                else:  # the rest of its burst is dropped with its blocks
                    self.scheduler.finish(seq)
                    self._requests.pop(state.request_id, None)
                    outputs.append(state.take_output(seq.num_cached_tokens))
        for seq in seqs:
            if not seq.is_finished:
                outputs.append(seq.payload.take_output(seq.num_cached_tokens))
        if not self.scheduler.has_unfinished() and self.config.check_integrity:
            self.scheduler.check_integrity()
        return outputs

    def _sampling_row(self, seq: Sequence):
        state: RequestState = seq.payload
        row = sampling_row(state.gen, state.prompt_ids, state.output_ids, state.stop_ids)
        if state.guided is not None:
            row.grammar = state.guided
            if state.guided.is_completed:  # the grammar's end wins over min_new_tokens
                row.suppressed_token_ids = ()
        return row

    def _fail_batch(self, seqs: list[Sequence], exc: Exception) -> list[RequestOutput]:
        outputs = []
        for seq in seqs:
            state: RequestState = seq.payload
            self.scheduler.finish(seq)
            self._requests.pop(state.request_id, None)
            state.finish_reason = "error"
            output = state.take_output(seq.num_cached_tokens)
            output.error = f"{type(exc).__name__}: {exc}"
            outputs.append(output)
        return outputs

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_usage": bm.usage(),
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "prefix_hit_rate": bm.stats.hit_rate,
            "prefix_hit_tokens": bm.stats.num_prefix_hit_tokens,
            "prefix_query_tokens": bm.stats.num_prefix_queries_tokens,
            "num_preemptions": self.num_preemptions,
        }

    def generate(self, prompts: list[list[int]], gen: GenerationConfig) -> list[RequestOutput]:
        """Blocking helper: run a batch to completion; one merged output per prompt."""
        ids = [f"batch-{next(self._seq_ids)}-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts):
            self.add_request(request_id, prompt, gen)
        merged = {request_id: _empty_output(request_id) for request_id in ids}
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.request_id in merged:
                    _merge(merged[out.request_id], out)
                    if out.finished:
                        pending.discard(out.request_id)
        return [merged[i] for i in ids]


def _empty_output(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, "", [], None, False, None, 0, 0)


def _merge(total: RequestOutput, delta: RequestOutput) -> None:
    total.text += delta.text
    total.token_ids += delta.token_ids
    if delta.logprobs is not None:
        total.logprobs = (total.logprobs or []) + delta.logprobs
    if delta.prompt_logprobs is not None:
        total.prompt_logprobs = delta.prompt_logprobs
    total.finished, total.finish_reason = delta.finished, delta.finish_reason
    total.input_token_len, total.generate_token_len = delta.input_token_len, delta.generate_token_len
    total.num_cached_tokens, total.error = delta.num_cached_tokens, delta.error


