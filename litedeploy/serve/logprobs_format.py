"""Logprobs in /v1/completions: bytes-faithful token texts, echoed prompt tokens, vLLM's
`prompt_logprobs`.

A token that holds part of a UTF-8 character (a byte-fallback piece, a split byte-level BPE
character) decodes to U+FFFD on its own. Like OpenAI, such a token is shown as `bytes:\\xe4\\xb8`
with its real bytes, so the tokens of a reply still add up to its exact bytes.
"""

from __future__ import annotations

import codecs
import functools
import re
from typing import Any

from litedeploy.engine.prompt_logprobs import PromptLogprob
from litedeploy.engine.sampler import SampledToken
from litedeploy.serve import protocol as p

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


class TokenTexts:
    """Token id -> its text and raw bytes, cached per server (one tokenizer)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def text(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def raw(self, token_id: int) -> bytes:
        return self._entry(token_id)[1]

    def _entry(self, token_id: int) -> tuple[str, bytes]:
        entry = self._cache.get(token_id)
        if entry is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            piece = _piece(self.tokenizer, token_id)
            if piece and "\u2581" in piece and not _BYTE_PIECE.fullmatch(piece):
                # SentencePiece: a lone token decodes without its word-leading space
                text = piece.replace("\u2581", " ")
            raw = text.encode("utf-8")
            piece_raw = _piece_bytes(piece) if "\ufffd" in text else None
            if piece_raw is not None:  # part of a character: the bytes the piece stands for
                raw = piece_raw
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)
            entry = self._cache[token_id] = (text, raw)
        return entry



def _piece_bytes(piece: str | None) -> bytes | None:
    """The bytes a byte-fallback piece (`<0xE4>`) or a byte-level BPE piece stands for."""
    if not piece:
        return None
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    decoder = _byte_level_decoder()
    if all(char in decoder for char in piece):
        return bytes(decoder[char] for char in piece)
    return None


_TEXTS: dict[int, TokenTexts] = {}


def token_texts(tokenizer: Any) -> TokenTexts:
    """The cache of this tokenizer (one per served model)."""
    texts = _TEXTS.get(id(tokenizer))
    if texts is None or texts.tokenizer is not tokenizer:
        texts = _TEXTS[id(tokenizer)] = TokenTexts(tokenizer)
    return texts


def _piece(tokenizer: Any, token_id: int) -> str | None:
    """The vocabulary entry of a token (before decoding), from whichever backend holds it."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return hf.convert_ids_to_tokens(token_id)
    sp = getattr(getattr(tokenizer, "_backend", None), "sp", None)
    if sp is not None and 0 <= token_id < sp.get_piece_size():
        return sp.id_to_piece(token_id)
    return None


class _Offsets:
    """Character offsets into the text the tokens spell, byte-exact across split characters."""

    def __init__(self, start: int):
        self.offset = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, raw: bytes) -> int:
        here = self.offset
        self.offset += len(self._decoder.decode(raw))
        return here


def completion_logprobs(texts: TokenTexts, prompt_ids: list[int] | None,
                        prompt: list[PromptLogprob | None] | None,
                        sampled: list[SampledToken] | None,
                        text_offset: int) -> p.CompletionLogprobs | None:
    """OpenAI's completions logprobs: the echoed prompt tokens (when `prompt` is given; the first
    has None) then the generated ones. A prompt token's top dict includes the token itself."""
    if sampled is None and prompt is None:
        return None
    result = p.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offsets = _Offsets(text_offset)

    def add(token_id: int, logprob: float | None, top: dict[str, float] | None) -> None:
        result.tokens.append(texts.text(token_id))
        result.token_logprobs.append(logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offsets.advance(texts.raw(token_id)))

    for token_id, entry in zip(prompt_ids or (), prompt or ()):
        if entry is None:
            add(token_id, None, None)
            continue
        top = {texts.text(i): lp for i, lp in entry.top_logprobs}
        top[texts.text(token_id)] = entry.logprob
        add(token_id, entry.logprob, top)
    for token in sampled or ():
        top = {texts.text(i): lp for i, lp in token.top_logprobs or ()}
        add(token.token_id, token.logprob if token.logprob is not None else 0.0, top)
    return result


def vllm_prompt_logprobs(texts: TokenTexts, prompt_ids: list[int],
                         prompt: list[PromptLogprob | None] | None,
                         ) -> list[dict[str, p.PromptLogprobEntry] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token {id: {logprob, rank, decoded_token}} for the
    token itself and the top ones; None for the first token."""
    if prompt is None:
        return None
    out: list[dict[str, p.PromptLogprobEntry] | None] = []
    for token_id, entry in zip(prompt_ids, prompt):
        if entry is None:
            out.append(None)
            continue
        ranked = {i: p.PromptLogprobEntry(logprob=lp, rank=rank, decoded_token=texts.text(i))
                  for rank, (i, lp) in enumerate(entry.top_logprobs, start=1)}
        ranked[token_id] = p.PromptLogprobEntry(logprob=entry.logprob, rank=entry.rank,
                                                decoded_token=texts.text(token_id))
        out.append({str(i): value for i, value in ranked.items()})
    return out


def completion_choice(tokenizer: Any, body: p.CompletionRequest, index: int,
                      prompt_ids: list[int], echo: str, text: str,
                      sampled: list[SampledToken] | None, final: Any) -> p.CompletionChoice:
    """One non-streamed /v1/completions choice; `final` is its last RequestOutput."""
    texts = token_texts(tokenizer)
    prompt = final.prompt_logprobs
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(texts, prompt_ids, prompt if body.echo else None,
                                       sampled or [], 0)
    wanted = body.prompt_logprobs is not None
    return p.CompletionChoice(
        index=index, text=echo + text, logprobs=logprobs, finish_reason=final.finish_reason,
        prompt_logprobs=vllm_prompt_logprobs(texts, prompt_ids, prompt) if wanted else None)


class CompletionStream:
    """The streamed choices of /v1/completions: prompt logprobs go out once, with the first
    chunk that follows the prefill; text offsets run on from the echoed prompt."""

    def __init__(self, tokenizer: Any, body: p.CompletionRequest, prompt_ids: list[list[int]],
                 echoes: list[str]):
        self.body, self.prompt_ids = body, prompt_ids
        self.texts = token_texts(tokenizer) if tokenizer is not None else None
        num_choices = len(prompt_ids) * body.n
        self.offsets = [len(echoes[i // body.n]) if body.echo else 0 for i in range(num_choices)]
        self.prompt_sent: set[int] = set()

    def choice(self, index: int, out: Any) -> dict:
        body, prompt_ids = self.body, self.prompt_ids[index // self.body.n]
        prompt = out.prompt_logprobs if index not in self.prompt_sent else None
        if prompt is not None:
            self.prompt_sent.add(index)
        choice = {"index": index, "text": out.text, "logprobs": None,
                  "finish_reason": out.finish_reason if out.finished else None}
        if body.logprobs is not None and (out.logprobs or (prompt and body.echo)):
            echoed = prompt if body.echo else None
            start = 0 if echoed else self.offsets[index]
            logprobs = completion_logprobs(self.texts, prompt_ids, echoed, out.logprobs, start)
            choice["logprobs"] = logprobs.model_dump()
        self.offsets[index] += len(out.text)
        if body.prompt_logprobs is not None:
            entries = vllm_prompt_logprobs(self.texts, prompt_ids, prompt)
            choice["prompt_logprobs"] = None if entries is None else [
                None if entry is None else {k: v.model_dump() for k, v in entry.items()}
                for entry in entries]
        return choice
