"""--tp 4 over two "nodes" of 2 ranks each, on this machine (gloo on CPU): the --nnodes flags and
torchrun's launcher generate what --tp 1 generates; a lost node ends the other; bad flags are one
clear line and exit code 2; each rank reads only its slices of the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from litedeploy.cli.main import main as cli_main
from litedeploy.config import EngineConfig, GenerationConfig, ModelConfig
from litedeploy.engine.engine import LLMEngine
from litedeploy.loader.model_loader import build_model
from litedeploy.loader.sharded import rank_tensors
from tests.helpers import tiny_models
from tests.serve.conftest import free_port, subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADS = {"num_attention_heads": 8, "num_key_value_heads": 4}  # tp 4 splits 4 KV heads; GQA 2:1
PROMPTS = [[1] + [(7 * j + i) % 250 + 20 for j in range(n)] for i, n in enumerate([5, 19, 33])]
MAX_TOKENS = 12
SEED = 1234
ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32", "--session-len", "256",
               "--max-batch-size", "4", "--cache-max-tokens", "1024", "--cache-block-seq-len", "4"]
START_TIMEOUT_S = 180


def _gen(index: int) -> GenerationConfig:
    # seeded sampling over the whole vocabulary: tokens that depend on every logit, not only on
    # the argmax a tiny random model repeats
    return GenerationConfig(max_new_tokens=MAX_TOKENS, ignore_eos=True, do_sample=index > 0,
                            temperature=1.0, top_p=1.0, top_k=0, random_seed=SEED + index)


def _tp1(folder: Path) -> list[dict]:
    """--tp 1's replies: the first prompt greedy, the others sampled (seed SEED + index)."""
    engine = LLMEngine.from_pretrained(str(folder), EngineConfig(device="cpu", dtype="float32"))
    replies = []
    for index, prompt in enumerate(PROMPTS):
        out = engine.generate([prompt], _gen(index))[0]
        replies.append({"text": out.text, "token_ids": out.token_ids})
    return replies


def _served(url: str) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    replies = []
    for index, prompt in enumerate(PROMPTS):
        sampling = ({"temperature": 0} if index == 0
                    else {"temperature": 1.0, "top_p": 1.0, "seed": SEED + index})
        reply = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                          max_tokens=MAX_TOKENS, **sampling,
                                          extra_body={"ignore_eos": True, "top_k": 0})
        replies.append({"text": reply.choices[0].text,
                        "num_tokens": reply.usage.completion_tokens})
    return replies


def _check_equal(served: list[dict], expected: list[dict]) -> None:
    assert [r["text"] for r in served] == [r["text"] for r in expected]
    assert all(r["num_tokens"] == MAX_TOKENS for r in served)
    assert len({r["text"] for r in expected}) == len(expected)  # not one degenerate reply


def _start(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:  # each "node" is its own session: killed as a whole
        return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=subprocess_env(),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_ready(url: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            assert proc.poll() is None, f"{log.name} exited:\n{log.read_text(errors='replace')}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail("two-node server not ready:\n" + "\n".join(p.read_text() for p in logs))


def _spawned_rank_pid(node: subprocess.Popen) -> int:
    """The rank a node's process spawned (not multiprocessing's resource tracker)."""
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == node.pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no spawned rank under {node.pid}")


def test_two_nodes_serve_like_one_and_a_lost_rank_ends_all(tmp_path):
    """InternLM2 (packed wqkv, sliced per KV-head group) through `serve api_server --nnodes 2`;
    then node 1's spawned rank 3 is killed mid-stream: the client gets an error, and both
    nodes exit non-zero with a clear line."""
    import openai

    folder, _ = tiny_models.make_internlm2(tmp_path / "m", **HEADS)
    expected = _tp1(folder)
    port, master_port = free_port(), free_port()
    common = ["-m", "litedeploy", "serve", "api_server", str(folder), "--tp", "4", "--nnodes",
              "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port),
              "--server-port", str(port), *ENGINE_ARGS]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    node1 = _start([*common, "--node-rank", "1"], logs[1])
    node0 = _start([*common, "--node-rank", "0"], logs[0])
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, [node0, node1], logs)
        _check_equal(_served(url), expected)
        assert "node 1 of 2, rank 2" in logs[1].read_text()

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model=client.models.list().data[0].id, prompt=[1, 5],
                                           max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError):
            for index, _chunk in enumerate(stream):
                if index == 2:
                    os.kill(_spawned_rank_pid(node1), signal.SIGKILL)
                    killed_at = time.monotonic()
        for node, log_path in zip((node0, node1), logs):
            assert node.wait(timeout=60) != 0
            assert time.monotonic() - killed_at < 30
            log = log_path.read_text(errors="replace")
            assert any(line.startswith("litedeploy: error: tensor-parallel")
                       for line in log.splitlines()), log
    finally:
        _kill_group(node0)
        _kill_group(node1)


def _torchrun(node_rank: int, master_port: int, args: list[str]) -> list[str]:
    return ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port",
            str(master_port), *args]


def _rank0_pid(agent: subprocess.Popen) -> int:
    """torchrun's worker process with RANK=0."""
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == agent.pid and b"\0RANK=0\0" in b"\0" + (entry / "environ").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError("no RANK=0 worker under torchrun")


def test_torchrun_api_server_equals_tp1(tmp_path):
    """Qwen2 (q/k/v biases sliced too) through `torchrun ... -m litedeploy serve api_server`:
    each process is one rank; SIGTERM to rank 0 stops all four, every launcher exits 0."""
    folder, _ = tiny_models.make_qwen2(tmp_path / "m", **HEADS)
    expected = _tp1(folder)
    port, master_port = free_port(), free_port()
    serve = ["-m", "litedeploy", "serve", "api_server", str(folder), "--tp", "4",
             "--server-port", str(port), *ENGINE_ARGS]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    node1 = _start(_torchrun(1, master_port, serve), logs[1])
    node0 = _start(_torchrun(0, master_port, serve), logs[0])
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, [node0, node1], logs)
        _check_equal(_served(url), expected)
        os.kill(_rank0_pid(node0), signal.SIGTERM)
        assert node0.wait(timeout=90) == 0, logs[0].read_text()
        assert node1.wait(timeout=30) == 0, logs[1].read_text()
    finally:
        _kill_group(node0)
        _kill_group(node1)


TORCHRUN_SCRIPT = """
import json, sys
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.engine import LLMEngine

# ranks 1..3 follow rank 0's steps inside from_pretrained and end there
engine = LLMEngine.from_pretrained(sys.argv[1], EngineConfig(tp=4, {config}))
prompts, replies = {prompts}, []
for index, prompt in enumerate(prompts):
    gen = GenerationConfig(max_new_tokens={max_tokens}, ignore_eos=True, do_sample=index > 0,
                           temperature=1.0, top_p=1.0, top_k=0, random_seed={seed} + index)
    out = engine.generate([prompt], gen)[0]
    replies.append({{"text": out.text, "token_ids": out.token_ids}})
engine.close()
print("REPLIES", json.dumps(replies), flush=True)
"""


def test_torchrun_library_equals_tp1(tmp_path):
    """Llama (tied embeddings) through `torchrun script.py`: LLMEngine.from_pretrained reads
    torchrun's environment; the token ids equal --tp 1's."""
    folder, _ = tiny_models.make_llama(tmp_path / "m", tie=True, **HEADS)
    expected = _tp1(folder)
    script = tmp_path / "generate.py"
    script.write_text(TORCHRUN_SCRIPT.format(
        config='device="cpu", dtype="float32", session_len=256, max_batch_size=4, '
               'cache_max_tokens=1024, cache_block_seq_len=4',
        prompts=PROMPTS, max_tokens=MAX_TOKENS, seed=SEED))
    master_port = free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    node1 = _start(_torchrun(1, master_port, [str(script), str(folder)]), logs[1])
    node0 = _start(_torchrun(0, master_port, [str(script), str(folder)]), logs[0])
    try:
        assert node0.wait(timeout=START_TIMEOUT_S) == 0, logs[0].read_text()
        assert node1.wait(timeout=60) == 0, logs[1].read_text()
    finally:
        _kill_group(node0)
        _kill_group(node1)
    line = next(x for x in logs[0].read_text().splitlines() if "REPLIES " in x)
    assert json.loads(line.split("REPLIES ", 1)[1]) == expected


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder, _ = tiny_models.make_llama(tmp_path_factory.mktemp("tiny") / "m", **HEADS)
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--tp", "4", "--nnodes", "2"], "--nnodes 2 needs --master-addr"),
    (["--tp", "4", "--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"],
     "--node-rank 2 is out of range for --nnodes 2"),
    (["--tp", "3", "--nnodes", "2", "--master-addr", "127.0.0.1"],
     "--tp 3 is not divisible by --nnodes 2"),
    # node 1 checks the split before it starts or waits for anything
    (["--tp", "6", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1"],
     "--tp 6 does not divide num_attention_heads 8"),
])
def test_bad_multinode_flags(tiny_folder, capsys, flags, message):
    code = cli_main(["serve", "api_server", str(tiny_folder), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("litedeploy: error: ") and message in err
    assert err.count("\n") == 1, err


def test_bad_tp_on_node_0_and_under_torchrun(tiny_folder, capsys, monkeypatch):
    """A tp that does not divide the heads, on node 0 (before any rank is spawned); a --tp that
    is not torchrun's WORLD_SIZE."""
    assert cli_main(["chat", str(tiny_folder), "--device", "cpu", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    # (chat says "loading ..." first)
    assert err.splitlines()[-1].startswith("litedeploy: error: --tp 3 does not divide")
    assert err.count("error") == 1 and "Traceback" not in err
    for name, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert cli_main(["serve", "api_server", str(tiny_folder), "--device", "cpu",
                     "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "torchrun started 4 processes (WORLD_SIZE) but --tp is 2" in err
    assert err.count("\n") == 1


class _RecordingHandle:
    """The real safetensors handle, recording how each tensor is read."""

    def __init__(self, handle, reads: list[tuple]):
        self.handle, self.reads = handle, reads

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name: str):
        self.reads.append(("whole", name))
        return self.handle.get_tensor(name)

    def get_slice(self, name: str):
        real, reads = self.handle.get_slice(name), self.reads

        class Slice:
            def __getitem__(self, index):
                reads.append(("slice", name, index))
                return real[index]

        return Slice()


def test_each_rank_reads_only_its_slices(tmp_path, monkeypatch):
    """Sharded tensors are read through get_slice with the rank's own row/column range, never
    whole; the values are the rank's slices, InternLM2's wqkv rows of its KV-head groups too."""
    from litedeploy.loader import weights

    folder, _ = tiny_models.make_internlm2(tmp_path / "m", **HEADS)
    full = load_file(str(folder / "model.safetensors"))
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text())).shard(4)
    model = build_model(config, torch.float32, torch.device("meta"))
    real_open = weights._open_safetensors
    reads: list[tuple] = []
    monkeypatch.setattr(weights, "_open_safetensors",
                        lambda path: _RecordingHandle(real_open(path), reads))
    for rank in (0, 3):
        reads.clear()
        sharded = set()
        for name, tensor in rank_tensors([folder / "model.safetensors"], model, rank):
            piece = model.tp_slice(name, rank)
            expected = full[name] if piece is None else full[name].narrow(*piece)
            assert torch.equal(tensor, expected), name
            if piece is not None:
                dim, start, length = piece
                sharded.add(name)
                index = (slice(None),) * dim + (slice(start, start + length),)
                assert ("slice", name, index) in reads, name
        assert len(sharded) == 2 + 2 * 5  # embeddings, LM head; wqkv, wo, w1, w2, w3 per layer
        assert not [read for read in reads if read[0] == "whole" and read[1] in sharded]


def test_heartbeats_name_the_lost_rank_and_a_lost_store():
    """Liveness over a real TCPStore: a rank whose heartbeats stop is named by the others within
    the timeout; when the store's host (rank 0) goes, the others say so."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from litedeploy.distributed.liveness import Liveness

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=5))
    lost: dict[int, str] = {}
    done = {rank: threading.Event() for rank in range(3)}

    def reporter(rank: int):
        def on_lost(message: str) -> None:
            lost[rank] = message
            done[rank].set()
        return on_lost

    ranks = [Liveness("127.0.0.1", port, rank, 3, 2.0, lambda r: f"rank {r}", reporter(rank))
             for rank in range(3)]
    for liveness in ranks:
        liveness.start()
    time.sleep(1.5)
    assert not lost  # all beating
    ranks[2].stop()  # rank 2 goes silent (and, leaving on purpose, reports nothing itself)
    start = time.monotonic()
    assert done[0].wait(10) and done[1].wait(10)
    assert time.monotonic() - start < 6
    assert "rank 2 is lost: no heartbeat for 2 s" in lost[0] and "rank 2 is lost" in lost[1]
    assert 2 not in lost

    survivor = Liveness("127.0.0.1", port, 1, 1, 2.0, str, reporter(2))
    survivor.start()
    time.sleep(1.0)
    del store  # rank 0's store goes with its process
    assert done[2].wait(15), "a vanished store was not reported"
    assert "lost the rendezvous store at 127.0.0.1" in lost[2]
