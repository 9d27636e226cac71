"""The reference generation path: plain, batched, obviously right.

One contiguous K/V cache per sequence, every step recomputes nothing and pages nothing. The serving
engine must reproduce this path token for token; tests use it as the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from litedeploy.config import GenerationConfig
from litedeploy.engine.sampler import Sampler, SamplingRow
from litedeploy.models.decoder import DecoderForCausalLM


class ContiguousKVBackend:
    """Attention backend keeping each sequence's K/V as growing tensors, one list per layer."""

    def __init__(self, num_layers: int, num_seqs: int):
        self.keys = [[None] * num_seqs for _ in range(num_layers)]
        self.values = [[None] * num_seqs for _ in range(num_layers)]
        self.active: list[int] = []  # sequence indices of this step, in batch order
        self.q_lens: list[int] = []

    def set_step(self, active: list[int], q_lens: list[int]) -> None:
        self.active, self.q_lens = active, q_lens

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        outputs = []
        for seq, q_seq, k_seq, v_seq in zip(
            self.active, q.split(self.q_lens), k.split(self.q_lens), v.split(self.q_lens)
        ):
            past_k, past_v = self.keys[layer_idx][seq], self.values[layer_idx][seq]
            keys = k_seq if past_k is None else torch.cat([past_k, k_seq])
            values = v_seq if past_v is None else torch.cat([past_v, v_seq])
            self.keys[layer_idx][seq], self.values[layer_idx][seq] = keys, values
            q_len, kv_len = q_seq.shape[0], keys.shape[0]
            # causal with an offset: query i sits at position kv_len - q_len + i
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
            out = F.scaled_dot_product_attention(
                q_seq.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=mask, enable_gqa=q_seq.shape[1] != keys.shape[1],
            )
            outputs.append(out.transpose(0, 1))
        return torch.cat(outputs)


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    text: str | None = None


def sampling_row(gen: GenerationConfig, prompt: list[int], output: list[int],
                 stop_ids: set[int]) -> SamplingRow:
    below_min = gen.min_new_tokens is not None and len(output) < gen.min_new_tokens
    return SamplingRow(
        greedy=gen.is_greedy,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        min_p=gen.min_p,
        repetition_penalty=gen.repetition_penalty,
        presence_penalty=gen.presence_penalty,
        frequency_penalty=gen.frequency_penalty,
        seed=gen.random_seed,
        step=len(output),
        prompt_token_ids=prompt,
        output_token_ids=output,
        suppressed_token_ids=sorted(stop_ids) if below_min else (),
        num_logprobs=gen.logprobs,
        logit_bias=sorted((gen.logit_bias or {}).items()),
    )


@torch.inference_mode()
def generate(
    model: DecoderForCausalLM,
    prompts: list[list[int]],
    gen: GenerationConfig,
    stop_token_ids: set[int] = frozenset(),
    tokenizer=None,
) -> list[ReferenceOutput]:
    """Generate for a batch of token-id prompts; stop strings need `tokenizer`."""
    device = next(model.parameters()).device
    backend = ContiguousKVBackend(model.config.num_layers, len(prompts))
    sampler = Sampler(device)
    stop_ids = set() if gen.ignore_eos else set(stop_token_ids) | set(gen.stop_token_ids or ())
    outputs: list[list[int]] = [[] for _ in prompts]
    results: list[ReferenceOutput | None] = [None] * len(prompts)
    max_new = gen.max_new_tokens or 512
    while any(r is None for r in results):
        active = [i for i, r in enumerate(results) if r is None]
        chunks = [prompts[i] if not outputs[i] else outputs[i][-1:] for i in active]
        starts = [0 if not outputs[i] else len(prompts[i]) + len(outputs[i]) - 1 for i in active]
        q_lens = [len(c) for c in chunks]
        backend.set_step(active, q_lens)
        input_ids = torch.tensor([t for c in chunks for t in c], device=device)
        positions = torch.tensor(
            [s + j for s, n in zip(starts, q_lens) for j in range(n)], device=device
        )
        rope_lens = torch.tensor(
            [s + n for s, n in zip(starts, q_lens) for _ in range(n)], device=device
        )
        hidden = model(input_ids, positions, backend, rope_lens)
        last_rows = torch.tensor(q_lens, device=device).cumsum(0) - 1
        logits = model.compute_logits(hidden[last_rows])
        rows = [sampling_row(gen, prompts[i], outputs[i], stop_ids) for i in active]
        for i, sampled in zip(active, sampler(logits, rows)):
            outputs[i].append(sampled.token_id)
            results[i] = _finish(outputs[i], sampled.token_id, stop_ids, gen, max_new, tokenizer)
    return [r for r in results if r is not None]


def _finish(output: list[int], token_id: int, stop_ids: set[int], gen: GenerationConfig,
            max_new: int, tokenizer) -> ReferenceOutput | None:
    if token_id in stop_ids:
        text = tokenizer.decode(output[:-1]) if tokenizer else None
        return ReferenceOutput(output[:-1], "stop", text)
    if gen.stop_words and tokenizer is not None:
        text = tokenizer.decode(output, skip_special_tokens=gen.skip_special_tokens)
        for word in gen.stop_words:
            if word in text:
                return ReferenceOutput(list(output), "stop", text[: text.index(word)])
    if len(output) >= max_new:
        text = tokenizer.decode(output, skip_special_tokens=gen.skip_special_tokens) if tokenizer else None
        return ReferenceOutput(list(output), "length", text)
    return None
