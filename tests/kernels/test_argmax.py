"""The device argmax of greedy decoding (kernels/triton_argmax.py) equals torch.argmax exactly.

Runs on CUDA; skipped without it, unless TRITON_INTERPRET=1 runs it on the CPU through Triton's
interpreter.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_device import triton_test_device

DEVICE = triton_test_device()

from litedeploy.kernels import triton_argmax


@pytest.mark.parametrize("rows,vocab", [(1, 92544), (5, 4096), (3, 10001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch(rows, vocab, dtype) -> None:
    torch.manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, dtype=torch.float32).to(dtype)
    out = triton_argmax.argmax_rows(logits.to(DEVICE)).cpu()
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.float().argmax(dim=-1))


def test_ties_go_to_the_lowest_id_across_chunks() -> None:
    """Equal maxima inside one chunk, in two chunks, and a row that is all -inf but one."""
    chunk = triton_argmax.CHUNK
    logits = torch.randn(4, 3 * chunk + 17)
    logits[0, [chunk + 5, chunk + 3]] = 50.0  # one chunk, two equal maxima
    logits[1, [2 * chunk + 1, chunk - 1, 3 * chunk + 16]] = 50.0  # three chunks
    logits[2] = float("-inf")
    logits[2, 3 * chunk + 2] = 0.0
    logits[3] = float("-inf")  # all -inf: torch says 0
    out = triton_argmax.argmax_rows(logits.to(DEVICE)).cpu()
    assert out.tolist() == logits.argmax(dim=-1).tolist() == [chunk + 3, chunk - 1, 3 * chunk + 2, 0]


def test_strided_rows() -> None:
    wide = torch.randn(3, 2 * 5000)
    logits = wide[:, :5000]
    out = triton_argmax.argmax_rows(logits.to(DEVICE)).cpu()
    assert torch.equal(out, logits.argmax(dim=-1))
