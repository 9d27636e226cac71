"""The GPU quantization suite's serving run, CPU-sized: an api_server on dummy int4 weights with
KV int8 and a generated tokenizer, loaded with exact-length token-id prompts; SIGTERM exits 0."""

from __future__ import annotations

import json
import signal

import httpx

from litedeploy.bench.dummy_tokenizer import make_dummy_folder
from litedeploy.bench.serving import run_serving
from tests.helpers.tiny_models import TINY
from tests.serve.conftest import free_port, start_litedeploy, wait_until_ready


def test_dummy_awq_server_takes_token_id_prompts_and_streams_text(tmp_path):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY,
              "rope_theta": 10000.0}
    (config_dir / "config.json").write_text(json.dumps(config))
    model_dir = make_dummy_folder(config_dir, tmp_path / "model")
    port = free_port()
    server = start_litedeploy(["serve", "api_server", str(model_dir), "--device", "cpu",
                               "--load-format", "dummy", "--model-format", "awq",
                               "--quant-policy", "8", "--cache-max-tokens", "4096",
                               "--server-port", str(port)], port, tmp_path / "server.log")
    try:
        wait_until_ready(server)
        result = run_serving(server.url, 8, max_concurrency=8, endpoint="completions",
                             input_len=40, vocab_size=TINY["vocab_size"], max_tokens=6)
        assert (result["completed"], result["errors"]) == (8, 0), result["error_samples"]
        assert result["total_prompt_tokens"] == 8 * 40 and result["total_output_tokens"] == 8 * 6
        assert result["ttft_ms"] is not None  # replies stream as text: the tokenizer was loaded
        metrics = httpx.get(server.url + "/metrics").text
        assert "litedeploy:num_requests_running" in metrics
        assert "gpu_memory" not in metrics  # a CPU server has no CUDA allocator gauges
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.log()
    finally:
        server.stop()
