"""Many-row int4 matmuls on CPU: dequantize PyTorch's int4pack weight once, then one bf16 GEMM.

`_weight_int4pack_mm_for_cpu` dequantizes each weight tile again for every block of rows, which
is the right trade for a decode step's few rows but leaves a long prompt's prefill bound by that
kernel (~35% of a 1,024-token prefill). Past `DEQUANT_MIN_ROWS` rows a bf16 weight built once per
call ([K, N], ~1 ms for the largest linear of the default model) and a oneDNN/MKL bf16 GEMM win.

The packed layout is PyTorch's internal one (AVX-512 build: blocks of 64 output rows; for each
input column, 32 bytes whose low nibbles hold rows 0..31 and high nibbles rows 32..63), so it is
checked once per process with a round trip; where it differs, every call keeps the kernel.
"""

from __future__ import annotations

import functools

import torch

DEQUANT_MIN_ROWS = 256  # measured crossover on a 2-core AVX-512 VM (benchmarks/results/cpu.md)
_BLOCK_N = 64


@functools.cache
def int4pack_layout_known() -> bool:
    """Whether `_convert_weight_to_int4pack_for_cpu` packs as `_unpack` reads it, here."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return False
    codes = torch.randint(0, 16, (2 * _BLOCK_N, 64), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 4)
    return packed.shape == (2 * _BLOCK_N, 32) and torch.equal(_unpack(packed, 64).int(), codes.T)


def _unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 int4pack [N, K/2] -> codes uint8 [K, N] (input-major, for x @ w)."""
    out_features = packed.shape[0]
    blocks = packed.view(out_features // _BLOCK_N, in_features, _BLOCK_N // 2)
    codes = torch.cat((blocks & 0xF, blocks >> 4), dim=-1)  # [N/64, K, 64]
    return codes.transpose(0, 1).reshape(in_features, out_features)


def dequantize_int4pack(
    packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, in_features: int
) -> torch.Tensor:
    """The kernel's rule w = (q - 8) * scale + offset, as q * scale + (offset - 8 * scale) in
    one float32 pass over the codes, then bf16 [K, N]."""
    codes = _unpack(packed, in_features)
    num_groups, out_features = scale_and_zero.shape[:2]
    grouped = codes.view(num_groups, group_size, out_features)
    scale = scale_and_zero[..., 0].float()[:, None]  # [K/G, 1, N]
    offset = scale_and_zero[..., 1].float()[:, None] - 8 * scale
    weight = torch.addcmul(offset, grouped, scale)  # uint8 codes promote to float32
    return weight.view(in_features, out_features).to(torch.bfloat16)


def many_rows_ok(out_features: int) -> bool:
    return out_features % _BLOCK_N == 0 and int4pack_layout_known()
