"""Real servers on 127.0.0.1, started as a user would (`python -m litedeploy serve ...`).

Both api_servers start at once (their model loads overlap) and live for the whole session, so the
api_server and gradio test modules share them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-litedeploy-test"
KEYED_MODEL_NAME = "smol"
# The open server's session length bounds replies of requests without max_tokens (the tutorial's
# demo_api.py sets none) so they stay short on a CPU.
OPEN_SESSION_LEN = 192
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_litedeploy(args: list[str], port: int, log_path: Path) -> ServerProcess:
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child writes it until the session ends
    proc = subprocess.Popen([sys.executable, "-m", "litedeploy", *args], cwd=REPO_ROOT,
                            env=subprocess_env(), stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log_file.close()
    return ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)


def wait_until_ready(server: ServerProcess, path: str = "/health") -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="session")
def api_servers(tmp_path_factory):
    """(open server, server with --api-keys, --metrics-public and --max-concurrent-requests 1)."""
    logs = tmp_path_factory.mktemp("api_server_logs")
    common = ["serve", "api_server", "--cache-max-tokens", "16384"]
    open_port, keyed_port = free_port(), free_port()
    servers = [
        start_litedeploy([*common, "--server-port", str(open_port),
                          "--session-len", str(OPEN_SESSION_LEN)], open_port, logs / "open.log"),
        start_litedeploy([*common, "--server-port", str(keyed_port), "--api-keys", "other-key",
                          API_KEY, "--max-concurrent-requests", "1", "--model-name",
                          KEYED_MODEL_NAME, "--metrics-public"], keyed_port, logs / "keyed.log"),
    ]
    try:
        for server in servers:
            wait_until_ready(server)
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def api_server(api_servers) -> ServerProcess:
    return api_servers[0]


@pytest.fixture(scope="session")
def keyed_server(api_servers) -> ServerProcess:
    return api_servers[1]


@dataclass
class TinyServer:
    """An api_server on a tiny random float32 Llama, with its transformers twin as reference."""

    server: ServerProcess
    folder: Path
    hf_model: object
    model_name: str = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_llama_server(tmp_path_factory):
    from tests.helpers import tiny_models

    folder, hf_model = tiny_models.make_llama(tmp_path_factory.mktemp("tiny") / "llama")
    port = free_port()
    server = start_litedeploy(
        ["serve", "api_server", str(folder), "--device", "cpu", "--dtype", "float32",
         "--model-name", TinyServer.model_name, "--cache-max-tokens", "4096",
         "--server-port", str(port)], port, folder.parent / "server.log")
    try:
        wait_until_ready(server)
        yield TinyServer(server, folder, hf_model)
    finally:
        server.stop()
