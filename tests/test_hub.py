"""Model ids: a real hub cache read offline, a download from a hub on 127.0.0.1, one-line errors."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub.constants
import pytest

from litedeploy.cli.main import main
from litedeploy.config import GenerationConfig
from litedeploy.hub import HubError, resolve_model
from litedeploy.loader.model_loader import open_source
from tests.helpers import tiny_models
from tests.helpers.hub_server import COMMIT, hub_server, write_hub_cache

REPO = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    folder, _ = tiny_models.make_llama(tmp_path_factory.mktemp("hub") / "tiny-llama")
    return folder


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for name in ("LITEDEPLOY_USE_MODELSCOPE", "LMDEPLOY_USE_MODELSCOPE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hf"


@pytest.fixture
def online(monkeypatch):
    """Network allowed (the suite runs with HF_HUB_OFFLINE=1, which huggingface_hub reads once)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_offline_cache_runs_by_id(tiny_llama, hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = write_hub_cache(hf_home / "hub", REPO, tiny_llama)
    assert resolve_model(REPO) == str(snapshot)
    assert open_source(resolve_model(REPO)).name == REPO  # served under its id, not the commit

    from litedeploy.api import pipeline

    with pipeline(REPO, revision="main", device="cpu", dtype="float32",
                  cache_max_tokens=256) as pipe:
        by_id = pipe("hello there", GenerationConfig(max_new_tokens=6, ignore_eos=True))
    with pipeline(str(tiny_llama), device="cpu", dtype="float32", cache_max_tokens=256) as pipe:
        by_path = pipe("hello there", GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert by_id.token_ids == by_path.token_ids and len(by_id.token_ids) == 6


def test_existing_path_wins_over_an_id(tiny_llama, hf_home, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org").mkdir()
    (tmp_path / "tiny-org" / "tiny-llama").symlink_to(tiny_llama)
    assert resolve_model(REPO) == REPO  # the relative path, not a hub look-up


def test_offline_errors_are_one_line(hf_home, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="no local path, and .*not in the offline cache .*HF_HUB_OFFLINE=1"):
        resolve_model("nobody/missing-model")
    # the CLI: one line, exit code 2, no traceback
    assert main(["chat", "nobody/missing-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("litedeploy: error: nobody/missing-model is no local path, and "
                          "(revision main) not in the offline cache") and "\n" not in err
    monkeypatch.setenv("LITEDEPLOY_USE_MODELSCOPE", "True")
    with pytest.raises(HubError, match="pip install modelscope"):
        resolve_model("nobody/missing-model")


def test_download_from_a_local_endpoint(tiny_llama, hf_home, online, monkeypatch):
    extra = {"README.md": b"# not fetched", "pytorch_model.bin": b"not fetched either",
             "original/consolidated.pth": b"nor this"}
    files = {str(p.relative_to(tiny_llama)): p.read_bytes() for p in tiny_llama.iterdir()}
    gguf = {"tiny-Q4_K_M.gguf": b"GGUF q4", "tiny-Q8_0.gguf": b"GGUF q8",
            "tiny-Q4_K_M-imat.gguf": b"GGUF q4 imatrix"}
    with hub_server({REPO: {**files, **extra}, "tiny-org/tiny-gguf": gguf,
                     "tiny-org/gated": files}, gated={"tiny-org/gated"}) as (url, requested):
        monkeypatch.setenv("HF_ENDPOINT", url)
        folder = Path(resolve_model(REPO))
        assert folder == hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
        assert sorted(p.name for p in folder.iterdir()) == sorted(files)  # only what we load
        assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert not any("README" in line or ".bin" in line for line in requested)

        gguf_path = Path(resolve_model("tiny-org/tiny-gguf:q4_k_m"))
        assert gguf_path.name == "tiny-Q4_K_M.gguf" and gguf_path.read_bytes() == b"GGUF q4"
        assert not (gguf_path.parent / "tiny-Q8_0.gguf").exists()  # only the tag's files came
        with pytest.raises(HubError, match="no GGUF file with 'Q2_K'"):
            resolve_model("tiny-org/tiny-gguf:Q2_K")
        by_name = resolve_model("tiny-org/tiny-gguf", gguf_file="tiny-Q8_0.gguf")
        assert Path(by_name).read_bytes() == b"GGUF q8"

        with pytest.raises(HubError, match="neither a local path nor a model on http://127"):
            resolve_model("tiny-org/unknown")
        with pytest.raises(HubError, match="is a gated model: accept its terms"):
            resolve_model("tiny-org/gated")
        with pytest.raises(HubError, match="has no revision 'v9'"):
            resolve_model(REPO, revision="v9")

        # lmdeploy's download_dir: another cache folder
        elsewhere = Path(resolve_model(REPO, cache_dir=str(hf_home / "elsewhere")))
        assert elsewhere.parents[2] == hf_home / "elsewhere"
        assert (elsewhere / "config.json").read_bytes() == files["config.json"]

    # the server is gone: the cache answers, offline or not
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_model(REPO)) == folder


def test_unreachable_endpoint(hf_home, online, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 2)
    with pytest.raises(HubError, match="no local path, and cannot reach http://127.0.0.1:.* nor find it in the cache"):
        resolve_model("nobody/missing-model")
