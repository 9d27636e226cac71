"""Rank 0's model runner under tensor parallelism: broadcast the step, then run its own shard."""

from __future__ import annotations

import torch

from litedeploy.distributed.workers import WorkerGroup, release_cuda_graphs
from litedeploy.engine.input_builder import HostStepInputs, build_host_inputs
from litedeploy.engine.model_runner import ModelRunner
from litedeploy.engine.scheduler import SchedulerOutput


class TPModelRunner:
    def __init__(self, runner: ModelRunner, workers: WorkerGroup):
        self.runner = runner
        self.workers = workers
        workers.before_close.append(lambda: release_cuda_graphs(runner))

    @property
    def kv_cache(self):
        return self.runner.kv_cache

    @property
    def graphs(self):
        return self.runner.graphs

    @property
    def block_size(self) -> int:
        return self.runner.block_size

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> torch.Tensor:
        host = build_host_inputs(batch, self.runner.block_size)
        self.workers.call("run_host", host)  # every rank runs the same step on its shard
        return self.runner.run_host(host)

    @torch.inference_mode()
    def run_burst(self, host: HostStepInputs, num_steps: int) -> list[list[int]]:
        """Multi-step decoding: every rank runs the same greedy steps (one broadcast for all)."""
        self.workers.call("run_burst", host, num_steps)
        return self.runner.run_burst(host, num_steps)
