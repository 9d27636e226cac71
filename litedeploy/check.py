"""`litedeploy check`: proof that a model runs correctly here, against transformers.

Both load the model in float32 on the same device. The prompts' token ids come from our tokenizer
and feed both models, so each row tests one thing:
- tokenizer: our ids for the prompts equal transformers' tokenizer's;
- chat template: our rendering of a short conversation (tokens) equals `apply_chat_template`;
- special tokens: same BOS; every end-of-sequence id transformers knows stops our generation;
- logits: every position of every prompt through the serving engine (paged KV cache), max abs
  and relative error against transformers' forward;
- greedy tokens: the engine's greedy continuations equal transformers' `generate`;
- perplexity (quantized models only): the model as it loads (int4/int8) against its own float32
  form on our bundled prose; the float32 form is what the rows above compare, since a quantized
  model is not expected to reproduce float tokens.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.input_builder import build_host_inputs, to_device
from litedeploy.engine.scheduler import ScheduledSequence, SchedulerOutput
from litedeploy.engine.sequence import Sequence
from litedeploy.loader.model_loader import ModelSource, open_source, resolve_device
from litedeploy.loader.quantization import plan_quantization
from litedeploy.model_bundle import ModelBundle, load_bundle, resolve_model_path

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
)
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello! Who are you?"},
        {"role": "assistant", "content": "I am an assistant."},
        {"role": "user", "content": "Tell me a joke."}]
_CACHE_TOKENS = 4096  # a small KV cache: a check needs a few hundred tokens


@dataclass
class CheckConfig:
    model_path: str | None
    reference_path: str | None = None  # a transformers folder with the same weights
    device: str = "auto"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 16
    rtol: float = 1e-3  # max |ours - theirs| / max |theirs| allowed on float32 logits
    max_ppl_increase: float = 0.10  # quantized: allowed relative perplexity rise over float32
    trust_remote_code: bool = False


@dataclass
class CheckRow:
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str
    metrics: dict = field(default_factory=dict)


@dataclass
class CheckReport:
    model: str
    device: str
    quantized: bool
    rows: list[CheckRow]

    @property
    def passed(self) -> bool:
        return all(row.status != "fail" for row in self.rows)

    def to_json(self) -> dict:
        return {"model": self.model, "device": self.device, "quantized": self.quantized,
                "passed": self.passed, "rows": [asdict(row) for row in self.rows]}

    def table(self) -> str:
        width = max(len(row.name) for row in self.rows)
        lines = [f"litedeploy check {self.model} on {self.device}"
                 + (" (quantized: compared through its float32 form)" if self.quantized else "")]
        lines += [f"  {row.status.upper():<4}  {row.name:<{width}}  {row.detail}"
                  for row in self.rows]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def run_check(config: CheckConfig) -> CheckReport:
    path = resolve_model_path(config.model_path)
    source = open_source(path)
    device = resolve_device(config.device)
    quantized = plan_quantization(source, None) is not None
    ours = load_bundle(path, EngineConfig(device=device.type, dtype="float32",
                                          model_format="hf" if quantized else None))
    engine = LLMEngine(ours, EngineConfig(device=device.type, cache_max_tokens=_CACHE_TOKENS))
    rows: list[CheckRow] = []
    # a quantized model's perplexity row loads it again and reads a few pages: minutes on a CPU
    bar = tqdm(total=6 if quantized else 5, desc="litedeploy check", unit="check",
               disable=not sys.stderr.isatty(), leave=False)

    def add(row: CheckRow) -> None:
        rows.append(row)
        bar.set_postfix_str(row.name)
        bar.update()

    try:
        hf_tokenizer, reason = _reference_tokenizer(source, config)
        prompts = [ours.tokenizer.encode(text) for text in config.prompts]
        add(_tokenizer_row(ours, hf_tokenizer, reason, config.prompts))
        add(_template_row(ours, engine, hf_tokenizer, reason))
        reference, reason = _reference_model(source, config, device)
        add(_special_tokens_row(ours, hf_tokenizer, reference))
        if reference is None:
            add(CheckRow("reference", "fail", f"transformers could not load the model: {reason}"))
        else:
            add(_logits_row(engine, reference, prompts, config.rtol))
            add(_greedy_row(engine, reference, prompts, config.max_new_tokens))
        if quantized:
            add(_perplexity_row(path, engine, device, config.max_ppl_increase))
    finally:
        bar.close()
        engine.close()
    return CheckReport(ours.name, str(device), quantized, rows)


# ---- references ------------------------------------------------------------------------------
def _hf_location(source: ModelSource, reference_path: str | None) -> tuple[str, dict]:
    """from_pretrained's folder and extra arguments (a GGUF file is read dequantized)."""
    if reference_path:
        return resolve_model_path(reference_path), {}
    if source.is_gguf:
        return str(source.path.parent), {"gguf_file": source.path.name}
    return str(source.path), {}


def _remote_code_hint(source: ModelSource, config: CheckConfig) -> str:
    if source.hf_config.get("auto_map") and not config.trust_remote_code:
        return (" (this model's transformers code ships with it: add --trust-remote-code, or "
                "--reference DIR of a transformers model with the same weights)")
    return ""


def _reference_tokenizer(source: ModelSource, config: CheckConfig):
    from transformers import AutoTokenizer

    folder, extra = _hf_location(source, None)  # the model's own tokenizer, even with --reference
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=config.trust_remote_code, **extra)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types; the row says which
        hint = _remote_code_hint(source, config)
        return None, f"{type(exc).__name__}: {_first_line(exc)}{hint}"
    return tokenizer, ""


def _reference_model(source: ModelSource, config: CheckConfig, device: torch.device):
    from transformers import AutoModelForCausalLM

    folder, extra = _hf_location(source, config.reference_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=config.trust_remote_code, **extra)
    except Exception as exc:  # noqa: BLE001 - as above
        hint = "" if config.reference_path else _remote_code_hint(source, config)
        return None, f"{type(exc).__name__}: {_first_line(exc)}{hint}"
    return model.to(device).eval(), ""


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


# ---- rows ------------------------------------------------------------------------------------
def _tokenizer_row(ours: ModelBundle, hf_tokenizer, reason: str,
                   texts: tuple[str, ...]) -> CheckRow:
    if hf_tokenizer is None:
        return CheckRow("tokenizer", "skip", f"transformers could not load it: {reason}")
    for text in texts:
        mine, theirs = ours.tokenizer.encode(text), hf_tokenizer(text)["input_ids"]
        if mine != theirs:
            return CheckRow("tokenizer", "fail", f"{text!r}: ours {_first_diff(mine, theirs)}")
    return CheckRow("tokenizer", "pass", f"{len(texts)} prompts: identical ids")


def _template_row(ours: ModelBundle, engine: LLMEngine, hf_tokenizer, reason: str) -> CheckRow:
    from litedeploy.chat.prompt import PromptEncoder

    encoder = PromptEncoder.for_engine(engine)  # also adds end-of-turn stops, as served
    if hf_tokenizer is None:
        return CheckRow("chat template", "skip", f"transformers could not load it: {reason}")
    if not getattr(hf_tokenizer, "chat_template", None):
        return CheckRow("chat template", "skip", "the model ships no chat template; ours: "
                        f"{encoder.template.name if encoder.template else 'none'}")
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    theirs = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    mine = encoder.encode(CHAT)
    if mine != theirs:
        return CheckRow("chat template", "fail", f"ours {_first_diff(mine, theirs)}")
    return CheckRow("chat template", "pass", f"{len(CHAT)} messages: identical {len(mine)} ids")


def _special_tokens_row(ours: ModelBundle, hf_tokenizer, reference) -> CheckRow:
    theirs: set[int] = set()
    if reference is not None and reference.generation_config.eos_token_id is not None:
        eos = reference.generation_config.eos_token_id
        theirs.update(eos if isinstance(eos, list) else [eos])
    if hf_tokenizer is not None and hf_tokenizer.eos_token_id is not None:
        theirs.add(hf_tokenizer.eos_token_id)
    metrics = {"our_stop_ids": sorted(ours.stop_token_ids), "reference_eos_ids": sorted(theirs)}
    missing = theirs - set(ours.stop_token_ids)
    if missing:
        return CheckRow("special tokens", "fail", f"eos ids {sorted(missing)} do not stop our "
                        f"generation (ours stop at {sorted(ours.stop_token_ids)})", metrics)
    their_bos = getattr(hf_tokenizer, "bos_token_id", None) if hf_tokenizer else None
    if hf_tokenizer is not None and their_bos != ours.tokenizer.bos_token_id:
        return CheckRow("special tokens", "fail", f"bos: ours {ours.tokenizer.bos_token_id}, "
                        f"transformers {their_bos}", metrics)
    if not theirs:
        return CheckRow("special tokens", "skip", "no reference eos ids to compare", metrics)
    return CheckRow("special tokens", "pass", f"bos {ours.tokenizer.bos_token_id}; stop ids "
                    f"{sorted(ours.stop_token_ids)} include eos {sorted(theirs)}", metrics)


def _logits_row(engine: LLMEngine, reference, prompts: list[list[int]], rtol: float) -> CheckRow:
    max_abs, max_rel, agree, total = 0.0, 0.0, 0, 0
    for ids in prompts:
        mine = engine_logits(engine, ids)
        with torch.inference_mode():
            theirs = reference(torch.tensor([ids], device=reference.device)).logits[0]
        theirs = theirs.float().cpu()[:, :mine.shape[1]]
        diff = float((mine - theirs).abs().max())
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(theirs.abs().max()), 1e-12))
        agree += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
    metrics = {"max_abs_error": max_abs, "max_relative_error": max_rel,
               "argmax_agreement": agree / total, "positions": total}
    detail = (f"{total} positions: max abs {max_abs:.2e}, relative {max_rel:.2e} "
              f"(limit {rtol:.0e}), argmax agrees {agree}/{total}")
    return CheckRow("logits", "pass" if max_rel <= rtol else "fail", detail, metrics)


def _greedy_row(engine: LLMEngine, reference, prompts: list[list[int]],
                num_tokens: int) -> CheckRow:
    mine = engine_greedy(engine, prompts, num_tokens)
    diverged = []
    for index, (ids, tokens) in enumerate(zip(prompts, mine)):
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([ids], device=reference.device), max_new_tokens=num_tokens,
                min_new_tokens=num_tokens, do_sample=False, temperature=None, top_p=None,
                top_k=None, eos_token_id=None, pad_token_id=0)
        theirs = out[0, len(ids):].tolist()
        if tokens != theirs:
            at = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b),
                      min(len(tokens), len(theirs)))
            diverged.append(f"prompt {index + 1} diverges at token {at + 1}")
    metrics = {"prompts": len(prompts), "tokens_each": num_tokens, "diverged": diverged}
    if diverged:
        return CheckRow("greedy tokens", "fail", "; ".join(diverged), metrics)
    return CheckRow("greedy tokens", "pass", f"{len(prompts)} prompts x {num_tokens} tokens: "
                    "identical", metrics)


def _perplexity_row(path: str, float_engine: LLMEngine, device: torch.device,
                    max_increase: float) -> CheckRow:
    from litedeploy.bench.perplexity import default_text, perplexity

    ids = float_engine.tokenizer.encode(default_text())
    base = perplexity(float_engine, ids)
    quant = load_bundle(path, EngineConfig(device=device.type))  # as it loads by default
    quant_engine = LLMEngine(quant, EngineConfig(device=device.type,
                                                 cache_max_tokens=_CACHE_TOKENS))
    try:
        value = perplexity(quant_engine, ids)
    finally:
        quant_engine.close()
    increase = value / base - 1
    metrics = {"perplexity_float32": base, "perplexity_as_loaded": value,
               "relative_increase": increase, "num_tokens": len(ids)}
    detail = (f"{len(ids)} tokens of our prose: {value:.3f} as loaded vs {base:.3f} float32 "
              f"({100 * increase:+.2f}%, limit +{100 * max_increase:.0f}%)")
    ok = math.isfinite(value) and increase <= max_increase
    return CheckRow("perplexity", "pass" if ok else "fail", detail, metrics)


def _first_diff(mine: list[int], theirs: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b),
              min(len(mine), len(theirs)))
    return (f"{mine[at:at + 4]} vs transformers {theirs[at:at + 4]} at position {at} "
            f"(lengths {len(mine)} / {len(theirs)})")


# ---- the engine's side -------------------------------------------------------------------------
@torch.inference_mode()
def engine_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Every position's logits through the engine's runner and paged KV cache: [n, vocab]."""
    seq = Sequence(-1, list(token_ids), len(token_ids), max_new_tokens=1)
    engine.block_manager.allocate(seq, len(token_ids))
    try:
        host = build_host_inputs(SchedulerOutput([ScheduledSequence(seq, len(token_ids))], []),
                                 engine.block_manager.block_size)
        host.logits_indices = list(range(len(token_ids)))
        return engine.runner.forward(to_device(host, engine.device)).float().cpu()
    finally:
        engine.block_manager.free(seq)


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Greedy continuations of all prompts in one batch, as the engine serves them."""
    gen = GenerationConfig(max_new_tokens=num_tokens, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for index, ids in enumerate(prompts):
        engine.add_request(f"check-{index}", ids, gen)
        tokens[f"check-{index}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[f"check-{index}"] for index in range(len(prompts))]
