"""Tools in chat templates: InternLM2's plugin format as LMDeploy renders it, jinja templates
that read `tools`, and the text fallback for templates that do not."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from litedeploy.chat.template import INTERNLM2_META_INSTRUCTION, ChatTemplate
from litedeploy.serve.tools.hermes import HermesToolParser
from litedeploy.serve.tools.internlm2 import InternLM2ToolParser
from litedeploy.serve.tools.plan import ToolPlan, messages_for_template
from litedeploy.tokenizer import Tokenizer
from tests.helpers.tokenizers import write_bpe_tokenizer, write_internlm2_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}}}
CALL = {"id": "call_1", "type": "function", "function": {
    "name": "get_current_weather", "arguments": '{"location": "Shanghai"}'}}
ROUND_TRIP = [
    {"role": "user", "content": "I want to know today's weather in Shanghai"},
    {"role": "assistant", "content": "Sure, I will search for the weather of Shanghai.",
     "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("internlm2")
    write_internlm2_tokenizer(folder)
    return Tokenizer.from_folder(str(folder), {"architectures": ["InternLM2ForCausalLM"]})


def render(template: ChatTemplate, messages: list[dict], tools: list[dict] | None) -> str:
    plan = ToolPlan.build(tools, "auto", None, HermesToolParser) if tools else None
    prepared = messages_for_template(messages, plan.tools if plan else None, template, None)
    return template.render(prepared, tools=plan.tools if plan else None)


def test_internlm2_plugin_format_as_lmdeploy(sp_tok):
    """LMDeploy (v0.9 `InternLM2Chat7B.messages2prompt`): the functions as one JSON list in a
    `system name=<|plugin|>` message after the meta instruction, the call after the content,
    the tool result in an `environment` message."""
    template = ChatTemplate.resolve(sp_tok, model_type="internlm2")
    functions = json.dumps([WEATHER["function"]], ensure_ascii=False)
    assert render(template, ROUND_TRIP, [WEATHER]) == (
        f"<|im_start|>system\n{INTERNLM2_META_INSTRUCTION}<|im_end|>\n"
        f"<|im_start|>system name=<|plugin|>\n{functions}<|im_end|>\n"
        "<|im_start|>user\nI want to know today's weather in Shanghai<|im_end|>\n"
        "<|im_start|>assistant\nSure, I will search for the weather of Shanghai."
        "<|action_start|><|plugin|>\n"
        '{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}'
        "<|action_end|><|im_end|>\n"
        '<|im_start|>environment\n{"temperature": 22}<|im_end|>\n'
        "<|im_start|>assistant\n")
    # after a system message; a message named plugin gets the name header (any role)
    with_system = [{"role": "system", "content": "Be brief."},
                   {"role": "tool", "name": "plugin", "content": "22"}]
    assert render(template, with_system, [WEATHER]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>system name=<|plugin|>\n{functions}<|im_end|>\n"
        "<|im_start|>environment name=<|plugin|>\n22<|im_end|>\n<|im_start|>assistant\n")
    ids = template.encode(sp_tok, ROUND_TRIP, tools=[WEATHER])
    for marker in ("<|plugin|>", "<|action_start|>", "<|action_end|>"):
        assert sp_tok.token_id(marker) in ids  # one special token each, not pieces of text


def test_internlm2_hf_template_gets_the_documented_plugin_format(sp_tok, tmp_path):
    """InternLM2 checkpoints ship a plain ChatML-like template that ignores tools: the tools,
    the call and its result still come out as InternLM's chat_format.md shows them."""
    jinja = tmp_path / "internlm2_hf.jinja"
    jinja.write_text(  # the template of internlm2-chat's tokenizer_config.json
        "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
        "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    template = ChatTemplate.resolve(sp_tok, str(jinja))
    assert not template.renders_tools
    plan = ToolPlan.build([WEATHER], "auto", None, InternLM2ToolParser)
    prepared = messages_for_template(ROUND_TRIP, plan.tools, template, InternLM2ToolParser)
    functions = json.dumps([WEATHER["function"]], ensure_ascii=False)
    assert template.render(prepared) == (
        f"<s><|im_start|>system name=<|plugin|>\n{functions}<|im_end|>\n"
        "<|im_start|>user\nI want to know today's weather in Shanghai<|im_end|>\n"
        "<|im_start|>assistant\nSure, I will search for the weather of Shanghai."
        "<|action_start|><|plugin|>\n"
        '{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}'
        "<|action_end|><|im_end|>\n"
        '<|im_start|>environment name=<|plugin|>\n{"temperature": 22}<|im_end|>\n'
        "<|im_start|>assistant\n")


def test_jinja_template_reading_tools_equals_transformers(tmp_path):
    """A template that reads `tools` and `tool_calls` (Qwen2.5's way) renders as transformers'
    apply_chat_template does, with arguments as objects."""
    write_bpe_tokenizer(tmp_path)
    source = (
        "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
        "<|im_end|>\n{%- endif %}"
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}"
        "</tool_call>{%- endfor %}<|im_end|>\n{%- endfor %}<|im_start|>assistant\n")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = source
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    template = ChatTemplate.resolve(Tokenizer.from_hf(reference, {}))
    assert template.renders_tools and template.renders_tool_calls
    expected_messages = [dict(m) for m in ROUND_TRIP]
    expected_messages[1] = {**expected_messages[1], "tool_calls": [
        {**CALL, "function": {**CALL["function"], "arguments": {"location": "Shanghai"}}}]}
    plan = ToolPlan.build([WEATHER], "auto", None, HermesToolParser)
    expected = reference.apply_chat_template(expected_messages, tools=plan.tools, tokenize=False)
    assert render(template, ROUND_TRIP, [WEATHER]) == expected
    assert '{"location": "Shanghai"}</tool_call>' in expected


def test_template_without_tools_gets_them_as_text(sp_tok, tmp_path):
    """ChatML knows neither tools nor tool_calls: the parser's format is written into a system
    message and the assistant's content."""
    template = ChatTemplate.resolve(sp_tok, "chatml")
    assert not template.renders_tools
    text = render(template, ROUND_TRIP, [WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(WEATHER, ensure_ascii=False) in text
    assert ("Sure, I will search for the weather of Shanghai.\n<tool_call>\n"
            '{"name": "get_current_weather", "arguments": {"location": "Shanghai"}}\n'
            "</tool_call><|im_end|>") in text
    assert '<|im_start|>tool\n{"temperature": 22}<|im_end|>' in text


def test_bad_tool_choices_say_why():
    with pytest.raises(ValueError, match="'nope', which is not in tools"):
        ToolPlan.build([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, None)
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ToolPlan.build([WEATHER], "auto", None, None)
    with pytest.raises(ValueError, match="tool_choice must be one of"):
        ToolPlan.build([WEATHER], "sometimes", None, HermesToolParser)
    with pytest.raises(ValueError, match="needs tools"):
        ToolPlan.build(None, "required", None, None)
    with pytest.raises(ValueError, match="unique; repeated: get_current_weather"):
        ToolPlan.build([WEATHER, WEATHER], "required", None, None)
    assert ToolPlan.build([WEATHER], "required", None, None).guided().kind == "json_schema"
