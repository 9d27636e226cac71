"""Kernel dispatch: the one place that knows the device.

CUDA tensors use the Triton kernels when triton imports; everything else uses the torch twins of
`reference.py`. Triton modules are imported lazily so a CPU-only install never needs triton.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from litedeploy.kernels import reference


@functools.cache
def _triton_module(name: str) -> ModuleType | None:
    try:
        import importlib

        return importlib.import_module(f"litedeploy.kernels.{name}")
    except Exception:  # noqa: BLE001 - no triton, or no kernel yet: fall back to the twin
        return None


def _pick(x: torch.Tensor, module_name: str, fn_name: str):
    if x.is_cuda:
        module = _triton_module(module_name)
        if module is not None and hasattr(module, fn_name):
            return getattr(module, fn_name)
    return getattr(reference, fn_name)


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scales_zeros=None, v_scales_zeros=None,
             quant_bits=0) -> None:
    """quant_bits 4/8: quantize per token and KV head on the way in (see kv_quant.py)."""
    if not quant_bits:  # the float path, exactly as before
        _pick(k, "triton_store_kv", "store_kv")(k, v, k_cache, v_cache, slot_mapping)
        return
    _pick(k, "triton_store_kv", "store_kv")(k, v, k_cache, v_cache, slot_mapping,
                                            k_scales_zeros, v_scales_zeros, quant_bits)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                    max_q_len, max_context_len, scale, k_scales_zeros=None,
                    v_scales_zeros=None, quant_bits=0):
    quant = (k_scales_zeros, v_scales_zeros, quant_bits) if quant_bits else ()
    if q.is_cuda and _triton_module("triton_attention") is not None:
        return _triton_module("triton_attention").paged_attention(
            q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
            max_q_len, max_context_len, scale, *quant)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                     cu_seqlens_q, max_q_len, max_context_len, scale, *quant)


def rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> bool:
    """CUDA float caches: RoPE on q (in place) and k (on its way into the cache) plus the K/V
    store in one launch; False (nothing done) where that kernel does not apply, so the caller
    runs `apply_rope` and `store_kv` instead."""
    if not q.is_cuda or k_cache.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    module = _triton_module("triton_store_kv")
    if module is None or not hasattr(module, "rope_store_kv"):
        return False
    module.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return True


def rms_norm(x, weight, eps, residual=None):
    return _pick(x, "triton_norm_rope", "rms_norm")(x, weight, eps, residual)


def apply_rope(q, k, cos, sin):
    return _pick(q, "triton_norm_rope", "apply_rope")(q, k, cos, sin)


def rope_cos_sin(positions, inv_freq, rope_lens=None, dynamic_params=None):
    """RoPE's cos/sin of a step in one Triton launch on CUDA (see triton_norm_rope); None
    elsewhere: the caller computes them with torch."""
    if positions.is_cuda:
        module = _triton_module("triton_norm_rope")
        if module is not None and hasattr(module, "rope_cos_sin"):
            return module.rope_cos_sin(positions, inv_freq, rope_lens, dynamic_params)
    return None


def silu_and_mul(x):
    return _pick(x, "triton_activation", "silu_and_mul")(x)


def _gemv_enabled() -> bool:
    # LITEDEPLOY_GEMV=0 keeps cuBLAS for every shape (benchmarks compare both in one run)
    return os.environ.get("LITEDEPLOY_GEMV", "1") != "0"


def linear(x, weight, bias=None):
    """F.linear; on CUDA, decode-sized batches (<= 8 rows) go through the Triton GEMV."""
    if x.is_cuda and _gemv_enabled():
        module = _triton_module("triton_gemv")
        if module is not None:
            return module.linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def silu_mul_linear(gate_up: torch.Tensor, linear_module: torch.nn.Module) -> torch.Tensor | None:
    """linear_module(silu(gate) * up) in one GEMV launch for a one-row CUDA input when the
    module is a dispatched plain linear (see `_DispatchedLinear`); None where that does not
    apply, and the caller runs `silu_and_mul` and the module itself (CPU: always None)."""
    if not (gate_up.is_cuda and type(linear_module) is _DispatchedLinear and gate_up.dim() == 2
            and gate_up.shape[0] == 1 and _gemv_enabled()):
        return None
    module = _triton_module("triton_gemv")
    if module is None or not hasattr(module, "silu_mul_linear"):
        return None
    return module.silu_mul_linear(gate_up, linear_module.weight, linear_module.bias)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice per row (ties -> lowest id) as int64 [rows]: two short Triton launches on
    CUDA instead of torch's one-block-per-row reduction."""
    if logits.is_cuda and logits.dim() == 2:
        module = _triton_module("triton_argmax")
        if module is not None:
            return module.argmax_rows(logits)
    return logits.argmax(dim=-1)


class _DispatchedLinear(torch.nn.Linear):
    """nn.Linear whose one-row calls go through `linear` above (same parameters, same state
    dict); every other call goes straight to F.linear, so an eager prefill (host-bound at a
    few hundred launches) pays one shape check per linear and nothing more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1:
            return linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def use_dispatched_linears(model: torch.nn.Module) -> int:
    """Route the plain nn.Linear modules of a CUDA model through `linear`; returns how many.
    Quantized linears (their own classes) keep their kernels; CPU models are left alone."""
    if not _gemv_enabled():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.is_cuda:
            module.__class__ = _DispatchedLinear
            count += 1
    return count
