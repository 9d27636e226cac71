"""API keys on every endpoint, keys never logged, prompts logged only up to --max-log-len, HTTPS with
a self-signed certificate made here, localhost by default, and the limits that protect the host."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys

import httpx
import pytest

from tests.serve.conftest import (
    API_KEY,
    REPO_ROOT,
    free_port,
    start_litedeploy,
    subprocess_env,
)
from tests.serve.test_api_server import assert_envelope

SECRET_KEY = "sk-secret-7f3a9c"
WRONG_KEY = "sk-wrong-b41e0d"
MAX_LOG_LEN = 12
SESSION_LEN = 128
MAX_REQUEST_NEW_TOKENS = 64
MAX_REQUEST_BYTES = 4096
LONG_PROMPT = "Hello there " + "ZEBRA-TAIL " * 6


def make_self_signed_cert(folder) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    keyfile, certfile = folder / "key.pem", folder / "cert.pem"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(keyfile), str(certfile)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security")
    keyfile, certfile = make_self_signed_cert(folder)
    port = free_port()
    server = start_litedeploy(
        ["serve", "api_server", "--server-port", str(port), "--cache-max-tokens", "2048",
         "--session-len", str(SESSION_LEN), "--api-keys", SECRET_KEY, "--ssl", "--ssl-keyfile",
         keyfile, "--ssl-certfile", certfile, "--log-level", "INFO",
         "--max-log-len", str(MAX_LOG_LEN), "--max-request-new-tokens",
         str(MAX_REQUEST_NEW_TOKENS), "--max-request-bytes", str(MAX_REQUEST_BYTES)],
        port, folder / "server.log")
    server.url = server.url.replace("http://", "https://")
    server.certfile = certfile
    try:
        _wait_tls(server)
        yield server
    finally:
        server.stop()


def _wait_tls(server) -> None:
    import time

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log()
        try:
            if httpx.get(server.url + "/health", verify=_context(server), timeout=2).is_success:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail(server.log())


def _context(server) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=server.certfile)


@pytest.fixture(scope="module")
def client(tls_server) -> httpx.Client:
    with httpx.Client(base_url=tls_server.url, verify=_context(tls_server), timeout=60,
                      headers={"Authorization": f"Bearer {SECRET_KEY}"}) as session:
        yield session


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def test_https_with_a_verified_self_signed_cert(tls_server, client, model):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=tls_server.url + "/v1", api_key=SECRET_KEY, max_retries=0,
                        http_client=httpx.Client(verify=_context(tls_server)))
    reply = api.chat.completions.create(model=model, max_tokens=2, messages=[
        {"role": "user", "content": LONG_PROMPT}])
    assert reply.usage.completion_tokens == 2
    with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused by default
        httpx.get(tls_server.url + "/health")
    with pytest.raises(httpx.HTTPError):  # and plain HTTP is not spoken on this port
        httpx.get(tls_server.url.replace("https://", "http://") + "/health", timeout=5)


def test_every_endpoint_but_health_needs_the_key(tls_server, client):
    paths = {path: methods for path, methods in client.get("/openapi.json").json()[
        "paths"].items()}
    paths.update({"/docs": {"get": {}}, "/redoc": {"get": {}}, "/openapi.json": {"get": {}}})
    assert {"/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(paths)
    anonymous = httpx.Client(base_url=tls_server.url, verify=_context(tls_server))
    for path, methods in paths.items():
        for method in methods:
            for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"},
                            {"Authorization": SECRET_KEY}):  # no Bearer scheme
                response = anonymous.request(method.upper(), path, headers=headers, json={})
                if path == "/health":
                    assert response.status_code == 200
                else:
                    assert_envelope(response, 401)
                    assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/metrics").status_code == 200  # the key opens it


def test_metrics_public_opens_only_metrics(keyed_server):
    assert httpx.get(keyed_server.url + "/metrics").status_code == 200
    assert_envelope(httpx.get(keyed_server.url + "/v1/models"), 401)
    assert httpx.get(keyed_server.url + "/v1/models",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_keys_are_compared_in_constant_time(monkeypatch):
    import hmac

    from litedeploy.serve.guards import ApiKeyGuard

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    guard = ApiKeyGuard(None, ["first-key", "second-key", "third-key"])
    assert guard.is_valid(b"Bearer first-key") and not guard.is_valid(b"Bearer first-kez")
    assert not guard.is_valid(b"Basic first-key")
    assert len(calls) == 9  # every key every time: which key matched takes no less time


def test_keys_never_logged_prompts_cut_to_max_log_len(tls_server, client, model):
    client.post("/v1/completions", json={"model": model, "prompt": LONG_PROMPT,
                                          "max_tokens": 1})
    httpx.get(tls_server.url + "/v1/models", verify=_context(tls_server),
              headers={"Authorization": f"Bearer {WRONG_KEY}"})
    log = tls_server.log()
    assert "prompt=" in log and "more chars" in log  # INFO logs requests ...
    assert "ZEBRA" not in log  # ... but only the first --max-log-len characters of a prompt
    assert SECRET_KEY not in log and WRONG_KEY not in log


def test_default_bind_is_localhost():
    import argparse

    from litedeploy.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "api_server"])
    assert args.server_name == "127.0.0.1" and not args.ssl


@pytest.mark.parametrize("flags,words", [
    (["--ssl"], "--ssl-keyfile"),
    (["--ssl-certfile", "cert.pem"], "need --ssl"),
])
def test_ssl_flag_errors_are_one_line(flags, words):
    result = subprocess.run(
        [sys.executable, "-m", "litedeploy", "serve", "api_server", "--server-port",
         str(free_port()), *flags], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**subprocess_env(), "SSL_KEYFILE": "", "SSL_CERTFILE": ""}, check=False)
    assert result.returncode == 2 and words in result.stderr
    assert "Traceback" not in result.stderr


# ---- limits that protect the host ----------------------------------------------------------------
def test_session_len_is_enforced_with_the_numbers(client, model):
    body = {"model": model, "prompt": "word " * 100, "max_tokens": 60}
    message = assert_envelope(client.post("/v1/completions", json=body), 400)
    assert str(SESSION_LEN) in message and "60" in message


def test_n_times_max_tokens_is_capped(client, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "n": 4,
            "max_tokens": 20}
    message = assert_envelope(client.post("/v1/chat/completions", json=body), 400)
    assert "80" in message and str(MAX_REQUEST_NEW_TOKENS) in message
    # without max_tokens each choice may run to the session length: capped as well
    assert_envelope(client.post("/v1/chat/completions", json={**body, "max_tokens": None}), 400)
    fits = client.post("/v1/chat/completions", json={**body, "n": 2, "max_tokens": 2})
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 2


def test_request_body_size_limit(client, model):
    big = {"model": model, "prompt": "x" * MAX_REQUEST_BYTES}
    assert str(MAX_REQUEST_BYTES) in assert_envelope(client.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: the guard counts what it reads
        yield b'{"model": "m", "prompt": "'
        for _ in range(8):
            yield b"y" * 1024
        yield b'"}'

    chunked = client.post("/v1/completions", content=chunks(),
                          headers={"content-type": "application/json"})
    assert_envelope(chunked, 413)
    assert client.get("/health").status_code == 200
