"""Pieces of benchmarks/gpu_quant_suite.sh: `bench serving --input-len` (token-id prompts) and
the summary that merges the suite's raw results."""

from __future__ import annotations

import json

from litedeploy.bench.serving import make_token_prompts
from litedeploy.bench.summary import collect_quant, quant_rows
from litedeploy.cli.main import main


def test_token_prompts_have_the_exact_length_and_stay_below_the_vocab():
    prompts = make_token_prompts(5, 2000, 92544, seed=0)
    assert [len(p) for p in prompts] == [2000] * 5
    assert min(map(min, prompts)) >= 1000 and max(map(max, prompts)) < 92544
    assert prompts == make_token_prompts(5, 2000, 92544, seed=0)  # seeded
    small = make_token_prompts(3, 10, 300, seed=1)
    assert min(map(min, small)) >= 75 and max(map(max, small)) < 300


def test_input_len_needs_the_completions_endpoint(capsys):
    assert main(["bench", "serving", "--input-len", "10", "--url", "http://127.0.0.1:9"]) == 2
    assert "--input-len sends token-id prompts" in capsys.readouterr().err


def test_quant_summary_merges_the_raw_results(tmp_path):
    throughput = {"num_prompts": 4, "input_len": 8, "output_len": 4, "random_range_ratio": 0.5,
                  "output_tokens_per_s": 100.0, "elapsed_s": 1.0, "num_preemptions": 0,
                  "engine_info": {"kv_cache_tokens": 64, "max_batch_size": 64}}
    (tmp_path / "kv0.json").write_text(json.dumps(throughput))
    (tmp_path / "kv8.json").write_text(json.dumps({**throughput, "output_tokens_per_s": 150.0}))
    (tmp_path / "steps.txt").write_text("kv0 0 3\nkv8 0 4\nkv4 124 130\n")
    (tmp_path / "server_metrics.txt").write_text(
        '# HELP litedeploy:gpu_memory_max_reserved_bytes Peak\n'
        'litedeploy:gpu_memory_max_reserved_bytes{model_name="m"} 6.442450944e+09\n'
        'litedeploy:gpu_memory_max_allocated_bytes{model_name="m"} 5.0e+09\n')
    (tmp_path / "smi_idle.txt").write_text("4\n")
    (tmp_path / "smi_used.txt").write_text("4\n2052\n7172\n100\n")
    (tmp_path / "server_info.json").write_text('{"setup": "x", "exit_code": 0}')
    (tmp_path / "server.log").write_text(
        "litedeploy api_server: m on cuda:0, KV cache 90000 tokens (4.40 GiB), session_len 32768;"
        " serving http://127.0.0.1:1\n")
    raw = collect_quant(tmp_path)
    assert raw["server"]["metrics"]["gpu_memory_max_reserved_bytes"] == 6 * 2**30
    assert (raw["server"]["smi_peak_mib"], raw["server"]["smi_idle_mib"]) == (7172, 4)
    assert raw["server"]["kv_cache"] == "90000 tokens (4.40 GiB), session_len 32768"
    rows = {what: (reached, note) for what, reached, note in quant_rows(raw)}
    assert rows["throughput, KV int8, 4 x (8 in, 4 out, ratio 0.5)"][1] == "1.50x none"
    assert rows["api_server peak, PyTorch allocator (max reserved / max allocated)"][0] == (
        "6.00 GiB / 4.66 GiB")
    assert rows["api_server peak, nvidia-smi used (whole GPU, minus idle)"][0].startswith(
        "7.00 GiB (7172 MiB used at peak, 4 MiB idle")
    assert rows["api_server after SIGTERM"] == ("exit 0", "exit 0")
    assert rows["step kv4"] == ("FAILED (exit 124, 130 s)", "see quant.log")
