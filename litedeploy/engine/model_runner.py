"""Runs one scheduled batch through the model over the paged cache and returns the logits to sample."""

from __future__ import annotations

import torch

from litedeploy.engine.forward_context import PagedKVBackend, StepInputs
from litedeploy.engine.input_builder import build_step_inputs
from litedeploy.engine.kv_cache import KVCache
from litedeploy.engine.scheduler import SchedulerOutput
from litedeploy.models.decoder import DecoderForCausalLM


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.shape.block_size
        self.scale = model.config.head_dim**-0.5

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> torch.Tensor:
        """Logits [num_sampling_rows, vocab] float32, in batch order of the sequences that sample."""
        inputs = build_step_inputs(batch, self.block_size, self.device)
        return self.forward(inputs)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        backend = PagedKVBackend(self.kv_cache, inputs, self.scale)
        rope_lens = inputs.rope_lens if self.model.rotary.is_dynamic else None
        hidden = self.model(inputs.input_ids, inputs.positions, backend, rope_lens)
        return self.model.compute_logits(hidden[inputs.logits_indices])
