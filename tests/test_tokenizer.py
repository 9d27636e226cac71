"""Tokenizer: InternLM2 SentencePiece folders and Hugging Face folders (checked against transformers)."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import processors
from transformers import AutoTokenizer

from litedeploy.errors import ModelLoadError
from litedeploy.tokenizer import INTERNLM2_SPECIAL_PIECES, Tokenizer
from tests.helpers.tokenizers import (
    write_bpe_tokenizer,
    write_internlm2_tokenizer,
    write_metaspace_tokenizer,
)

MIXED_TEXTS = [
    "Hello world! How can I assist you today?",
    "书生·浦语是上海人工智能实验室开发的语言模型。",
    "Emoji 😀🎉👍 and 🚀 rockets",
    "中文和English混合  two  spaces\n\nnew lines\t tab ",
    " leading space",
]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("internlm2")
    write_internlm2_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    write_bpe_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def sp_tok(sp_folder):
    return Tokenizer.from_folder(str(sp_folder), {"architectures": ["InternLM2ForCausalLM"]})


def test_internlm2_special_tokens_map_to_their_ids_unsplit(sp_folder, sp_tok):
    raw = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    for name, piece in INTERNLM2_SPECIAL_PIECES.items():
        assert sp_tok.token_id(name) == raw.piece_to_id(piece)
        assert sp_tok.encode(name, add_bos=False) == [raw.piece_to_id(piece)]
    im_start, im_end = sp_tok.token_id("<|im_start|>"), sp_tok.token_id("<|im_end|>")
    ids = sp_tok.encode("<|im_start|>user\nhello<|im_end|>", add_bos=False)
    assert ids == [im_start, *raw.encode("user\nhello"), im_end]
    assert {im_start, im_end} <= sp_tok.special_token_ids
    assert sp_tok.hf_tokenizer is None and sp_tok.chat_template is None


def test_internlm2_ids_from_placeholder_pieces_without_added_tokens(sp_folder, tmp_path, sp_tok):
    (tmp_path / "tokenizer.model").write_bytes((sp_folder / "tokenizer.model").read_bytes())
    tok = Tokenizer.from_folder(str(tmp_path), {"model_type": "internlm2"})
    text = "<|im_start|>system\n<|plugin|><|interpreter|><|action_start|>x<|action_end|><|im_end|>"
    assert tok.encode(text) == sp_tok.encode(text)
    assert tok.special_token_ids == sp_tok.special_token_ids


def test_internlm2_bos_exactly_once(sp_folder, sp_tok):
    assert sp_tok.add_bos and sp_tok.bos_token_id == 1 and sp_tok.bos_token == "<s>"
    ids = sp_tok.encode("hello")
    assert ids[0] == 1 and ids.count(1) == 1
    assert sp_tok.encode("<s>hello") == ids  # BOS written in the text is not doubled
    assert 1 not in sp_tok.encode("hello", add_bos=False)
    no_bos = Tokenizer.from_folder(str(sp_folder), {"add_bos_token": False})
    assert no_bos.encode("hello") == sp_tok.encode("hello", add_bos=False)


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_internlm2_round_trip_and_byte_fallback(sp_folder, sp_tok, text):
    raw = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    ids = sp_tok.encode(text)
    assert ids == [1, *raw.encode(text)]
    assert sp_tok.decode(ids) == text
    if any(ord(ch) > 0x7F for ch in text):  # non-ASCII goes through <0x..> byte pieces
        assert any(raw.is_byte(i) for i in ids[1:])


def test_internlm2_skip_special_tokens(sp_tok):
    text = "<|im_start|>assistant\nHi 你好<|action_start|><|plugin|>\n{}<|action_end|><|im_end|>"
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert sp_tok.decode(ids) == "assistant\nHi 你好\n{}"
    assert sp_tok.decode([*ids, 10_000]) == sp_tok.decode(ids)  # ids past the vocab decode to ""


@pytest.mark.parametrize("writer", [write_bpe_tokenizer, write_metaspace_tokenizer])
def test_hf_folder_matches_transformers(writer, tmp_path):
    writer(tmp_path)
    tok = Tokenizer.from_folder(str(tmp_path), {})
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.vocab_size == len(reference) <= 400
    # Qwen2-like byte-level BPE adds no BOS; the Llama-2-like one adds it in its post-processor.
    assert tok.add_bos is (writer is write_metaspace_tokenizer)
    assert tok.bos_token_id == reference.bos_token_id
    assert tok.eos_token_id == reference.eos_token_id
    for text in [*MIXED_TEXTS, "<|im_start|>user\nhi 😀<|im_end|>\n"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text)  # add_special_tokens=True: the reference's own BOS
        assert ids.count(tok.bos_token_id) == int(tok.add_bos)
        assert tok.encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids)
        if writer is write_bpe_tokenizer:  # byte-level: exact round trip
            assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.token_id("<|im_end|>") == reference.convert_tokens_to_ids("<|im_end|>")
    assert tok.token_id("hello there") is None
    assert tok.chat_template == reference.chat_template


def test_bpe_post_processor_bos_is_never_doubled(bpe_folder, tmp_path):
    raw = RawTokenizer.from_file(str(bpe_folder / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    raw.save(str(tmp_path / "tokenizer.json"))
    config = json.loads((bpe_folder / "tokenizer_config.json").read_text())
    del config["add_bos_token"]  # so add_bos comes from what the post-processor does
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(str(tmp_path), {})
    assert tok.add_bos and tok.bos_token_id == 0
    assert tok.encode("hi") == [0, *tok.encode("hi", add_bos=False)]
    assert tok.encode("<|endoftext|>hi").count(0) == 1
    assert 0 not in tok.encode("hi", add_bos=False)


def test_folder_without_tokenizer_names_the_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json.*tokenizer.model"):
        Tokenizer.from_folder(str(tmp_path), {})
