"""A model folder for `--load-format dummy` servers: config.json plus a generated tokenizer.

A dummy-weight model samples any id below its vocab_size, so the tokenizer has exactly that many
tokens (word-level: `w<id>`, joined by spaces when decoded) and a ChatML template; the server then
streams text and takes chat requests like with a real model. No download, no training.

    python -m litedeploy.bench.dummy_tokenizer benchmarks/configs/internlm2-chat-1_8b OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}  # InternLM2 / Llama ids
CHAT_SPECIALS = ("<|im_end|>", "<|im_start|>")  # the last two ids, as InternLM2 has them
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def token_texts(vocab_size: int) -> list[str]:
    if vocab_size < len(SPECIALS) + len(CHAT_SPECIALS) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for a dummy tokenizer")
    texts = [SPECIALS.get(i, f"w{i}") for i in range(vocab_size)]
    texts[-len(CHAT_SPECIALS):] = CHAT_SPECIALS
    return texts


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json with `vocab_size` tokens into `folder`."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    texts = token_texts(vocab_size)
    tokenizer = Tokenizer(models.WordLevel({text: i for i, text in enumerate(texts)},
                                           unk_token=SPECIALS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [*SPECIALS.values(), *CHAT_SPECIALS]
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                  for text in specials])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": SPECIALS[0],
        "bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "pad_token": SPECIALS[2],
        "add_bos_token": True, "model_max_length": 1 << 20, "chat_template": CHATML,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_dummy_folder(config_folder: Path, out_folder: Path) -> Path:
    """Copy config.json (and generation_config.json) and add a tokenizer of the model's size."""
    out_folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (config_folder / name).is_file():
            shutil.copyfile(config_folder / name, out_folder / name)
    vocab_size = json.loads((out_folder / "config.json").read_text())["vocab_size"]
    write_tokenizer(out_folder, vocab_size)
    return out_folder


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    print(make_dummy_folder(Path(argv[0]), Path(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
