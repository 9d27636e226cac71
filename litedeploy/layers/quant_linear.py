"""Weight-only quantized linears with the float interface: `forward(x)` like nn.Linear.

Both classes load in one device-independent "row" form (dim 0 = output features, so packed
q|k|v and gate|up shards and llama.cpp's row permutation work on them like on float weights):

- Int8Linear: `weight` int8 [N, K], `scales` [N]; w = weight * scale (symmetric, per channel).
- Int4Linear: `qweight` uint8 [N, K/2] (k even in the low nibble), `scales`, `zeros` [N, K/G];
  w = (q - zero) * scale, asymmetric per group of G input features. AWQ and GGUF Q4_0/Q4_1
  convert into this form; zeros are float so Q4_1's (scale, min) pairs fit exactly.

`finalize()` runs once after loading and repacks for the device: PyTorch's CPU int4/int8 kernels
(fast only with bfloat16 activations, so the CPU path computes in bfloat16), the Triton GEMMs on
CUDA, or a dequantize-on-the-fly fallback where neither applies.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from litedeploy.layers import int4pack_cpu
from litedeploy.layers.cpu_batched_weights import takes_bf16_copy

_CPU_INT4_GROUPS = (32, 64, 128, 256)
# PyTorch's CPU weight-only kernels (bfloat16 activations); None where this build lacks them
_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def _triton_available() -> bool:
    try:
        import litedeploy.kernels.triton_quant_gemm  # noqa: F401
    except ImportError:
        return False
    return True


# ---- row-form quantization helpers (also used by auto_awq and the tests) --------------------
def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, K/2]; element 2j in the low nibble of byte j."""
    if q.device.type == "cpu":  # numpy's uint8 bit ops are ~50x faster than torch's on CPU
        a = q.numpy().astype(np.uint8)
        return torch.from_numpy(a[:, 0::2] | (a[:, 1::2] << 4))
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] values 0..15."""
    if packed.device.type == "cpu":
        a = packed.numpy()
        return torch.from_numpy(np.stack([a & 0xF, a >> 4], axis=-1).reshape(a.shape[0], -1))
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# AWQ packs 8 output columns per int32; nibble i holds column AWQ_ORDER[i] of its group of 8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_SHIFTS_BITS = tuple(4 * AWQ_ORDER.index(col) for col in range(8))  # column c -> its shift


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] values 0..15 -> int32 [rows, cols/8] in AWQ's nibble order."""
    q = q.to(torch.int32).reshape(q.shape[0], -1, 8)
    packed = torch.zeros(q.shape[:2], dtype=torch.int32, device=q.device)
    for col, shift in enumerate(AWQ_SHIFTS_BITS):
        packed |= q[..., col] << shift
    return packed


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] in AWQ's nibble order -> uint8 [rows, cols] values 0..15."""
    shifts = torch.tensor(AWQ_SHIFTS_BITS, dtype=torch.int32, device=packed.device)
    q = (packed[..., None] >> shifts) & 0xF
    return q.reshape(packed.shape[0], -1).to(torch.uint8)


def awq_layout(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row form -> AWQ's GEMM layout: qweight int32 [K, N/8], scales [K/G, N], zeros [K/G, N]
    (zeros stay float: GGUF Q4_1 zero points are not integers)."""
    q = unpack_int4_rows(qweight).T.contiguous()  # [K, N]
    return pack_awq(q), scales.T.contiguous(), zeros.float().T.contiguous()


def int4_codes(
    weight: torch.Tensor, group_size: int, max_val: torch.Tensor | None = None,
    min_val: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max int4 with integer zero points (AWQ's rule), unpacked.

    Returns q [N, K] float values 0..15, scales and zeros [N, K/G]; max_val/min_val [N, K/G]
    override the per-group range (auto_awq's clipping)."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group_size, group_size)
    max_val = groups.amax(-1) if max_val is None else max_val
    min_val = groups.amin(-1) if min_val is None else min_val
    scales = (max_val - min_val).clamp(min=1e-5) / 15  # [N, K/G]
    zeros = (-min_val / scales).round().clamp(0, 15)
    q = ((groups / scales[..., None]).round() + zeros[..., None]).clamp(0, 15)
    return q.reshape(rows, cols), scales, zeros


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize then dequantize (float32), without packing."""
    q, scales, zeros = int4_codes(weight, group_size)
    rows, cols = weight.shape
    groups = q.reshape(rows, -1, group_size)
    return ((groups - zeros[..., None]) * scales[..., None]).reshape(rows, cols)


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row form of Int4Linear: qweight uint8 [N, K/2], scales, zeros [N, K/G]."""
    q, scales, zeros = int4_codes(weight, group_size)
    return pack_int4_rows(q), scales, zeros


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Row form -> float32 [N, K]."""
    q = unpack_int4_rows(qweight).float()
    rows, cols = q.shape
    groups = q.reshape(rows, cols // group_size, group_size)
    w = (groups - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(rows, cols)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8. Returns weight int8 [N, K], scales [N]."""
    scales = weight.float().abs().amax(-1).clamp(min=1e-8) / 127
    q = (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def _frozen(shape: tuple[int, ...], dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen((out_features, in_features), torch.int8)
        self.scales = _frozen((out_features,))
        self.bias = _frozen((out_features,)) if bias else None
        self.mode = "dequant"
        self.scales_bf16: torch.Tensor | None = None
        self.bf16_copy: torch.Tensor | None = None  # CPU, many rows: [N, K] (cpu_batched_weights)

    def finalize(self) -> None:
        device = self.weight.device
        if device.type == "cpu" and _has_op("_weight_int8pack_mm"):
            self.mode, self.scales_bf16 = "cpu", self.scales.to(torch.bfloat16)
        elif device.type == "cuda" and _triton_available():
            self.mode = "triton"

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def can_keep_bf16_copy(self) -> bool:
        return self.mode == "cpu"

    def keep_bf16_copy(self) -> None:
        if self.bf16_copy is None:  # engines built over one model share it
            self.bf16_copy = self.dequantized().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "cpu" and x.dim() == 2:
            return self._cpu_forward_2d(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "cpu":
            out = self._cpu_forward_2d(x2)
            return out.reshape(*shape[:-1], self.out_features)
        if self.mode == "triton":
            from litedeploy.kernels.triton_quant_gemm import int8_gemm

            out = int8_gemm(x2, self.weight, self.scales)
        else:
            out = x2 @ self.dequantized().to(x.dtype).T
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _cpu_forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16_copy is not None and takes_bf16_copy(x.shape[0]):
            out = F.linear(x.to(torch.bfloat16), self.bf16_copy)
        else:
            # as few ops as possible: at batch 1 the kernel takes ~20-50 us, each extra op ~1-2
            out = _INT8_MM(x.to(torch.bfloat16), self.weight, self.scales_bf16)
        if x.dtype != torch.bfloat16:
            out = out.to(x.dtype)
        return out if self.bias is None else out.add_(self.bias.to(out.dtype))


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 group_size: int = 128):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"int4 group size {group_size} must be even and divide the "
                             f"input features ({in_features}); pick another --w-group-size")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        num_groups = in_features // group_size
        self.qweight = _frozen((out_features, in_features // 2), torch.uint8)
        self.scales = _frozen((out_features, num_groups))
        self.zeros = _frozen((out_features, num_groups))
        self.bias = _frozen((out_features,)) if bias else None
        self.mode = "dequant"
        self.kernel_tensors: tuple[torch.Tensor, ...] = ()
        self.cpu_many_rows = False  # CPU: many-row inputs take a dequantized bf16 GEMM
        self.bf16_copy: torch.Tensor | None = None  # CPU, many rows: [K, N] (cpu_batched_weights)
        self.gemv_tensors: tuple[torch.Tensor, ...] = ()

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)

    def finalize(self) -> None:
        """Repack the row form for this device's kernel (once, after loading)."""
        device = self.qweight.device
        if device.type == "cpu" and self._cpu_int4_ok():
            self.kernel_tensors = self._cpu_int4pack()
            self.mode = "cpu"
            self.cpu_many_rows = int4pack_cpu.many_rows_ok(self.out_features)
        elif device.type == "cuda" and _triton_available():
            self.kernel_tensors = awq_layout(self.qweight, self.scales, self.zeros)
            # batch-1 decode streams the row form in one GEMV launch (int4_gemv)
            self.gemv_tensors = (self.qweight, self.scales, self.zeros)
            self.mode = "triton"
        if self.mode != "dequant":  # the row-form parameters go (CUDA: gemv_tensors keeps them)
            self.qweight = self.scales = self.zeros = None

    def can_keep_bf16_copy(self) -> bool:
        return self.mode == "cpu" and self.cpu_many_rows

    def keep_bf16_copy(self) -> None:
        if self.bf16_copy is not None:  # engines built over one model share it
            return
        packed, scale_and_zero = self.kernel_tensors
        self.bf16_copy = int4pack_cpu.dequantize_int4pack(packed, scale_and_zero,
                                                          self.group_size, self.in_features)

    def _cpu_int4_ok(self) -> bool:
        return (_has_op("_weight_int4pack_mm_for_cpu") and self.group_size in _CPU_INT4_GROUPS
                and self.in_features % 32 == 0)

    def _cpu_int4pack(self) -> tuple[torch.Tensor, ...]:
        # the CPU kernel computes w = (q - 8) * scale + offset; ours is (q - zero) * scale
        q = unpack_int4_rows(self.qweight).to(torch.int32)
        inner_k_tiles = 4 if self.in_features % 64 == 0 else 2  # 4 measured ~10x faster than 2
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
        scales = self.scales.float()
        offsets = (8 - self.zeros.float()) * scales
        scale_and_zero = torch.stack([scales, offsets], dim=-1).transpose(0, 1)  # [K/G, N, 2]
        return packed, scale_and_zero.contiguous().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "cpu" and x.dim() == 2:
            return self._cpu_forward_2d(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "cpu":
            out = self._cpu_forward_2d(x2)
            return out.reshape(*shape[:-1], self.out_features)
        if self.mode == "triton":
            from litedeploy.kernels import triton_quant_gemm as tqg

            if tqg.int4_gemv_applies(x2, self.group_size):  # batch 1: one GEMV launch
                out = tqg.int4_gemv(x2, *self.gemv_tensors, self.group_size)
            else:
                out = tqg.awq_gemm(x2, *self.kernel_tensors, self.group_size)
        else:
            out = F.linear(x2, self.dequantized().to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _cpu_forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        # as few ops as possible: at batch 1 the kernel itself takes ~15-50 us, each extra op ~1-2
        packed, scale_and_zero = self.kernel_tensors
        if self.bf16_copy is not None and takes_bf16_copy(x.shape[0]):
            out = x.to(torch.bfloat16) @ self.bf16_copy
        elif self.cpu_many_rows and x.shape[0] >= int4pack_cpu.DEQUANT_MIN_ROWS:  # a prefill
            weight = int4pack_cpu.dequantize_int4pack(packed, scale_and_zero, self.group_size,
                                                      self.in_features)
            out = x.to(torch.bfloat16) @ weight
        else:
            out = _INT4_MM(x.to(torch.bfloat16), packed, self.group_size, scale_and_zero)
        if x.dtype != torch.bfloat16:
            out = out.to(x.dtype)
        return out if self.bias is None else out.add_(self.bias.to(out.dtype))


# AWQ checkpoints load into the same module (awq.py converts their packing to the row form)
AWQLinear = Int4Linear
