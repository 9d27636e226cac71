"""The embedded SmolLM2 GGUF: our greedy tokens equal transformers loading the same file."""

from __future__ import annotations

import json
import os

import pytest
import torch

from litedeploy.api import pipeline
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.loader.default_model import default_model_path

NUM_TOKENS = 64
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def pipe():
    return pipeline(backend_config=EngineConfig(cache_max_tokens=4096, dtype="float32"))


def test_greedy_tokens_equal_transformers_on_the_same_gguf(pipe):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(default_model_path())
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompt_ids = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
    ours_ids = pipe.prompts.encode(MESSAGES)
    assert ours_ids == list(prompt_ids)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=NUM_TOKENS,
                                min_new_tokens=NUM_TOKENS, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    expected = out[0, len(prompt_ids):].tolist()
    ours = pipe(MESSAGES, GenerationConfig(max_new_tokens=NUM_TOKENS, ignore_eos=True))
    assert ours.token_ids == expected
    assert ours.finish_reason == "length"
    assert ours.text == hf_tokenizer.decode(expected, skip_special_tokens=True)


def test_pipeline_stops_at_end_of_turn(pipe):
    response = pipe("Say hello.", GenerationConfig(max_new_tokens=128))
    assert response.finish_reason == "stop"
    assert response.text and "<|im_end|>" not in response.text
    assert response.generate_token_len == len(response.token_ids) < 128


def test_stream_infer_deltas_concatenate_to_the_full_text(pipe):
    gen = GenerationConfig(max_new_tokens=24)
    full = pipe("Name three colors.", gen)
    deltas = list(pipe.stream_infer("Name three colors.", gen))
    assert "".join(d.text for d in deltas) == full.text
    assert deltas[-1].finish_reason == full.finish_reason


def test_chat_session_keeps_history(pipe):
    gen = GenerationConfig(max_new_tokens=16)
    session = pipe.chat("My name is Ada.", gen_config=gen)
    session = pipe.chat("What is my name?", session, gen_config=gen)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    expected = pipe(session.messages[:3], gen)
    assert session.response.text == expected.text
    assert pipe.engine.block_manager.num_free_blocks == pipe.engine.block_manager.num_blocks


def test_chat_with_tools_calls_then_reads_the_result(pipe):
    """pipe.chat(tools=...): a forced call that fits the function's schema, then the tool's
    result sent back in the same session."""
    jsonschema = pytest.importorskip("jsonschema")
    parameters = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    gen = GenerationConfig(max_new_tokens=24)
    session = pipe.chat("What is the weather in Paris?", gen_config=gen, tools=tools,
                        tool_choice="required")
    first = session.response
    assert first.finish_reason == "tool_calls" and first.text == ""
    [call] = first.tool_calls
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 22}'}
    session = pipe.chat(result, session, gen, tools=tools)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    assert session.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert session.response.input_token_len > first.input_token_len + first.generate_token_len
    assert pipe.engine.block_manager.num_free_blocks == pipe.engine.block_manager.num_blocks
