"""Where the tensor-parallel ranks run: one host, several nodes (--nnodes), or torchrun.

One host: this process is rank 0 and spawns ranks 1..tp-1. With `--nnodes N --node-rank R`,
each node's process is global rank R * (tp / N) and spawns the node's other local ranks; all
meet at node 0's --master-addr:--master-port. Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) each process is one rank and
nothing is spawned. Global rank 0 runs the scheduler (and serves HTTP); every other rank follows
its steps (workers.serve_ranks).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from litedeploy.config import EngineConfig
from litedeploy.errors import ModelLoadError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


@dataclass(frozen=True)
class RankLayout:
    world_size: int
    nnodes: int
    node_rank: int
    local_size: int  # ranks per node
    master_addr: str
    master_port: int
    torchrun: bool  # ranks and rendezvous from torchrun's environment; nothing is spawned
    local_rank: int = 0  # the local rank this process runs itself (0 unless under torchrun)

    @property
    def rank(self) -> int:
        """The global rank of this process (0 = the driver: scheduler and front-end)."""
        return self.global_rank(self.local_rank)

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.local_size + local_rank

    def node_of(self, rank: int) -> int:
        return rank // self.local_size

    @property
    def spawned_local_ranks(self) -> range:
        """Local ranks this process starts as child processes."""
        return range(0) if self.torchrun else range(1, self.local_size)

    @property
    def init_method(self) -> str:
        # torchrun's agent already hosts the store on MASTER_PORT: join it through env://
        return "env://" if self.torchrun else f"tcp://{self.master_addr}:{self.master_port}"

    def describe(self, rank: int) -> str:
        return f"rank {rank}" + (f" (node {self.node_of(rank)})" if self.nnodes > 1 else "")


def torchrun_env() -> dict[str, str] | None:
    """torchrun's variables when this process is one rank of a multi-process launch."""
    env = os.environ
    if not all(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    if int(env["WORLD_SIZE"]) <= 1:
        return None  # one process: --tp > 1 spawns its ranks as on one host
    return {name: env[name] for name in TORCHRUN_VARS if name in env}


def resolve_layout(config: EngineConfig) -> RankLayout | None:
    """This process's place among the ranks (None: --tp 1, a single process). Raises
    ModelLoadError with what to change for flags that cannot work together."""
    parallel = config.parallel
    parallel.validate(config.tp)
    env = torchrun_env()
    if env is not None:
        return _torchrun_layout(config, env)
    if config.tp == 1:
        return None
    addr = parallel.master_addr or "127.0.0.1"
    port = parallel.master_port if parallel.nnodes > 1 or parallel.master_addr else _free_port()
    return RankLayout(config.tp, parallel.nnodes, parallel.node_rank,
                      config.tp // parallel.nnodes, addr, port, torchrun=False)


def _torchrun_layout(config: EngineConfig, env: dict[str, str]) -> RankLayout:
    if config.parallel.nnodes > 1 or config.parallel.node_rank:
        raise ModelLoadError("under torchrun leave out --nnodes/--node-rank: torchrun's own "
                             "--nnodes/--node-rank/--nproc-per-node place the ranks")
    world_size = int(env["WORLD_SIZE"])
    if world_size != config.tp:
        raise ModelLoadError(f"torchrun started {world_size} processes (WORLD_SIZE) but --tp is "
                             f"{config.tp}; pass --tp {world_size}")
    missing = [name for name in TORCHRUN_VARS if name not in env]
    if missing:
        raise ModelLoadError(f"torchrun's environment lacks {', '.join(missing)}")
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    local_size = int(env["LOCAL_WORLD_SIZE"])
    if world_size % local_size or rank % local_size != local_rank:
        raise ModelLoadError("torchrun must start the same --nproc-per-node on every node "
                             f"(WORLD_SIZE {world_size}, LOCAL_WORLD_SIZE {local_size})")
    return RankLayout(world_size, world_size // local_size, rank // local_size, local_size,
                      env["MASTER_ADDR"], int(env["MASTER_PORT"]), torchrun=True,
                      local_rank=local_rank)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker_ranks(model_path: str | None, config: EngineConfig) -> int | None:
    """CLI hook: on a process that is not global rank 0 (node_rank > 0, or a torchrun rank > 0),
    serve the tensor-parallel ranks until rank 0 stops them, then end the process. Returns None
    on rank 0 (the command runs as usual)."""
    layout = resolve_layout(config)
    if layout is None or layout.rank == 0:
        return None
    from litedeploy.distributed.ranks import serve_ranks
    from litedeploy.model_bundle import resolve_model_path

    return serve_ranks(resolve_model_path(model_path), config, layout)
