"""lm-evaluation-harness's `local-completions` against a real server on a tiny float32 model.

The task is a multiple-choice file the test writes (no dataset download); lm-eval finds the
server's /tokenizer_info and /tokenize on its own (no tokenizer download) and scores each choice
with /v1/completions echo + logprobs. Each choice's loglikelihood must equal the sum of
transformers' float32 log-softmax over the choice's tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.serve.conftest import subprocess_env

DOCS = [
    {"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "world", "us"],
     "answer": 0},
    {"question": "hello world, how are", "choices": ["you today?", "fine", "the assistant"],
     "answer": 0},
    {"question": "书生·浦语是", "choices": ["上海人工智能", "模型", "😀"], "answer": 1},
]
TASK = "litedeploy_tiny_mc"
TOLERANCE = 1e-3


def _write_task(folder) -> None:
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in DOCS))
    (folder / "task.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(docs))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")


def _reference_loglikelihood(tokenizer, hf_model, context: str, continuation: str) -> float:
    """lm-eval's split (context ids, then the rest of the whole string's ids), scored by HF."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    num_context = len(tokenizer.encode(context, add_special_tokens=False))
    with torch.inference_mode():
        logprobs = hf_model(torch.tensor([whole])).logits[0].float().log_softmax(dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(num_context, len(whole)))


def test_lm_eval_local_completions_loglikelihoods_equal_transformers(tiny_llama_server,
                                                                     tmp_path):
    from transformers import AutoTokenizer

    _write_task(tmp_path)
    tiny = tiny_llama_server
    env = dict(subprocess_env(), HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    model_args = (f"model={tiny.model_name},base_url={tiny.server.url}/v1/completions,"
                  "num_concurrent=1,max_retries=1")
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
         "--model_args", model_args, "--tasks", TASK, "--include_path", str(tmp_path),
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        check=False, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Using remote tokenizer" in run.stderr  # it found /tokenizer_info and /tokenize
    (samples_file,) = (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(DOCS)

    tokenizer = AutoTokenizer.from_pretrained(str(tiny.folder))
    for sample in samples:
        arguments = sample["arguments"]
        assert len(arguments) == len(DOCS[sample["doc_id"]]["choices"])
        for index, (loglikelihood, _is_greedy) in enumerate(sample["filtered_resps"]):
            request = arguments[f"gen_args_{index}"]
            expected = _reference_loglikelihood(tokenizer, tiny.hf_model, request["arg_0"],
                                                request["arg_1"])
            assert float(loglikelihood) == pytest.approx(expected, abs=TOLERANCE)
