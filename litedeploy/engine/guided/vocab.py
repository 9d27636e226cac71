"""Our Tokenizer's vocabulary as llguidance's LLTokenizer (HF, GGUF-derived and SentencePiece)."""

from __future__ import annotations

import re
from typing import Any

from litedeploy.tokenizer import Tokenizer, _SentencePieceBackend

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """The vocabulary llguidance computes masks against (about a second: build it once).

    vocab_size is the width of the logits (the model may pad its embeddings past the
    tokenizer); ids past the tokenizer are never allowed. stop_token_ids are the engine's stop
    ids: a complete grammar allows exactly the tokens that end the request.
    """
    import llguidance
    import llguidance.hf

    eos = sorted(stop_token_ids) or (
        [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
    if tokenizer.hf_tokenizer is not None:  # HF folders and GGUF files (a fast tokenizer)
        return llguidance.hf.from_tokenizer(tokenizer.hf_tokenizer, n_vocab=vocab_size,
                                            eos_token=eos)
    backend = tokenizer._backend
    if not isinstance(backend, _SentencePieceBackend):
        raise TypeError(f"no grammar vocabulary for a {type(backend).__name__} tokenizer")
    wrapper = llguidance.TokenizerWrapper(_SentencePieceVocab(tokenizer, backend, eos))
    return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)


class _SentencePieceVocab:
    """The shape llguidance.TokenizerWrapper reads: token bytes, specials and an encoder."""

    def __init__(self, tokenizer: Tokenizer, backend: _SentencePieceBackend,
                 eos: list[int] | None) -> None:
        sp = backend.sp
        self.sp = sp
        self._encoder = _without_dummy_prefix(sp)
        self.eos_token_id = eos[0] if eos else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.special_token_ids)
        self.tokens = [self._piece_bytes(i) for i in range(sp.get_piece_size())]
        self.tokens += [b""] * (tokenizer.vocab_size - len(self.tokens))
        for name, token_id in backend.special_tokens.items():
            self.tokens[token_id] = name.encode()

    def _piece_bytes(self, token_id: int) -> bytes:
        piece = self.sp.id_to_piece(token_id)
        byte = _BYTE_PIECE.match(piece)
        if byte is not None and self.sp.is_byte(token_id):
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def __call__(self, text: str) -> list[int]:
        # llguidance tokenizes forced text with this: it must spell exactly `text`
        return self._encoder.encode(text)


def _without_dummy_prefix(sp: Any) -> Any:
    """The same SentencePiece model without the space it puts before every text."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
