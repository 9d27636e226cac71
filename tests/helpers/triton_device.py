"""Where the Triton kernel tests run: the GPU, or Triton's CPU interpreter when asked for."""

from __future__ import annotations

import os

import pytest
import torch


def triton_test_device() -> str:
    """'cuda', or 'cpu' under TRITON_INTERPRET=1; otherwise the calling test module is skipped.
    Call it at module level, before importing any Triton kernel module."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("Triton kernels need CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)


def bf16_param(device: str):
    """bfloat16 as a test parameter: Triton's CPU interpreter truncates float32 -> bfloat16 and
    gets bf16 dots wrong, so it runs on the GPU only."""
    return pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        device == "cpu", reason="bf16 is wrong in Triton's interpreter"))
