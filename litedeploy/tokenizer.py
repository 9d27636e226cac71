"""One tokenizer interface over two backends.

- Hugging Face folders (`tokenizer.json`, ...) and GGUF tokenizers: a transformers tokenizer.
- InternLM2 folders (`tokenizer.model`): SentencePiece directly, so no remote code runs. Its six chat
  tokens are placeholder pieces (`[UNUSED_TOKEN_141]`..`146]`) inside the SentencePiece model, so we
  split text on their `<|...|>` names and map them to ids ourselves.

BOS is handled here, never by the backend: `encode(add_bos=True)` yields exactly one BOS.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from litedeploy.errors import ModelLoadError

HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")

# name -> SentencePiece placeholder piece, as in InternLM2's tokenizer.model.
INTERNLM2_SPECIAL_PIECES = {
    "<|plugin|>": "[UNUSED_TOKEN_141]",
    "<|interpreter|>": "[UNUSED_TOKEN_142]",
    "<|action_end|>": "[UNUSED_TOKEN_143]",
    "<|action_start|>": "[UNUSED_TOKEN_144]",
    "<|im_end|>": "[UNUSED_TOKEN_145]",
    "<|im_start|>": "[UNUSED_TOKEN_146]",
}


class _Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


@dataclass
class Tokenizer:
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool
    special_token_ids: frozenset[int]
    chat_template: str | None
    hf_tokenizer: Any = field(repr=False)  # transformers tokenizer; None for pure SentencePiece
    bos_token: str | None  # BOS as text ("<s>"), so templates that write it aren't doubled
    eos_token: str | None
    _backend: _Backend = field(repr=False)

    @classmethod
    def from_folder(cls, path: str, hf_config: dict) -> Tokenizer:
        folder = Path(path)
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        if (folder / "tokenizer.model").is_file() and _is_internlm2(hf_config, tok_cfg):
            return _sentencepiece_tokenizer(folder, hf_config, tok_cfg)
        if not any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
            raise ModelLoadError(
                f"no tokenizer found in {folder}: looked for {', '.join(HF_TOKENIZER_FILES)}. "
                "Copy the tokenizer files of the model into this folder."
            )
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:  # transformers raises many types; one message for the user
            raise ModelLoadError(f"cannot load the tokenizer in {folder}: {exc}") from exc
        return cls.from_hf(hf, hf_config, tok_cfg)

    @classmethod
    def from_hf(
        cls, hf_tokenizer: Any, hf_config: dict, tokenizer_config: dict | None = None
    ) -> Tokenizer:
        hf = hf_tokenizer
        bos_id = (
            hf.bos_token_id if hf.bos_token_id is not None else _first(hf_config, "bos_token_id")
        )
        eos_id = (
            hf.eos_token_id if hf.eos_token_id is not None else _first(hf_config, "eos_token_id")
        )
        special = set(hf.all_special_ids)
        special |= {i for i, tok in hf.added_tokens_decoder.items() if tok.special}
        template = hf.chat_template
        if isinstance(template, dict):  # named templates: serve the default one
            template = template.get("default")
        return cls(
            vocab_size=len(hf),
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            add_bos=_hf_add_bos(hf, hf_config, tokenizer_config or {}, bos_id),
            special_token_ids=frozenset(special),
            chat_template=template,
            hf_tokenizer=hf,
            bos_token=_id_to_text(hf, bos_id),
            eos_token=_id_to_text(hf, eos_id),
            _backend=_HFBackend(hf),
        )

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._backend.encode(text)
        add_bos = self.add_bos if add_bos is None else add_bos
        # The text may already start with the BOS string (templates that write `bos_token`).
        if add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        """The id of `text` if it is a single token (e.g. "<|im_end|>"), else None."""
        if not text:
            return None
        ids = self._backend.encode(text)
        if len(ids) == 1 and self.decode(ids, skip_special_tokens=False) == text:
            return ids[0]
        return None


class _HFBackend:
    def __init__(self, hf: Any) -> None:
        self.hf = hf
        # A Rust tokenizer used from two threads at once (engine step thread decoding, front-end
        # encoding) can fail with "Already borrowed"; calls are short, so serialize them.
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor BOS/EOS; Tokenizer.encode adds BOS itself.
        with self._lock:
            return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # No clean-up of spaces: it would make a window's decode disagree with the full decode.
        with self._lock:
            return self.hf.decode(
                ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
            )


class _SentencePieceBackend:
    """SentencePiece plus a table of special tokens that are split out of the text by name."""

    def __init__(self, sp: Any, special_tokens: dict[str, int]) -> None:
        self.sp = sp
        self.num_pieces = sp.get_piece_size()
        self.special_tokens = special_tokens
        self.special_text = {token_id: text for text, token_id in special_tokens.items()}
        names = sorted(special_tokens, key=len, reverse=True)  # longest first wins
        self._split = re.compile("(" + "|".join(re.escape(name) for name in names) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        # re.split with one group: odd positions are the special tokens themselves.
        for index, part in enumerate(self._split.split(text)):
            if index % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Each run between special tokens is decoded on its own, mirroring encode, which gives
        # every run its own SentencePiece dummy-prefix space.
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            special = self.special_text.get(token_id)
            if special is None:
                if 0 <= token_id < self.num_pieces:  # ids past the vocab (padded embeddings): ""
                    run.append(token_id)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if not skip_special_tokens:
                out.append(special)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)


def _sentencepiece_tokenizer(folder: Path, hf_config: dict, tok_cfg: dict) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError on a bad file
        raise ModelLoadError(f"cannot read {folder / 'tokenizer.model'}: {exc}") from exc
    special_tokens, special_ids = _sentencepiece_specials(sp, tok_cfg)
    bos_id = sp.bos_id() if sp.bos_id() >= 0 else _first(hf_config, "bos_token_id")
    eos_id = sp.eos_id() if sp.eos_id() >= 0 else _first(hf_config, "eos_token_id")
    backend = _SentencePieceBackend(sp, special_tokens)
    add_bos = hf_config.get("add_bos_token")
    if add_bos is None:
        add_bos = tok_cfg.get("add_bos_token", True)
    return Tokenizer(
        vocab_size=max([sp.get_piece_size(), *(i + 1 for i in special_tokens.values())]),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        add_bos=bool(add_bos),
        special_token_ids=frozenset(special_ids),
        chat_template=_folder_chat_template(folder, tok_cfg),
        hf_tokenizer=None,
        bos_token=backend.special_text.get(bos_id) if bos_id is not None else None,
        eos_token=backend.special_text.get(eos_id) if eos_id is not None else None,
        _backend=backend,
    )


def _sentencepiece_specials(sp: Any, tok_cfg: dict) -> tuple[dict[str, int], set[int]]:
    """name -> id for every token split out of text by name, and the ids that are special."""
    tokens: dict[str, int] = {}
    for token_id in (sp.unk_id(), sp.bos_id(), sp.eos_id()):  # <unk>, <s>, </s>
        if token_id >= 0:
            tokens[sp.id_to_piece(token_id)] = token_id
    special_ids = set(tokens.values())
    for name, piece in INTERNLM2_SPECIAL_PIECES.items():
        piece_id = sp.piece_to_id(piece)
        if piece_id != sp.unk_id():
            tokens[name] = piece_id
            special_ids.add(piece_id)
    # tokenizer_config.json names the real ids; it wins over the placeholder lookup.
    for id_text, entry in tok_cfg.get("added_tokens_decoder", {}).items():
        tokens[entry["content"]] = int(id_text)
        if entry.get("special", True):
            special_ids.add(int(id_text))
    return tokens, special_ids


def _hf_add_bos(hf: Any, hf_config: dict, tok_cfg: dict, bos_id: int | None) -> bool:
    if bos_id is None:
        return False
    for source in (hf_config.get("add_bos_token"), tok_cfg.get("add_bos_token")):
        if source is not None:
            return bool(source)
    # Otherwise do what the tokenizer's own post-processor does (Llama 3 adds it, Qwen2 doesn't).
    probe = hf.encode("a", add_special_tokens=True)
    return bool(probe) and probe[0] == bos_id


def _is_internlm2(hf_config: dict, tok_cfg: dict) -> bool:
    architectures = hf_config.get("architectures") or []
    return (
        str(tok_cfg.get("tokenizer_class", "")).startswith("InternLM2Tokenizer")
        or "InternLM2ForCausalLM" in architectures
        or hf_config.get("model_type") == "internlm2"
    )


def _folder_chat_template(folder: Path, tok_cfg: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        return named.get("default")
    return template


def _id_to_text(hf: Any, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    token = hf.convert_ids_to_tokens(token_id)
    return token if isinstance(token, str) else None


def _first(config: dict, key: str) -> int | None:
    value = config.get(key)
    if isinstance(value, list):  # e.g. generation eos_token_id: [2, 92542]
        return value[0] if value else None
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
