"""Vocabulary-parallel token embedding and LM head (each rank holds vocab_size / tp rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from litedeploy import kernels
from litedeploy.distributed.parallel_state import all_gather_last_dim, all_reduce, tp_state


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp_size: int = 1):
        super().__init__()
        self.num_local = vocab_size // tp_size
        self.weight = nn.Parameter(torch.empty(self.num_local, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        state = tp_state()
        if state.world_size == 1:
            return F.embedding(input_ids, self.weight)
        start = state.rank * self.num_local
        local_ids = input_ids - start
        outside = (local_ids < 0) | (local_ids >= self.num_local)
        hidden = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        hidden = hidden.masked_fill(outside[:, None], 0)
        return all_reduce(hidden)  # each token's row lives on exactly one rank


class ParallelLMHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp_size: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size // tp_size, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> full-vocabulary logits [N, vocab] (gathered across ranks)."""
        # kernels.linear is F.linear on CPU; on CUDA small batches take the Triton GEMV
        return all_gather_last_dim(kernels.linear(hidden, self.weight))
