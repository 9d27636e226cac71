"""Tool-call parsers on real model formats, whole and streamed: every cut of the text must
reassemble to exactly the whole-text result."""

from __future__ import annotations

import json

import pytest

from litedeploy.serve.tools import resolve_parser
from litedeploy.serve.tools.base import ParsedDelta, assemble
from litedeploy.serve.tools.forced import NamedCallParser, RequiredCallsParser, required_schema
from litedeploy.serve.tools.hermes import HermesToolParser
from litedeploy.serve.tools.internlm2 import InternLM2ToolParser
from litedeploy.serve.tools.llama3 import Llama3ToolParser

NAMES = ["get_current_weather", "get_time"]
WEATHER_ARGS = '{"location": "Shanghai"}'

# InternLM2-Chat's function-call turn, verbatim from InternLM's chat/chat_format.md
INTERNLM2_DOC = ('Sure, I will search for the weather of Shanghai.<|action_start|><|plugin|>\n'
                 '{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}'
                 '<|action_end|>')
INTERNLM2_INTERPRETER = ("I have processed the data and visualized it for you.\n\n"
                         "<|action_start|><|interpreter|>\n```python\nimport pandas as pd\n```"
                         "<|action_end|>\n")


def run_stream(parser_cls, pieces: list[str], **kwargs) -> tuple[str, list]:
    parser = parser_cls(NAMES, **kwargs) if parser_cls is not NamedCallParser else parser_cls(
        "get_time")
    total = ParsedDelta()
    for piece in pieces:
        total.extend(parser.feed(piece))
    total.extend(parser.finish())
    # OpenAI's stream rule: a call's id and name come in its first fragment, once
    seen = set()
    for delta in total.tool_calls:
        assert (delta.id is not None) == (delta.index not in seen)
        assert (delta.name is not None) == (delta.index not in seen)
        seen.add(delta.index)
    return total.content, [(c.name, c.arguments) for c in assemble(total.tool_calls)]


def check_every_cut(parser_cls, text: str, expected_content: str, expected_calls: list,
                    **kwargs) -> None:
    assert run_stream(parser_cls, [text], **kwargs) == (expected_content, expected_calls)
    assert run_stream(parser_cls, list(text), **kwargs) == (expected_content, expected_calls)
    for cut in range(len(text) + 1):
        got = run_stream(parser_cls, [text[:cut], text[cut:]], **kwargs)
        assert got == (expected_content, expected_calls), f"cut at {cut}: {text[:cut]!r}"
    for cut in range(0, len(text), 7):  # three pieces too
        pieces = [text[:cut], text[cut:cut + 5], text[cut + 5:]]
        assert run_stream(parser_cls, pieces, **kwargs) == (expected_content, expected_calls)


@pytest.mark.parametrize("text", [INTERNLM2_DOC, INTERNLM2_DOC.removesuffix("<|action_end|>")])
def test_internlm2_doc_format(text):
    # with and without the closing marker: <|action_end|> is a stop word, usually cut off
    check_every_cut(InternLM2ToolParser, text,
                    "Sure, I will search for the weather of Shanghai.",
                    [("get_current_weather", WEATHER_ARGS)])


def test_internlm2_plain_reply_and_interpreter_stay_content():
    check_every_cut(InternLM2ToolParser, "The weather in Shanghai is 22 celsius",
                    "The weather in Shanghai is 22 celsius", [])
    check_every_cut(InternLM2ToolParser, INTERNLM2_INTERPRETER, INTERNLM2_INTERPRETER, [])


def test_internlm2_unknown_function_and_bad_json_stay_content():
    unknown = '<|action_start|><|plugin|>\n{"name": "launch", "parameters": {}}<|action_end|>'
    check_every_cut(InternLM2ToolParser, unknown, unknown, [])
    broken = 'ok<|action_start|><|plugin|>\nnot json'
    check_every_cut(InternLM2ToolParser, broken, broken, [])


def test_internlm2_arguments_key_order_and_unicode():
    text = ('查询一下。<|action_start|><|plugin|>\n{"parameters": {"location": "上海"}, '
            '"name": "get_current_weather"}<|action_end|>')
    check_every_cut(InternLM2ToolParser, text, "查询一下。",
                    [("get_current_weather", '{"location": "上海"}')])


def test_hermes_parallel_calls_between_whitespace():
    text = ('Let me check.\n<tool_call>\n{"name": "get_current_weather", "arguments": '
            '{"location": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n'
            '{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    calls = [("get_current_weather", '{"location": "Paris", "unit": "celsius"}'),
             ("get_time", '{"tz": "CET"}')]
    check_every_cut(HermesToolParser, text, "Let me check.\n", calls)
    check_every_cut(HermesToolParser, text, "Let me check.\n", calls[:1], max_calls=1)


def test_hermes_text_that_looks_like_a_tag():
    text = "Use <tool> tags or <tool_call without json</tool_call> here."
    check_every_cut(HermesToolParser, text, text, [])


def test_hermes_call_without_arguments_and_truncated_call():
    check_every_cut(HermesToolParser, '<tool_call>{"name": "get_time"}</tool_call>', "",
                    [("get_time", "{}")])
    # cut by max_tokens inside the arguments: the call is reported with what was written
    check_every_cut(HermesToolParser, '<tool_call>\n{"name": "get_time", "arguments": {"tz": "C',
                    "", [("get_time", '{"tz": "C')])


def test_llama3_json_calls():
    text = ('{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}; '
            '{"name": "get_time", "parameters": {}}')
    check_every_cut(Llama3ToolParser, text, "",
                    [("get_current_weather", WEATHER_ARGS), ("get_time", "{}")])
    tagged = '<|python_tag|>{"name": "get_time", "parameters": {"tz": 1}}'
    check_every_cut(Llama3ToolParser, tagged, "", [("get_time", '{"tz": 1}')])


def test_llama3_plain_text_and_other_json_are_content():
    check_every_cut(Llama3ToolParser, "  Hello! {not a call}", "  Hello! {not a call}", [])
    other = '{"answer": 42}'
    check_every_cut(Llama3ToolParser, other, other, [])
    unknown = '{"name": "rm_rf", "parameters": {}}'
    check_every_cut(Llama3ToolParser, unknown, unknown, [])


def test_required_array_and_named_arguments():
    text = ('[{"name": "get_time", "parameters": {"tz": "UTC"}}, '
            '{"name": "get_current_weather", "parameters": {"location": "Rome"}}]')
    check_every_cut(RequiredCallsParser, text, "",
                    [("get_time", '{"tz": "UTC"}'),
                     ("get_current_weather", '{"location": "Rome"}')])
    check_every_cut(NamedCallParser, '{"tz": "UTC"}', "", [("get_time", '{"tz": "UTC"}')])


def test_required_schema_accepts_calls_of_the_tools_only():
    jsonschema = pytest.importorskip("jsonschema")
    tools = [{"name": "get_time", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string"}}, "required": ["tz"]}}, {"name": "ping"}]
    schema = json.loads(required_schema(tools, parallel=False))
    jsonschema.validate([{"name": "get_time", "parameters": {"tz": "UTC"}}], schema)
    for bad in ([], [{"name": "get_time", "parameters": {}}], [{"name": "nope", "parameters": {}}],
                [{"name": "ping", "parameters": {}}] * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_parser_registry():
    assert resolve_parser(None, "internlm2") is InternLM2ToolParser
    assert resolve_parser(None, "llama") is Llama3ToolParser
    assert resolve_parser(None, "qwen2") is HermesToolParser
    assert resolve_parser("qwen", None) is HermesToolParser
    assert resolve_parser(None, "gpt2") is None
    with pytest.raises(ValueError, match="hermes, internlm2, llama3"):
        resolve_parser("mistral", "llama")
