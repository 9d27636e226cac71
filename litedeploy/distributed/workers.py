"""Tensor-parallel workers: rank 0 runs the scheduler and broadcasts every step; ranks 1..N-1
run the same forward on their shard of the model and KV cache.

Control messages (`call(method, *args)`) go over a gloo group even on GPUs, so that pickled step
inputs never touch NCCL; the forward's collectives run on the main group (NCCL or gloo).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from litedeploy.config import EngineConfig
from litedeploy.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from litedeploy.errors import ModelLoadError

logger = logging.getLogger(__name__)

DESTROY_TIMEOUT_S = 30.0  # a process group teardown that takes longer is stuck on a dead rank


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_device(config: EngineConfig, rank: int) -> str:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{rank}"


def check_tp(config: EngineConfig) -> None:
    if config.tp < 1:
        raise ModelLoadError(f"--tp must be >= 1, got {config.tp}")
    device = rank_device(config, 0)
    if device != "cpu" and config.tp > torch.cuda.device_count():
        raise ModelLoadError(
            f"--tp {config.tp} needs {config.tp} GPUs, but {torch.cuda.device_count()} are "
            "visible; use a smaller --tp or --device cpu")


def start_workers(model_path: str, config: EngineConfig) -> tuple["WorkerGroup", EngineConfig]:
    """Check the split first (so a bad --tp is one clear error, not N crashed processes), then
    spawn ranks 1..N-1 and join the group as rank 0. Returns rank 0's engine config."""
    from litedeploy.config import ModelConfig
    from litedeploy.loader.model_loader import open_source

    check_tp(config)
    ModelConfig.from_hf(open_source(model_path).hf_config).shard(config.tp)
    workers = WorkerGroup(model_path, config)
    return workers, replace(config, device=rank_device(config, 0))


class WorkerGroup:
    """Rank 0's handle on the worker processes."""

    def __init__(self, model_path: str, config: EngineConfig):
        check_tp(config)
        self.world_size = config.tp
        addr, port = "127.0.0.1", _free_port()
        backend = "gloo" if rank_device(config, 0) == "cpu" else "nccl"
        context = mp.get_context("spawn")
        self.processes = [
            context.Process(target=_worker_main, daemon=True, name=f"litedeploy-tp{rank}",
                            args=(rank, self.world_size, addr, port, backend, model_path, config))
            for rank in range(1, self.world_size)
        ]
        for process in self.processes:
            process.start()
        self._closing = False
        self.before_close: list[Callable[[], None]] = []  # rank 0's own teardown steps
        atexit.register(self.close)
        threading.Thread(target=self._watch, name="litedeploy-tp-watchdog", daemon=True).start()
        if backend == "nccl":
            torch.cuda.set_device(0)
        init_tensor_parallel(0, self.world_size, addr, port, backend)
        self.control = dist.new_group(backend="gloo")

    def call(self, method: str, *args) -> None:
        """Every worker runs `method(*args)` (see `_Worker`); rank 0 then does its own part.

        Anything that runs a collective (a forward, a graph capture, a gather) must go through
        here first: a collective that rank 0 enters alone waits forever for the others."""
        dist.broadcast_object_list([(method, args)], src=0, group=self.control)

    def min_free_memory(self, cap_bytes: int | None, own_free_bytes: int) -> int:
        """The least free memory of any rank: every rank's cache has the same number of
        blocks, so the fullest GPU decides (another process may be using one of them)."""
        self.call("report_free_memory", cap_bytes)
        return min(gather_free_memory(own_free_bytes, self.control))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for step in self.before_close:  # rank 0 frees its CUDA graphs, as the workers do
            step()
        try:
            self.call("stop")
        except Exception:  # noqa: BLE001 - workers may be gone already
            pass
        # while the workers destroy theirs: NCCL's teardown waits for every rank
        if not destroy_tensor_parallel(timeout_s=DESTROY_TIMEOUT_S):
            logger.warning("the tensor-parallel process group did not shut down within %g s",
                           DESTROY_TIMEOUT_S)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():  # stuck in a collective rank 0 left (a failed start-up)
                logger.warning("tensor-parallel worker %s did not stop; terminating it",
                               process.name)
                process.terminate()
                process.join(timeout=5)

    def _watch(self) -> None:
        # A dead worker would leave rank 0 blocked in a collective: fail loudly instead.
        while not self._closing:
            for process in self.processes:
                if process.exitcode is not None and not self._closing:
                    print(f"litedeploy: error: tensor-parallel worker {process.name} died "
                          f"(exit code {process.exitcode}); shutting down", file=sys.stderr,
                          flush=True)
                    os._exit(1)
            time.sleep(0.2)


class _Worker:
    """What a rank > 0 holds: its model shard, KV cache share and model runner. Its methods
    mirror what rank 0 does at the same moment, so the collectives inside them pair up."""

    def __init__(self, model_path: str, config: EngineConfig, device: str, control):
        from litedeploy.loader.model_loader import load_model, open_source

        self.config = replace(config, device=device)
        self.control = control
        self.model, _ = load_model(open_source(model_path), self.config.dtype, device,
                                   self.config.load_format, self.config.model_format,
                                   self.config.max_gpu_memory)
        self.device = next(self.model.parameters()).device
        self.runner = None

    def warm_up(self, num_tokens: int, num_logit_rows: int, block_size: int) -> None:
        from litedeploy.engine.model_runner import warm_up_model

        warm_up_model(self.model, num_tokens, num_logit_rows, block_size, self.device)

    def report_free_memory(self, cap_bytes: int | None) -> None:
        from litedeploy.engine.kv_cache import free_memory_bytes

        gather_free_memory(free_memory_bytes(self.device, cap_bytes), self.control)

    def init_cache(self, shape, runner_kwargs: dict) -> None:
        from litedeploy.engine.kv_cache import KVCache
        from litedeploy.engine.model_runner import ModelRunner

        # captures the decode graphs when enabled: rank 0 captures the same ones meanwhile
        self.runner = ModelRunner(self.model, KVCache(shape, self.device), self.device,
                                  **runner_kwargs)

    def run_host(self, host) -> None:
        self.runner.run_host(host)

    def release_graphs(self) -> None:
        if self.runner is not None:
            release_cuda_graphs(self.runner)

    def run_burst(self, host, num_steps: int) -> None:
        # the logits are all-gathered, so every rank's argmax (and next input) is the same
        self.runner.run_burst(host, num_steps)


def release_cuda_graphs(runner) -> None:
    """Free a model runner's decode graphs before the process group is destroyed: each graph
    that captured an NCCL all-reduce holds a reference on the communicator, and NCCL's teardown
    waits for those references to go (pytorch/pytorch#115388: destroy_process_group hangs)."""
    if runner.graphs is None:
        return
    runner.graphs = None  # the runner runs eagerly from here on
    gc.collect()
    torch.cuda.synchronize(runner.device)


def gather_free_memory(free_bytes: int, control) -> list[int]:
    """Every rank's free bytes, in rank order (over the gloo control group)."""
    gathered: list[int | None] = [None] * dist.get_world_size(control)
    dist.all_gather_object(gathered, free_bytes, group=control)
    return [int(value) for value in gathered]


def _worker_main(rank: int, world_size: int, addr: str, port: int, backend: str,
                 model_path: str, config: EngineConfig) -> None:
    try:
        logging.basicConfig(level=logging.WARNING)
        device = rank_device(config, rank)
        if device != "cpu":
            torch.cuda.set_device(rank)
        init_tensor_parallel(rank, world_size, addr, port, backend)
        control = dist.new_group(backend="gloo")
        worker = _Worker(model_path, config, device, control)
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=control)
            method, args = message[0]
            if method == "stop":
                worker.release_graphs()
                break
            with torch.inference_mode():
                getattr(worker, method)(*args)
        destroy_tensor_parallel(timeout_s=DESTROY_TIMEOUT_S)  # with rank 0's, at the same time
    except Exception:  # noqa: BLE001 - report, then exit non-zero so rank 0's watchdog sees it
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # skip the interpreter's teardown: destructors of CUDA graphs and communicators have
    # nothing left to free in a process that ends here, and must not hang its exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
