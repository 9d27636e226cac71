"""The ranks that follow rank 0: each joins the process group, loads its shard, and runs
rank 0's calls (`call(method, *args)`, see `_Worker`) until "stop".

Control messages go over a gloo group even on GPUs, so that pickled step inputs never touch
NCCL; the forward's collectives run on the main group (NCCL or gloo). Every rank heartbeats
(liveness.py), so a lost one ends all of them; any error ends the rank's process non-zero.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from litedeploy.config import EngineConfig
from litedeploy.distributed.launch import RankLayout
from litedeploy.distributed.liveness import Liveness
from litedeploy.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from litedeploy.errors import ModelLoadError

logger = logging.getLogger(__name__)

DESTROY_TIMEOUT_S = 30.0  # a process group teardown that takes longer is stuck on a dead rank
# how long ranks wait for each other at start-up (another node may be started by hand later)
RENDEZVOUS_TIMEOUT_S = 300.0
# Workers wait for rank 0's next call however long the server stays idle (liveness is the
# heartbeats' job): gloo's default 30 minutes would end an idle server's workers.
CONTROL_TIMEOUT = timedelta(days=365)
# errors of a collective whose peer is gone: one line, not a traceback
_PEER_ERRORS = ("closed by peer", "Connection reset", "Broken pipe", "Timed out", "NCCL",
                "Connection refused")


def rank_device(config: EngineConfig, local_rank: int) -> str:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{local_rank}"


def check_tp(config: EngineConfig, layout: RankLayout) -> None:
    if config.tp < 1:
        raise ModelLoadError(f"--tp must be >= 1, got {config.tp}")
    device = rank_device(config, 0)
    if device != "cpu" and layout.local_size > torch.cuda.device_count():
        where = "" if layout.nnodes == 1 else f" on each of {layout.nnodes} nodes"
        raise ModelLoadError(
            f"--tp {config.tp} needs {layout.local_size} GPUs{where}, but "
            f"{torch.cuda.device_count()} are visible; use a smaller --tp or --device cpu")


def check_split(model_path: str, tp: int) -> None:
    """A --tp the model's heads cannot be split by is one clear error on every node, before any
    rank starts or waits for the others."""
    from litedeploy.config import ModelConfig
    from litedeploy.loader.model_loader import open_source

    ModelConfig.from_hf(open_source(model_path).hf_config).shard(tp)


def backend_for(config: EngineConfig) -> str:
    return "gloo" if rank_device(config, 0) == "cpu" else "nccl"


def spawn_local_ranks(model_path: str, config: EngineConfig,
                       layout: RankLayout) -> list[mp.Process]:
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_worker_main, daemon=True,
                        name=f"litedeploy-tp{layout.global_rank(local_rank)}",
                        args=(model_path, config, layout, local_rank))
        for local_rank in layout.spawned_local_ranks
    ]
    for process in processes:
        process.start()
    return processes


def join_group(config: EngineConfig, layout: RankLayout, local_rank: int,
                on_lost: Callable[[str], None]) -> tuple[object, Liveness]:
    """Join the process group as `local_rank` of this node; returns (control group, liveness)."""
    rank = layout.global_rank(local_rank)
    backend = backend_for(config)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    init_tensor_parallel(rank, layout.world_size, layout.init_method, backend,
                         RENDEZVOUS_TIMEOUT_S)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    liveness = Liveness(layout.master_addr, layout.master_port, rank, layout.world_size,
                        config.parallel.heartbeat_timeout_s, layout.describe, on_lost)
    return control, liveness.start()


def exit_lost(message: str) -> None:
    print(f"litedeploy: error: {message}; shutting down", file=sys.stderr, flush=True)
    os._exit(1)


def join_children(processes: list[mp.Process]) -> bool:
    """Wait for this node's child ranks to exit; True if all exited with 0."""
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():  # stuck in a collective rank 0 left (a failed start-up)
            logger.warning("tensor-parallel worker %s did not stop; terminating it",
                           process.name)
            process.terminate()
            process.join(timeout=5)
    return all(process.exitcode == 0 for process in processes)


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


def serve_ranks(model_path: str, config: EngineConfig, layout: RankLayout) -> int:
    """A process that is not rank 0: start this node's other local ranks (none under torchrun),
    run its own rank until rank 0 says stop, then end the process (exit 0 when every rank of
    this node stopped cleanly). Never returns."""
    check_tp(config, layout)
    check_split(model_path, config.tp)
    processes = spawn_local_ranks(model_path, config, layout)
    stopping = threading.Event()

    def watch() -> None:
        while not stopping.is_set():
            for process in processes:  # exit code 0: it got rank 0's "stop" first
                if process.exitcode not in (None, 0) and not stopping.is_set():
                    exit_lost(f"tensor-parallel worker {process.name} died (exit code "
                               f"{process.exitcode})")
            time.sleep(0.2)

    threading.Thread(target=watch, name="litedeploy-tp-watchdog", daemon=True).start()
    nodes = f"node {layout.node_rank} of {layout.nnodes}, " if layout.nnodes > 1 else ""
    print(f"litedeploy: tensor-parallel {nodes}rank {layout.rank}: following rank 0 at "
          f"{layout.master_addr}:{layout.master_port}", flush=True)
    # the rank runs in a thread so that Ctrl-C still reaches this (main) thread while the rank
    # waits inside a collective
    rank = threading.Thread(target=_run_rank, name="litedeploy-tp-rank", daemon=True,
                            args=(model_path, config, layout, layout.local_rank, stopping))
    rank.start()
    try:
        while rank.is_alive():
            rank.join(timeout=0.5)
    except KeyboardInterrupt:
        exit_lost(f"tensor-parallel rank {layout.rank} interrupted")
    code = 0 if join_children(processes) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _worker_main(model_path: str, config: EngineConfig, layout: RankLayout,
                 local_rank: int) -> None:
    """A spawned child: one local rank."""
    logging.basicConfig(level=logging.WARNING)
    _run_rank(model_path, config, layout, local_rank, threading.Event())
    # skip the interpreter's teardown: destructors of CUDA graphs and communicators have
    # nothing left to free in a process that ends here, and must not hang its exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_rank(model_path: str, config: EngineConfig, layout: RankLayout, local_rank: int,
              stopping: threading.Event) -> None:
    """Join the group, load this rank's shard, then follow rank 0's calls until "stop". Any
    error ends the process non-zero (rank 0 sees the rank go)."""
    rank = layout.global_rank(local_rank)
    liveness = None
    try:
        control, liveness = join_group(config, layout, local_rank, exit_lost)
        worker = _Worker(model_path, config, rank_device(config, local_rank), control)
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=control)
            method, args = message[0]
            if method == "stop":
                stopping.set()
                liveness.stop()
                worker.release_graphs()
                break
            with torch.inference_mode():
                getattr(worker, method)(*args)
        destroy_tensor_parallel(timeout_s=DESTROY_TIMEOUT_S)  # with rank 0's, at the same time
    except Exception as exc:  # noqa: BLE001 - report, then exit non-zero so the others see it
        if isinstance(exc, ModelLoadError) or any(part in str(exc) for part in _PEER_ERRORS):
            exit_lost(f"tensor-parallel rank {rank}: {_short(exc)}")
        traceback.print_exc()
        exit_lost(f"tensor-parallel rank {rank} failed: {type(exc).__name__}")


def _short(exc: BaseException) -> str:
    """gloo's "[/path/pair.cc:553] Connection closed by peer [addr]:port. This is typically..."
    -> "Connection closed by peer [addr]:port"."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically", 1)[0][:300]
