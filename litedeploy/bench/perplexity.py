"""Perplexity of a text through the serving engine's own forward, paged KV cache included.

`python -m litedeploy.bench.perplexity [MODEL] [--text FILE] [--output-json F]` compares the model
as it is served in five forms: float32 weights, int8 weights (our per-channel int8 of the float32
weights), the file's weights kept as they load by default (GGUF Q4_0/Q4_1/Q8_0 -> int4/int8),
and the float32 model with an int8 or int4 KV cache (`--quant-policy 8|4`).

The text goes through in chunks, each one attending to the cached K/V of the chunks before it
(through the quantized cache when the KV cache is quantized), and every position's logits score
the next token: perplexity = exp(mean negative log-likelihood).
"""

from __future__ import annotations

import argparse
import math
from importlib import resources

import torch

from litedeploy.bench.common import write_json
from litedeploy.config import EngineConfig
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.input_builder import build_host_inputs, to_device
from litedeploy.engine.scheduler import ScheduledSequence, SchedulerOutput
from litedeploy.engine.sequence import Sequence
from litedeploy.loader.quantization import quantize_linears
from litedeploy.model_bundle import ModelBundle, load_bundle

EVAL_TEXT = "eval_prose.txt"  # a few KB of plain English prose written for this project


def default_text() -> str:
    return resources.files("litedeploy.data").joinpath(EVAL_TEXT).read_text(encoding="utf-8")


@torch.inference_mode()
def perplexity(engine: LLMEngine, token_ids: list[int], chunk_len: int = 128) -> float:
    """exp(mean NLL of token_ids[1:]) with the engine's runner over its paged cache."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    seq = Sequence(-1, list(token_ids), len(token_ids), max_new_tokens=1)
    block_manager, nll, count = engine.block_manager, 0.0, 0
    targets = torch.tensor(token_ids[1:] + [0])
    try:
        for start in range(0, len(token_ids), chunk_len):
            num_new = min(chunk_len, len(token_ids) - start)
            block_manager.allocate(seq, num_new)
            host = build_host_inputs(SchedulerOutput([ScheduledSequence(seq, num_new)], []),
                                     block_manager.block_size)
            host.logits_indices = list(range(num_new))  # every position scores its next token
            logits = engine.runner.forward(to_device(host, engine.device)).float().cpu()
            seq.num_computed_tokens += num_new
            chunk_targets = targets[start:start + num_new]
            log_probs = torch.log_softmax(logits, dim=-1)
            picked = log_probs.gather(1, chunk_targets[:, None]).squeeze(1)
            if start + num_new == len(token_ids):  # the last position has no next token
                picked = picked[:-1]
            nll -= float(picked.sum())
            count += picked.numel()
    finally:
        block_manager.free(seq)
    return math.exp(nll / count)


def _engine(bundle: ModelBundle, quant_policy: int = 0) -> LLMEngine:
    # a small fixed cache: the default (a fraction of RAM on CPU) is far more than a text needs
    return LLMEngine(bundle, EngineConfig(quant_policy=quant_policy, cache_max_tokens=4096,
                                          device=bundle.device.type))


def run_variants(model: str | None, text: str, device: str = "cpu") -> dict[str, float]:
    """Perplexity of `text` under each served form of the model (see the module docstring)."""
    as_loaded = load_bundle(model, EngineConfig(device=device))
    token_ids = as_loaded.tokenizer.encode(text)
    results = {"as loaded (default)": perplexity(_engine(as_loaded), token_ids)}
    float32 = load_bundle(model, EngineConfig(device=device, dtype="float32", model_format="hf"))
    results["float32"] = perplexity(_engine(float32), token_ids)
    for bits in (8, 4):
        results[f"float32 + KV int{bits}"] = perplexity(_engine(float32, bits), token_ids)
    quantize_linears(float32.model, "int8")
    results["int8 weights"] = perplexity(_engine(float32), token_ids)
    return {"num_tokens": len(token_ids), "perplexity": results,
            "relative_to_float32": {name: value / results["float32"] - 1
                                    for name, value in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path", nargs="?", default=None,
                        help="model folder or GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: ours)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    text = open(args.text, encoding="utf-8").read() if args.text else default_text()
    result = run_variants(args.model_path, text, args.device)
    print(f"{result['num_tokens']} tokens")
    print("| model | perplexity | vs float32 |\n|---|---|---|")
    for name, value in result["perplexity"].items():
        print(f"| {name} | {value:.3f} | {100 * result['relative_to_float32'][name]:+.2f}% |")
    write_json(result, args.output_json)


if __name__ == "__main__":
    main()
