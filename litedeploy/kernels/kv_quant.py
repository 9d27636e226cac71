"""Online K/V quantization of the torch twin (lmdeploy's `--quant-policy 4/8`).

Each new K or V vector of one token and one KV head (head_dim values) gets its own asymmetric
scale and zero point: zero = min, scale = (max - min) / (2^bits - 1), q = floor((x - zero) / scale + 0.5)
(round half up, as the Triton store kernel does).
Dequantization is q * scale + zero, so the error of any element is at most scale / 2.

Storage, per layer (shapes the Triton kernels share):
- int8: uint8 [num_blocks, block_size, kv_heads, head_dim]
- int4: uint8 [num_blocks, block_size, kv_heads, head_dim // 2]; element 2j in the low nibble of
  byte j, element 2j + 1 in the high nibble
- scales_zeros: float32 [num_blocks, block_size, kv_heads, 2]: (scale, zero) of each slot and head.
  float32 keeps the min exact (a float16 zero could round past the smallest value).
"""

from __future__ import annotations

import torch

QUANT_POLICIES = (0, 4, 8)
# a constant vector has max == min: any positive scale dequantizes it exactly to `zero`
_MIN_SCALE = 1e-8


def check_quant_bits(quant_bits: int) -> None:
    if quant_bits not in QUANT_POLICIES:
        raise ValueError(f"quant_policy must be 0, 4 or 8, got {quant_bits}")


def packed_head_dim(head_dim: int, quant_bits: int) -> int:
    """Last dimension of the stored cache: head_dim bytes for int8, head_dim / 2 for int4."""
    if quant_bits == 4:
        if head_dim % 2:
            raise ValueError(f"--quant-policy 4 needs an even head_dim, got {head_dim}")
        return head_dim // 2
    return head_dim


def quantize(x: torch.Tensor, quant_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes uint8 [..., packed_head_dim], scales_zeros float32 [..., 2])."""
    x32 = x.float()
    low = x32.amin(dim=-1, keepdim=True)
    high = x32.amax(dim=-1, keepdim=True)
    max_code = 2**quant_bits - 1
    scale = ((high - low) / max_code).clamp_min(_MIN_SCALE)
    codes = ((x32 - low) / scale + 0.5).floor_().clamp_(0, max_code).to(torch.uint8)
    if quant_bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, torch.cat((scale, low), dim=-1)


def dequantize(
    codes: torch.Tensor, scales_zeros: torch.Tensor, quant_bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `quantize`: codes [..., packed], scales_zeros [..., 2] -> [..., head_dim] dtype."""
    if quant_bits == 4:
        low_nibbles = codes & 0xF
        high_nibbles = codes >> 4
        codes = torch.stack((low_nibbles, high_nibbles), dim=-1).flatten(-2)
    values = codes.float() * scales_zeros[..., :1] + scales_zeros[..., 1:]
    return values.to(dtype)
