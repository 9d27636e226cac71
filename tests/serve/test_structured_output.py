"""Structured output against the real server on the embedded model: the official openai client,
LangChain's with_structured_output, vLLM's guided_* extras, and bad constraints (400s)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys

import jsonschema
import pytest

from litedeploy.config import GuidedDecoding

openai = pytest.importorskip("openai")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MESSAGES = [{"role": "user",
             "content": "Describe a fictional person as JSON with name, age and city."}]
NUM_SEEDS = 20


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def _chat_many(client, model, response_format, max_tokens: int) -> list:
    """One request per seed at temperature 1.0, all at once (they share decode batches)."""
    def one(seed: int):
        return client.chat.completions.create(
            model=model, messages=MESSAGES, temperature=1.0, seed=seed, max_tokens=max_tokens,
            response_format=response_format).choices[0]

    with concurrent.futures.ThreadPoolExecutor(NUM_SEEDS) as pool:
        return list(pool.map(one, range(NUM_SEEDS)))


@pytest.fixture(scope="module")
def is_valid_prefix():
    """(constraint, text) -> whether the grammar accepts text so far (it may be unfinished):
    the same grammar as the server's, compiled here for the embedded model's tokenizer."""
    from litedeploy.engine.guided import GrammarCache
    from litedeploy.loader.model_loader import open_source
    from litedeploy.model_bundle import _load_tokenizer, resolve_model_path

    tokenizer = _load_tokenizer(open_source(resolve_model_path(None)))
    cache = GrammarCache(tokenizer, tokenizer.vocab_size, [tokenizer.eos_token_id])

    def check(guided: GuidedDecoding, text: str) -> bool:
        matcher = cache.get(guided).deep_copy()
        return matcher.consume_tokens(tokenizer.encode(text, add_bos=False)) and (
            not matcher.is_error())

    return check


def test_json_schema_over_20_seeds_parses_and_validates(client, model):
    for choice in _chat_many(client, model, PERSON_FORMAT, max_tokens=100):
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_over_20_seeds_is_an_object_or_a_cut_prefix(client, model, is_valid_prefix):
    choices = _chat_many(client, model, {"type": "json_object"}, max_tokens=48)
    finished = [c for c in choices if c.finish_reason == "stop"]
    assert len(finished) >= NUM_SEEDS // 2  # the 135M model sometimes writes a very long key
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in choices:
        if choice.finish_reason != "stop":
            assert choice.finish_reason == "length"
            assert choice.message.content.startswith("{")
            assert is_valid_prefix(GuidedDecoding("json_object"), choice.message.content)


def test_max_tokens_cut_gives_length_and_a_valid_prefix(client, model, is_valid_prefix):
    choice = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=1.0, seed=3, max_tokens=8,
        response_format=PERSON_FORMAT).choices[0]
    assert choice.finish_reason == "length"
    text = choice.message.content
    assert text.startswith('{"name": "')
    assert is_valid_prefix(GuidedDecoding("json_schema", json.dumps(PERSON)), text)
    assert not is_valid_prefix(GuidedDecoding("json_schema", json.dumps(PERSON)), text + '"}')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_streamed_json_schema_and_parse_helper(client, model):
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0.0, max_tokens=100,
        response_format=PERSON_FORMAT, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)

    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)
        city: str = Field(max_length=20)

    parsed = client.chat.completions.parse(
        model=model, messages=MESSAGES, temperature=0.0, max_tokens=100,
        response_format=Person).choices[0].message.parsed
    assert isinstance(parsed, Person)


def test_guided_extra_fields(client, model):
    def complete(**extra) -> tuple[str, str]:
        choice = client.completions.create(model=model, prompt="The answer is", max_tokens=30,
                                           temperature=1.0, seed=1, extra_body=extra).choices[0]
        return choice.text, choice.finish_reason

    text, reason = complete(guided_choice=["yes", "no", "it depends"])
    assert text in ("yes", "no", "it depends") and reason == "stop"
    text, reason = complete(guided_regex=r"[0-9]{3}-[A-Z]{2}")
    assert re.fullmatch(r"[0-9]{3}-[A-Z]{2}", text) and reason == "stop"
    text, _ = complete(guided_json={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                    "required": ["ok"]})
    assert isinstance(json.loads(text)["ok"], bool)
    text, reason = complete(guided_grammar='root ::= "(" [a-z]+ ")"')
    assert reason == "length" or re.fullmatch(r"\([a-z]+\)", text)
    # a regex that never has to end runs to max_tokens: length, not a hung request
    text, reason = complete(guided_regex="[a-z ]+")
    assert reason == "length" and re.fullmatch("[a-z ]+", text)


@pytest.mark.parametrize("extra, reason", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "no-such-type"),
    ({"guided_regex": "(unclosed"}, "unclosed group"),
    ({"guided_regex": r"[^\s\S]"}, "matches no text"),
    ({"guided_grammar": "root ::= missing_rule"}, "missing_rule"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"response_format": {"type": "yaml"}}, "yaml"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "one structured"),
])
def test_bad_constraints_are_400_with_the_reason(client, model, extra, reason):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=re.escape(reason)):
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5,
                                           stream=stream, extra_body=extra)
    # the batch is not stuck: a plain request right after is served
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


def test_langchain_with_structured_output(api_server, model):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)
        city: str = Field(max_length=20)

    llm = langchain_openai.ChatOpenAI(base_url=api_server.url + "/v1", api_key="unused",
                                      model=model, temperature=0, max_tokens=60)
    person = llm.with_structured_output(Person, method="json_schema").invoke(
        "Describe a fictional person: name, age and city.")
    assert isinstance(person, Person)
    result = llm.with_structured_output(Person, method="json_mode", include_raw=True).invoke(
        "Reply with a JSON object with the keys name (string), age (integer) and city "
        "(string) for a fictional person.")
    assert isinstance(json.loads(result["raw"].content), dict)  # json_mode: any JSON object
    assert result["parsing_error"] is None and isinstance(result["parsed"], Person)


def test_chat_cli_json_flag_replies_with_json_objects():
    """`litedeploy chat --json` with piped stdin: one JSON object a line (a cut one would end
    with the length; these prompts ask for short objects and decode greedily)."""
    from tests.serve.conftest import REPO_ROOT, subprocess_env

    proc = subprocess.run(
        [sys.executable, "-m", "litedeploy", "chat", "--json", "--temperature", "0",
         "--max-new-tokens", "60", "--cache-max-tokens", "4096", "--session-len", "256"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
        check=False,
        input="Describe a cat as JSON with name and age.\nGive me a JSON object with a city.\n")
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.splitlines()
    assert len(replies) == 2
    for reply in replies:
        assert isinstance(json.loads(reply), dict)
