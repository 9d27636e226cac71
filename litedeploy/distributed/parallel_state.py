"""Tensor-parallel state of this process and the collectives the sharded layers need.

With tp == 1 (the default) every collective is a no-op, so single-device code pays nothing.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from litedeploy.errors import ModelLoadError


@dataclass(frozen=True)
class TPState:
    rank: int = 0
    world_size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0


_STATE = TPState()


def tp_state() -> TPState:
    return _STATE


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str,
                         timeout_s: float = 120.0) -> TPState:
    """Join the process group (gloo on CPU, nccl on CUDA) and remember this rank.

    `init_method`: tcp://ADDR:PORT (rank 0 hosts the store) or env:// (under torchrun)."""
    global _STATE
    if world_size > 1:
        # no NVLink multicast (NCCL, PyTorch symmetric memory, NVSHMEM): on shared hosts a
        # multicast object can take the GPUs out of service; plain NVLink all-reduce is enough
        for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                            ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(name, value)
        try:
            dist.init_process_group(backend, init_method=init_method, rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:  # DistStoreError: a node never came
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelLoadError(
                f"tensor-parallel rank {rank} of {world_size} could not join the group at "
                f"{init_method} within {timeout_s:g} s ({first}); start every node with the "
                "same --tp, --nnodes, --master-addr and --master-port") from exc
    _STATE = TPState(rank, world_size)
    return _STATE


def destroy_tensor_parallel(timeout_s: float | None = None) -> bool:
    """Leave the process group; False if that did not finish within `timeout_s`.

    NCCL's teardown pairs up across ranks, so every rank must destroy at about the same time
    (rank 0 does not wait for the workers to exit first); the timeout keeps a dead peer from
    hanging the caller's shutdown for ever."""
    global _STATE
    _STATE = TPState()
    if not dist.is_initialized():
        return True
    if timeout_s is None:
        dist.destroy_process_group()
        return True
    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="litedeploy-tp-destroy", daemon=True).start()
    return done.wait(timeout_s)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _STATE.world_size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., n * world_size] in rank order."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
