"""InternLM2 / InternLM2.5: Llama with renamed tensors and a packed, interleaved wqkv."""

from __future__ import annotations

import torch

from litedeploy.errors import ModelLoadError
from litedeploy.models.decoder import DecoderForCausalLM, _match_rule

_RENAMES = (
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    ("output.weight", "lm_head.weight"),
)
_GATE_UP = {".feed_forward.w1.": "gate", ".feed_forward.w3.": "up"}


class InternLM2ForCausalLM(DecoderForCausalLM):
    def map_weight(
        self, name: str, tensor: torch.Tensor
    ) -> list[tuple[str, str | None, torch.Tensor]]:
        if ".attention.wqkv." in name:
            target = name.replace(".attention.wqkv.", ".self_attn.qkv_proj.")
            q, k, v = self.split_wqkv(name, tensor)
            return [(target, "q", q), (target, "k", k), (target, "v", v)]
        for hf_part, shard in _GATE_UP.items():
            if hf_part in name:
                return [(name.replace(hf_part, ".mlp.gate_up_proj."), shard, tensor)]
        for old, new in _RENAMES:
            if name.startswith(old) or old.startswith(".") and old in name:
                name = name.replace(old, new)
                break
        return super().map_weight(name, tensor)

    def tp_split(self, name: str) -> tuple[int, int] | None:
        cfg = self.config
        q_rows = cfg.num_heads * cfg.head_dim
        # wqkv rows are grouped per KV head, so a rank's KV groups are one contiguous row range
        wqkv_rows = cfg.num_kv_heads * (cfg.q_per_kv + 2) * cfg.head_dim
        rules = {
            ".attention.wqkv.": (0, wqkv_rows), ".feed_forward.w1.": (0, cfg.intermediate_size),
            ".feed_forward.w3.": (0, cfg.intermediate_size), ".attention.wo.": (1, q_rows),
            ".feed_forward.w2.": (1, cfg.intermediate_size),
            "tok_embeddings.": (0, cfg.vocab_size // cfg.tp_size),
            "output.": (0, cfg.vocab_size // cfg.tp_size),
        }
        return _match_rule(name, rules)

    def split_wqkv(
        self, name: str, wqkv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows are grouped per KV head as (kv_heads, q_per_kv + 2, head_dim): the group's query
        heads, then its key head, then its value head. A plain [q|k|v] split scrambles heads."""
        cfg = self.config
        rows_expected = cfg.num_kv_heads * (cfg.q_per_kv + 2) * cfg.head_dim
        if wqkv.shape[0] != rows_expected:
            raise ModelLoadError(
                f"shape mismatch for {name}: {tuple(wqkv.shape)}, expected {rows_expected} rows "
                f"(num_kv_heads {cfg.num_kv_heads} x (q_per_kv {cfg.q_per_kv} + 2) x head_dim "
                f"{cfg.head_dim})"
            )
        grouped = wqkv.view(cfg.num_kv_heads, cfg.q_per_kv + 2, cfg.head_dim, *wqkv.shape[1:])
        q = grouped[:, : cfg.q_per_kv].reshape(-1, *wqkv.shape[1:])
        k = grouped[:, -2].reshape(-1, *wqkv.shape[1:])
        v = grouped[:, -1].reshape(-1, *wqkv.shape[1:])
        return q, k, v
