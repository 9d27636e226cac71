"""Kernel dispatch: the one place that knows the device.

CUDA tensors use the Triton kernels when triton imports; everything else uses the torch twins of
`reference.py`. Triton modules are imported lazily so a CPU-only install never needs triton.
"""

from __future__ import annotations

import functools
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


def rms_norm(x, weight, eps, residual=None):
    return _pick(x, "triton_norm_rope", "rms_norm")(x, weight, eps, residual)


def apply_rope(q, k, cos, sin):
    return _pick(q, "triton_norm_rope", "apply_rope")(q, k, cos, sin)


def silu_and_mul(x):
    return _pick(x, "triton_activation", "silu_and_mul")(x)
