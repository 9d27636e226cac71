"""`--max-gpu-memory GIB`: parsed on every engine command, refused on CPU and when the weights do
not fit, and the KV cache is sized inside the cap (not from the device's free memory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litedeploy import pipeline
from litedeploy.cli.args import engine_config_from
from litedeploy.cli.main import build_parser, main
from litedeploy.config import CacheConfig, EngineConfig, GenerationConfig, ModelConfig
from litedeploy.engine.kv_cache import plan_cache
from litedeploy.errors import ModelLoadError
from litedeploy.loader.model_loader import build_model, gpu_memory_cap_bytes, module_tensor_bytes
from tests.helpers.subprocess_env import repo_env
from tests.helpers.tiny_models import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
HAS_CUDA = torch.cuda.is_available()


def _config_folder(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY,
              "rope_theta": 10000.0, **overrides}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _model_config() -> ModelConfig:
    return ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], **TINY})


def _litedeploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litedeploy", *args], cwd=REPO_ROOT,
                          env=repo_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                          timeout=180)


@pytest.mark.parametrize("command", [["chat"], ["serve", "api_server"], ["serve", "gradio"],
                                     ["bench", "throughput"], ["bench", "latency"]])
def test_every_engine_command_takes_the_flag(command):
    args = build_parser().parse_args([*command, "--max-gpu-memory", "7.5"])
    config = engine_config_from(args)
    assert config.max_gpu_memory == 7.5 and config.cache_config().max_gpu_memory == 7.5
    default = engine_config_from(build_parser().parse_args(command))
    assert default.max_gpu_memory is None


@pytest.mark.parametrize("value, message", [("0", "must be a positive number of GiB, got 0"),
                                            ("-2", "must be a positive number of GiB, got -2"),
                                            ("inf", "must be a positive number of GiB, got inf"),
                                            ("8GB", "must be a number of GiB, got '8GB'")])
def test_bad_values_are_one_line_and_exit_2(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "throughput", "--max-gpu-memory", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--max-gpu-memory" in err and message in err


def test_python_api_validates_the_cap(tmp_path):
    with pytest.raises(ModelLoadError, match="positive number of GiB, got 0"):
        pipeline(str(_config_folder(tmp_path / "m")), max_gpu_memory=0, load_format="dummy")


def test_cpu_refuses_the_cap_in_one_line(tmp_path):
    result = _litedeploy("bench", "throughput", str(_config_folder(tmp_path / "m")),
                         "--device", "cpu", "--load-format", "dummy", "--max-gpu-memory", "4",
                         "--num-prompts", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "litedeploy: error: --max-gpu-memory caps CUDA memory, but the model runs on cpu; "
        "drop the flag (or use --device cuda on a GPU)")


def test_weights_larger_than_the_cap_are_refused_naming_both_sizes():
    config = _model_config()
    with torch.device("meta"):
        need = module_tensor_bytes(build_model(config, torch.float32, torch.device("meta")))
    assert need > 100 * 1024  # ~0.4 MiB of float32 weights
    with pytest.raises(ModelLoadError) as error:
        build_model(config, torch.float32, torch.device("cpu"), max_bytes=100 * 1024)
    assert str(error.value).startswith(
        f"the model's weights need {need / 2**20:.2f} MiB, more than --max-gpu-memory 0.10 MiB")
    build_model(config, torch.float32, torch.device("cpu"), max_bytes=need)  # exactly fits


@pytest.fixture
def fake_gpu(monkeypatch):
    """A pretend 80 GiB device with 70 GiB free, PyTorch holding `state["reserved"]`."""
    state = {"reserved": 3 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    return state


def _plan(cache_config: CacheConfig):
    return plan_cache(_model_config(), cache_config, torch.bfloat16, torch.device("cuda"),
                      max_useful_tokens=10**12)


def test_kv_cache_budget_is_what_the_cap_leaves(fake_gpu):
    capped = _plan(CacheConfig(cache_max_entry_count=0.5, max_gpu_memory=8.0))
    per_token = capped.bytes_per_token
    block = capped.block_size
    assert capped.num_tokens == int(0.5 * (8 - 3) * GIB // per_token) // block * block
    free = _plan(CacheConfig(cache_max_entry_count=0.5))  # no cap: the device's free memory
    assert free.num_tokens == int(0.5 * 70 * GIB // per_token) // block * block
    fake_gpu["reserved"] = 7.5 * GIB  # the warm-up reserved more: the cache shrinks with it
    assert _plan(CacheConfig(cache_max_entry_count=0.5, max_gpu_memory=8.0)).num_tokens == (
        int(0.5 * 0.5 * GIB // per_token) // block * block)


def test_a_cap_that_leaves_no_room_for_the_cache_is_a_clear_error(fake_gpu):
    fake_gpu["reserved"] = 8 * GIB
    with pytest.raises(ModelLoadError, match=r"one KV cache block of 64 tokens needs .* but "
                       r"--max-gpu-memory 8.00 GiB leaves 0.00 GiB"):
        _plan(CacheConfig(max_gpu_memory=8.0))
    fake_gpu["reserved"] = 3 * GIB
    with pytest.raises(ModelLoadError, match="--cache-max-tokens 100000000 needs"):
        _plan(CacheConfig(max_cache_tokens=10**8, max_gpu_memory=8.0))
    assert _plan(CacheConfig(max_cache_tokens=4096, max_gpu_memory=8.0)).num_tokens == 4096


# ---- on a GPU ---------------------------------------------------------------------------------
@pytest.fixture
def uncapped_after():
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_engine_stays_inside_the_cap_on_cuda(tmp_path, uncapped_after):
    from litedeploy.engine.engine import LLMEngine

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cap_gib = torch.cuda.memory_reserved() / GIB + 0.5  # what earlier tests hold, plus 0.5 GiB
    config = EngineConfig(device="cuda", dtype="bfloat16", load_format="dummy",
                          max_gpu_memory=cap_gib, eager_mode=True)
    # a long context, so that memory (not batch x session length) bounds the cache
    folder = _config_folder(tmp_path / "m", max_position_embeddings=2**20)
    engine = LLMEngine.from_pretrained(str(folder), config)
    [out] = engine.generate([[5, 6, 7, 8]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    assert out.generate_token_len == 8
    # ~80% of what the cap leaves, not 80% of the device's free memory
    assert 0.2 < engine.kv_cache.shape.size_gib < 0.5
    assert torch.cuda.max_memory_reserved() <= cap_gib * GIB


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_cap_errors_are_one_line(tmp_path):
    folder = str(_config_folder(tmp_path / "m"))
    result = _litedeploy("bench", "throughput", folder, "--device", "cuda", "--load-format",
                         "dummy", "--max-gpu-memory", "0.0001", "--num-prompts", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the model's weights need" in result.stderr.splitlines()[-1]
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    with pytest.raises(ModelLoadError, match="is more than the device's"):
        gpu_memory_cap_bytes(total + 1, torch.device("cuda"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_server_metrics_expose_the_cuda_allocator_peak():
    from litedeploy.serve.metrics import ServerMetrics

    held = torch.empty(2**20, device="cuda")  # CUDA in use, as in a GPU server
    text = ServerMetrics(dict, "m").render()[0].decode()
    line = next(line for line in text.splitlines()
                if line.startswith("litedeploy:gpu_memory_max_reserved_bytes{"))
    assert float(line.split()[-1]) >= held.numel() * 4
