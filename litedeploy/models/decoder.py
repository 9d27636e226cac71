"""The decoder shared by every supported architecture (Llama-style pre-norm, GQA, SwiGLU).

Architectures differ only in checkpoint names and small options (biases, tied embeddings, rope
scaling); each model file maps its checkpoint names onto this module tree.
"""

from __future__ import annotations

import torch
from torch import nn

from litedeploy.config import ModelConfig
from litedeploy.layers.attention import Attention, AttentionBackend
from litedeploy.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from litedeploy.layers.mlp import GatedMLP
from litedeploy.layers.norm import RMSNorm
from litedeploy.layers.rotary import RotaryEmbedding

# (param name suffix, shard) -> target; shards of packed params are named by their source
WeightTarget = tuple[str, str | None]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(
            layer_idx, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.qkv_bias,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, backend)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderBody(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, config.tp_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """Flat-batch forward: input_ids and positions are [num_tokens] over all sequences of a step."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, config.tp_size)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        rope_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cos, sin = self.rotary(positions, rope_lens)
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, cos, sin, backend)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ---- checkpoint mapping -------------------------------------------------------------
    def packed_shard_rows(self, param_name: str, shard: str) -> tuple[int, int]:
        """Row range [start, end) of a shard inside a packed parameter."""
        cfg = self.config
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        ranges = {
            "q": (0, q_rows),
            "k": (q_rows, q_rows + kv_rows),
            "v": (q_rows + kv_rows, q_rows + 2 * kv_rows),
            "gate": (0, cfg.intermediate_size),
            "up": (cfg.intermediate_size, 2 * cfg.intermediate_size),
        }
        return ranges[shard]

    def map_weight(
        self, name: str, tensor: torch.Tensor
    ) -> list[tuple[str, str | None, torch.Tensor]]:
        """Checkpoint tensor -> [(our param name, shard or None, tensor)]; [] to skip it."""
        if name.endswith("rotary_emb.inv_freq"):
            return []  # stale buffers of old checkpoints
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return []
        for hf_proj, (packed, shard) in _LLAMA_PACKED.items():
            if f".{hf_proj}." in name:
                return [(name.replace(hf_proj, packed), shard, tensor)]
        return [(name, None, tensor)]


    # ---- tensor parallelism --------------------------------------------------------------
    def tp_split(self, name: str) -> tuple[int, int] | None:
        """(dim, this rank's size along dim) of a checkpoint tensor under TP; None = replicated."""
        cfg = self.config
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        rules = {
            ".self_attn.q_proj.": (0, q_rows), ".self_attn.k_proj.": (0, kv_rows),
            ".self_attn.v_proj.": (0, kv_rows), ".mlp.gate_proj.": (0, cfg.intermediate_size),
            ".mlp.up_proj.": (0, cfg.intermediate_size), ".self_attn.o_proj.": (1, q_rows),
            ".mlp.down_proj.": (1, cfg.intermediate_size),
            "embed_tokens.": (0, cfg.vocab_size // cfg.tp_size),
            "lm_head.": (0, cfg.vocab_size // cfg.tp_size),
        }
        return _match_rule(name, rules)

    def tp_slice(self, name: str, rank: int) -> tuple[int, int, int] | None:
        """(dim, start, length) of rank's slice of a checkpoint tensor, or None (replicated)."""
        if self.config.tp_size == 1:
            return None
        split = self.tp_split(name)
        if split is None:
            return None
        dim, size = split
        return dim, rank * size, size


def _match_rule(name: str, rules: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    for fragment, rule in rules.items():
        if fragment in name:
            return rule
    return None


_LLAMA_PACKED: dict[str, tuple[str, str]] = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}
