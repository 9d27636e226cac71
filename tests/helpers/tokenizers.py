"""Tiny, deterministic tokenizer folders for tests (trained in-process, well under a second each).

- `write_internlm2_tokenizer(dir)`: an InternLM2-style SentencePiece folder (tokenizer.model +
  tokenizer_config.json, no tokenizer.json, no chat_template -> the built-in internlm2 template).
- `write_bpe_tokenizer(dir)`: a byte-level BPE `tokenizer.json` folder that
  `transformers.AutoTokenizer.from_pretrained(dir)` loads, with a ChatML template by default.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

# English dominates so that its letters are real pieces; the rarer Chinese characters and emoji
# fall back to byte pieces, which is exactly what streaming detokenization must cope with.
CORPUS = (
    "the quick brown fox jumps over the lazy dog. hello world, how are you today?\n"
    "this is a small test of the tokenizer and it should be fine for all of us.\n"
    "Hello! How can I assist you today? I am an AI assistant named InternLM.\n"
) * 20 + (
    "书生·浦语是上海人工智能实验室开发的语言模型。你好，世界！我们一起学习。\n"
    "Emoji test 😀🎉👍 done. 中文和English混合 🚀 text.\n"
)

# InternLM2's special tokens: (name, SentencePiece placeholder piece).
INTERNLM2_SPECIALS = (
    ("<|plugin|>", "[UNUSED_TOKEN_141]"),
    ("<|interpreter|>", "[UNUSED_TOKEN_142]"),
    ("<|action_end|>", "[UNUSED_TOKEN_143]"),
    ("<|action_start|>", "[UNUSED_TOKEN_144]"),
    ("<|im_end|>", "[UNUSED_TOKEN_145]"),
    ("<|im_start|>", "[UNUSED_TOKEN_146]"),
)

# A typical Hugging Face ChatML template (Qwen2-style, without a default system prompt).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_internlm2_tokenizer(dir: Path) -> None:
    """Train a ~300-piece SentencePiece BPE model with byte fallback into `dir`."""
    import sentencepiece as spm

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=300,  # 3 control + 6 placeholders + 256 byte pieces + ~35 learned pieces
        byte_fallback=True,
        character_coverage=0.98,
        # Control symbols get fixed ids 3..8 and are never matched inside text by SentencePiece.
        control_symbols=[piece for _, piece in INTERNLM2_SPECIALS],
        normalization_rule_name="identity",  # like Llama/InternLM2: lossless round trip
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        num_threads=1,
        minloglevel=2,
    )
    (dir / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    added = {str(sp.piece_to_id(piece)): _added_token(name) for name, piece in INTERNLM2_SPECIALS}
    added.update({"0": _added_token("<unk>"), "1": _added_token("<s>"), "2": _added_token("</s>")})
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "added_tokens_decoder": added,
    }
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def write_bpe_tokenizer(
    dir: Path, vocab_size: int = 300, chat_template: str | None = CHATML
) -> None:
    """Train a byte-level BPE (Qwen2-like: no BOS added, eos `<|im_end|>`) into `dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.save(str(dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "model_max_length": 4096,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_metaspace_tokenizer(dir: Path, vocab_size: int = 400) -> None:
    """A Llama-2-style `tokenizer.json` (Metaspace "▁" words, byte fallback, BOS `<s>` added by the
    post-processor): its decoder drops the leading space of whatever token comes first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    byte_pieces = [f"<0x{value:02X}>" for value in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + byte_pieces,
        limit_alphabet=40,  # rare characters (Chinese, emoji) go through <0x..> byte pieces
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", specials.index("<s>"))]
    )
    spec = json.loads(tokenizer.to_str())
    # The trainer registers the byte pieces as added tokens; as in Llama 2 they belong to the plain
    # vocab only, so byte fallback uses them and skip_special_tokens keeps them.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    (dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHATML,
    }
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _added_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
