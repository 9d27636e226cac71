"""Tool calling against the real server, through the official openai client and LangChain.

The embedded SmolLM2 is a llama-family model (llama3 JSON parser); its template does not render
tools, so they reach it as text in that format. Greedy decoding makes `none` and `auto` write the
same text: `auto` must be exactly the parser's reading of what `none` returns as content.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from litedeploy.serve.tools.llama3 import Llama3ToolParser
from tests.serve.conftest import API_KEY, KEYED_MODEL_NAME, REPO_ROOT, subprocess_env

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 16}},
                   "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROUND_TRIP = [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'}]


@pytest.fixture(scope="module")
def client(keyed_server):
    # the keyed server: no short --session-len, so the tools fit in the prompt. It runs one
    # request at a time and a finished stream may hold its slot a moment: retry its 503s.
    return openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=5,
                         timeout=120)


def create(client, **kwargs):
    kwargs = {"model": KEYED_MODEL_NAME, "temperature": 0, "max_tokens": 32, **kwargs}
    return client.chat.completions.create(**kwargs)


def create_streamed(client, **kwargs) -> tuple[str | None, list[tuple[str, str]], str]:
    """The stream reassembled as OpenAI documents it: a call's id and name in its first
    fragment, then argument pieces under the same index."""
    content, calls, finish = "", {}, None
    for chunk in create(client, stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id.startswith("call_") and delta.function.name
                calls[delta.index] = [delta.function.name, ""]
            else:
                assert delta.id is None and delta.function.name is None
            calls[delta.index][1] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


def reply(completion) -> tuple[str | None, list[tuple[str, str]], str]:
    choice = completion.choices[0]
    calls = [(call.function.name, call.function.arguments)
             for call in choice.message.tool_calls or []]
    return choice.message.content or None, calls, choice.finish_reason


def check_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("messages", [ASK, ROUND_TRIP], ids=["ask", "round_trip"])
def test_auto_reads_the_text_that_none_returns(client, messages):
    none = create(client, messages=messages, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None
    raw = none.choices[0].message.content
    content, calls = Llama3ToolParser([t["function"]["name"] for t in TOOLS]).parse(raw)
    expected = (content or None, [(c.name, c.arguments) for c in calls],
                "tool_calls" if calls else none.choices[0].finish_reason)
    auto = create(client, messages=messages, tools=TOOLS)  # tool_choice defaults to auto
    assert reply(auto) == expected
    assert create_streamed(client, messages=messages, tools=TOOLS) == expected


# Forced calls (required, named) get room to finish: the grammar bounds each argument
# (maxLength), but which words a 4-bit model picks inside it depends on the CPU's kernels.
FORCED_MAX_TOKENS = 96


def test_required_calls_tools_with_valid_arguments(client):
    whole = create(client, messages=ASK, tools=TOOLS, tool_choice="required",
                   max_tokens=FORCED_MAX_TOKENS)
    content, calls, finish = reply(whole)
    assert content is None and finish == "tool_calls"
    check_calls(calls)
    assert all(call.id.startswith("call_") for call in whole.choices[0].message.tool_calls)
    assert create_streamed(client, messages=ASK, tools=TOOLS, tool_choice="required",
                           max_tokens=FORCED_MAX_TOKENS) == reply(whole)
    single = create(client, messages=ASK, tools=TOOLS, tool_choice="required",
                    parallel_tool_calls=False, max_tokens=FORCED_MAX_TOKENS)
    assert len(reply(single)[1]) == 1


def test_named_function_is_the_one_called(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    whole = create(client, messages=ASK, tools=TOOLS, tool_choice=named,
                   max_tokens=FORCED_MAX_TOKENS)
    content, calls, finish = reply(whole)
    assert content is None and finish == "tool_calls"
    assert [name for name, _ in calls] == ["get_time"]
    check_calls(calls)
    assert create_streamed(client, messages=ASK, tools=TOOLS, tool_choice=named,
                           max_tokens=FORCED_MAX_TOKENS) == (content, calls, finish)


def test_tool_call_and_result_reach_the_prompt(client):
    def prompt_tokens(messages) -> int:
        return create(client, messages=messages, tools=TOOLS, max_tokens=1).usage.prompt_tokens

    base = prompt_tokens(ROUND_TRIP)
    longer_result = [*ROUND_TRIP[:2], {**ROUND_TRIP[2], "content": '{"temperature": 22, '
                                                                   '"sky": "clear and blue"}'}]
    longer_call = [ROUND_TRIP[0], {**ROUND_TRIP[1], "tool_calls": [
        {**CALL, "function": {**CALL["function"],
                              "arguments": '{"city": "Paris, France, Europe"}'}}]}, ROUND_TRIP[2]]
    assert prompt_tokens(longer_result) > base
    assert prompt_tokens(longer_call) > base
    assert prompt_tokens(ASK) < base


@pytest.mark.parametrize(("body", "param", "reason"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not in tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be one of"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools",
     "non-empty string name"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "x"}]}]}, None,
     "each tool call is"),
])
def test_bad_tool_requests_are_400_with_the_reason(keyed_server, body, param, reason):
    payload = {"model": KEYED_MODEL_NAME, "messages": ASK, "max_tokens": 4, **body}
    response = httpx.post(keyed_server.url + "/v1/chat/completions", json=payload, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert reason in error["message"]
    if param is not None:
        assert error["param"] == param


def test_unknown_parser_is_a_cli_error():
    result = subprocess.run([sys.executable, "-m", "litedeploy", "serve", "api_server",
                             "--tool-call-parser", "nope"], cwd=REPO_ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "--tool-call-parser: invalid choice: 'nope'" in result.stderr
    assert "hermes" in result.stderr and "internlm2" in result.stderr


def test_langchain_bind_tools(keyed_server):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather of a city."""
        return '{"temperature": 22}'

    llm = ChatOpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, model=KEYED_MODEL_NAME,
                     temperature=0, max_tokens=48, max_retries=5)
    question = HumanMessage("What is the weather in Paris?")
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    assert [call["name"] for call in called.tool_calls] == ["get_weather"]
    assert isinstance(called.tool_calls[0]["args"]["city"], str)
    result = get_weather.invoke(called.tool_calls[0])  # a ToolMessage with the call's id
    assert isinstance(result, ToolMessage)
    answer = llm.bind_tools([get_weather]).invoke([question, called, result])
    assert answer.content or answer.tool_calls


def test_bench_serving_with_tools(keyed_server):
    """`bench serving --tools`: grammar-forced calls, streamed as tool-call pieces, run to
    max_tokens (the tool's schema cannot close sooner)."""
    import time

    from litedeploy.bench.serving import run_serving
    from litedeploy.cli.main import main

    assert main(["bench", "serving", "--tools", "--endpoint", "completions"]) == 2
    for _ in range(3):  # one request at a time on this server: a just-finished one may hold it
        result = run_serving(keyed_server.url, 1, max_concurrency=1, max_tokens=8,
                             api_key=API_KEY, model=KEYED_MODEL_NAME, response_format="tools")
        if result["errors_by_status"] != {"503": 1}:
            break
        time.sleep(1)
    assert result["errors"] == 0, result["error_samples"]
    assert result["total_output_tokens"] == 8 and result["ttft_ms"] is not None
