"""Rotary position embeddings: default, linear, llama3 and dynamic NTK, computed once per step.

The model asks for (cos, sin) of every token of the step, each [num_tokens, head_dim / 2] float32;
each layer then rotates its q/k with `kernels.apply_rope`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from litedeploy import kernels
from litedeploy.config import RopeConfig


def _base_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend the band between.
    low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq = _base_inv_freq(rope.theta, head_dim)
        if rope.scaling_type == "linear":
            inv_freq = inv_freq / rope.factor
        elif rope.scaling_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._params_by_device: dict[torch.device, torch.Tensor] = {}

    @property
    def is_dynamic(self) -> bool:
        return self.rope.scaling_type == "dynamic"

    def forward(
        self, positions: torch.Tensor, rope_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; rope_lens [T] (dynamic NTK only): the length that sets each token's base,
        i.e. its sequence's largest position in this forward + 1 (Hugging Face's rule)."""
        inv_freq = self.inv_freq.to(positions.device)
        dynamic = self.is_dynamic and rope_lens is not None
        # CUDA: the same formula in one launch instead of ~18 small ones (~22 us of a batch-1
        # decode step); float32 results within a few units of the torch code's (see
        # triton_norm_rope._cos_sin_kernel). None on CPU, which keeps the torch code below
        fused = kernels.rope_cos_sin(positions, inv_freq, rope_lens if dynamic else None,
                                     self._dynamic_params(positions.device) if dynamic else None)
        if fused is not None:
            return fused
        if dynamic:
            inv_freq = self._dynamic_inv_freq(rope_lens)  # [T, D/2]
            freqs = positions.float()[:, None] * inv_freq
        else:
            freqs = positions.float()[:, None] * inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def _dynamic_params(self, device: torch.device) -> torch.Tensor:
        """The scalars of `_dynamic_inv_freq` as the fused kernel takes them (float64, made once
        per device so a CUDA graph capture never copies them)."""
        cached = self._params_by_device.get(device)
        if cached is None:
            max_pos, factor, dim = self.max_position_embeddings, self.rope.factor, self.head_dim
            # torch divides by a Python scalar as a product with its reciprocal (in the tensor's
            # precision): float32(1) / float32(dim) for the exponents
            inv_dim = float(torch.tensor(1.0) / torch.tensor(float(dim)))
            cached = torch.tensor([self.rope.theta, factor, 1.0 / max_pos, factor - 1,
                                   dim / (dim - 2), max_pos, inv_dim], dtype=torch.float64,
                                  device=device)
            self._params_by_device[device] = cached
        return cached

    def _dynamic_inv_freq(self, rope_lens: torch.Tensor) -> torch.Tensor:
        max_pos, factor, dim = self.max_position_embeddings, self.rope.factor, self.head_dim
        lens = rope_lens.double().clamp(min=max_pos)
        base = self.rope.theta * ((factor * lens / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=lens.device).float() / dim
        return 1.0 / (base.float()[:, None] ** exponents[None, :])
