"""`litedeploy serve api_server | gradio | api_client` (lmdeploy's flags and defaults)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from litedeploy.cli.args import (
    HelpFormatter,
    add_engine_args,
    add_log_arg,
    add_model_arg,
    engine_config_from,
    positive_int,
)
from litedeploy.cli.serve_ray import add_ray_parser
from litedeploy.serve.tools import parser_choices as tool_parser_choices

# the server's defaults, repeated here so `--help` works without fastapi installed
MAX_REQUEST_NEW_TOKENS = 65536
MAX_REQUEST_BYTES = 32 * 1024 * 1024
BODY_TIMEOUT_S = 60.0
MAX_LOG_LEN = 256
API_SERVER_PORT = 23333
GRADIO_PORT = 6006
LOCALHOST = "127.0.0.1"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", formatter_class=HelpFormatter,
        help="serve a model: OpenAI-compatible API server, Gradio page, or API client")
    kinds = parser.add_subparsers(dest="serve_kind", metavar="KIND")
    _add_api_server(kinds)
    _add_gradio(kinds)
    _add_api_client(kinds)
    add_ray_parser(kinds)  # `serve ray`: replicas through Ray Serve (optional extra)
    parser.set_defaults(run=lambda _args: (parser.print_help(), 2)[1])


def _add_api_server(kinds) -> None:
    parser = kinds.add_parser("api_server", formatter_class=HelpFormatter,
                              help="OpenAI-compatible HTTP API (FastAPI + uvicorn)")
    add_model_arg(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--server-name", default=LOCALHOST, help="address to listen on")
    group.add_argument("--server-port", type=int, default=API_SERVER_PORT)
    group.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                       help="accept only `Authorization: Bearer KEY` on every endpoint but "
                            "GET /health (default: $LITEDEPLOY_API_KEYS, space-separated)")
    group.add_argument("--metrics-public", action="store_true",
                       help="serve /metrics without an API key")
    group.add_argument("--ssl", action="store_true",
                       help="serve HTTPS with --ssl-keyfile/--ssl-certfile (or $SSL_KEYFILE, "
                            "$SSL_CERTFILE)")
    group.add_argument("--ssl-keyfile", default=None, help="PEM private key (with --ssl)")
    group.add_argument("--ssl-certfile", default=None, help="PEM certificate chain (with --ssl)")
    group.add_argument("--allow-origins", nargs="+", default=["*"], help="CORS origins")
    group.add_argument("--allow-credentials", action="store_true", help="CORS credentials")
    group.add_argument("--allow-methods", nargs="+", default=["*"], help="CORS methods")
    group.add_argument("--allow-headers", nargs="+", default=["*"], help="CORS headers")
    group.add_argument("--model-name", default=None,
                       help="name in /v1/models and in requests (default: the model's folder "
                            "or file name)")
    group.add_argument("--max-concurrent-requests", type=positive_int, default=None,
                       help="generations in flight before new ones get 503 (default: no limit)")
    group.add_argument("--max-waiting-requests", type=positive_int, default=None,
                       help="requests waiting for their first token before new ones get 503 "
                            "(default: no limit)")
    group.add_argument("--max-request-new-tokens", type=positive_int,
                       default=MAX_REQUEST_NEW_TOKENS,
                       help="cap on n x max_tokens of one request (400 above it)")
    group.add_argument("--max-request-bytes", type=positive_int, default=MAX_REQUEST_BYTES,
                       help="request body size limit (413 above it)")
    group.add_argument("--request-read-timeout", type=_positive_float, default=30.0,
                       help="seconds a client may take to send a request head or to go on with "
                            "its body before the server drops it")
    group.add_argument("--request-body-timeout", type=_positive_float, default=BODY_TIMEOUT_S,
                       help="seconds a client may take to send its whole request body (408 "
                            "after it, however the body trickles)")
    group.add_argument("--timeout-keep-alive", type=_positive_float, default=5.0,
                       help="seconds an idle keep-alive connection stays open")
    group.add_argument("--drain-timeout", type=_positive_float, default=30.0,
                       help="on SIGTERM, seconds in-flight requests may take to finish (new "
                            "ones get 503) before the server exits")
    group.add_argument("--max-log-len", type=int, default=MAX_LOG_LEN,
                       help="max prompt characters in the request log (--log-level INFO); -1 "
                            "logs whole prompts")
    group.add_argument("--enable-debug-endpoints", action="store_true",
                       help="serve /debug/state and POST /debug/fail_next_step (tests only)")
    group.add_argument("--disable-fastapi-docs", action="store_true",
                       help="do not serve /docs, /redoc and /openapi.json")
    group.add_argument("--tool-call-parser", default=None, choices=tool_parser_choices(),
                       help="how tool calls are read from the model's output (default: by model "
                            "type: internlm2 -> internlm2, llama -> llama3, qwen2 -> hermes)")
    add_engine_args(parser)
    add_log_arg(parser)
    parser.set_defaults(run=run_api_server)


def _add_gradio(kinds) -> None:
    parser = kinds.add_parser("gradio", formatter_class=HelpFormatter,
                              help="Gradio chat page (in-process model, or a running api_server)")
    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL_OR_URL",
                        help="model folder / .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct), or http://HOST:PORT of an api_server")
    parser.add_argument("--server-name", default=LOCALHOST, help="address to listen on")
    parser.add_argument("--server-port", type=int, default=GRADIO_PORT)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--api-key", default=None, help="API key of the api_server (URL mode)")
    add_engine_args(parser)
    add_log_arg(parser)
    parser.set_defaults(run=run_gradio)


def _add_api_client(kinds) -> None:
    parser = kinds.add_parser("api_client", formatter_class=HelpFormatter,
                              help="chat with a running api_server in the terminal")
    parser.add_argument("url", nargs="?", default=f"http://{LOCALHOST}:{API_SERVER_PORT}",
                        help="the api_server's address")
    parser.add_argument("--api-key", default=None, help="one of the server's --api-keys")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="max tokens of each reply (default: the server's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature, 0 = greedy (default: the server's, 0.7)")
    add_log_arg(parser)
    parser.set_defaults(run=run_api_client)


# ---- api_server ----------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    from litedeploy.serve.errors import ServerStartError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another "
                               "--server-port or stop the program using it") from exc
    sock.listen(2048)
    return sock


def _ssl_files(args: argparse.Namespace) -> tuple[str | None, str | None]:
    from litedeploy.serve.errors import ServerStartError

    keyfile = args.ssl_keyfile or (os.environ.get("SSL_KEYFILE") if args.ssl else None)
    certfile = args.ssl_certfile or (os.environ.get("SSL_CERTFILE") if args.ssl else None)
    if not args.ssl:
        if keyfile or certfile:
            raise ServerStartError("--ssl-keyfile/--ssl-certfile need --ssl")
        return None, None
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if not path or not os.path.isfile(path):
            raise ServerStartError(f"--ssl needs {flag} (or ${flag[2:].replace('-', '_').upper()})"
                                   f" naming a PEM file; got {path!r}")
    return keyfile, certfile


def settings_from(args: argparse.Namespace, model_name: str):
    from litedeploy.serve.openai_server import ServerSettings

    api_keys = args.api_keys or os.environ.get("LITEDEPLOY_API_KEYS", "").split() or None
    return ServerSettings(
        model_name=args.model_name or model_name, api_keys=api_keys,
        metrics_public=args.metrics_public,
        allow_origins=args.allow_origins, allow_credentials=args.allow_credentials,
        allow_methods=args.allow_methods, allow_headers=args.allow_headers,
        max_concurrent_requests=args.max_concurrent_requests,
        max_waiting_requests=args.max_waiting_requests,
        max_request_new_tokens=args.max_request_new_tokens,
        max_request_bytes=args.max_request_bytes, body_read_timeout_s=args.request_read_timeout,
        body_timeout_s=args.request_body_timeout,
        max_log_len=None if args.max_log_len < 0 else args.max_log_len,
        disable_fastapi_docs=args.disable_fastapi_docs,
        enable_debug_endpoints=args.enable_debug_endpoints,
        tool_call_parser=args.tool_call_parser)


def run_api_server(args: argparse.Namespace) -> int:
    import uvicorn

    from litedeploy.engine.async_engine import AsyncEngine
    from litedeploy.engine.cpu_compile_cache import decode_status_text
    from litedeploy.serve.openai_server import create_app
    from litedeploy.serve.runtime import DrainingServer, timed_h11_protocol

    ssl_keyfile, ssl_certfile = _ssl_files(args)
    sock = _bind(args.server_name, args.server_port)  # fail before a long model load
    engine = AsyncEngine.from_pretrained(args.model_path, engine_config_from(args))
    try:
        settings = settings_from(args, engine.model_name)
        app = create_app(engine, settings)
        shape = engine.engine.kv_cache.shape
        docs = "" if args.disable_fastapi_docs else ", docs at /docs"
        scheme = "https" if ssl_certfile else "http"
        decode = decode_status_text(engine.engine)  # CPU: compiled decode on, compiling or off
        decode = f", decode {decode}" if decode else ""
        copies = getattr(engine.engine, "bf16_copy_bytes", 0)  # CPU: bf16 weights for steps of many rows
        decode += f", bf16 weight copies {copies / 2**30:.2f} GiB" if copies else ""
        print(f"litedeploy api_server: {settings.model_name} on {engine.engine.device}, KV cache "
              f"{shape.num_tokens} tokens ({shape.size_gib:.2f} GiB), session_len "
              f"{engine.engine.session_len}{decode}; serving {scheme}://{args.server_name}:"
              f"{args.server_port} (OpenAI API at /v1{docs})", flush=True)
        config = uvicorn.Config(app, log_level=args.log_level.lower(),
                                access_log=args.log_level in ("DEBUG", "INFO"),
                                http=timed_h11_protocol(args.request_read_timeout),
                                timeout_keep_alive=args.timeout_keep_alive,
                                timeout_graceful_shutdown=2,
                                ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)
        server = DrainingServer(config, app.state.server.admission, args.drain_timeout)
        server.run(sockets=[sock])
    finally:
        sock.close()
        # a step still running (a long prefill) gets the drain timeout again, then is left behind
        if not engine.close(timeout_s=args.drain_timeout):
            from litedeploy.serve.runtime import exit_now

            exit_now(0 if sys.exc_info()[0] is None else 1)
    return 0


# ---- gradio ------------------------------------------------------------------------------------
def run_gradio(args: argparse.Namespace) -> int:
    from litedeploy.serve import gradio_app

    target = args.model_path
    if target and "://" in target:
        backend = gradio_app.RemoteChat(target, args.api_key)
    else:
        from litedeploy.engine.async_engine import AsyncEngine
        from litedeploy.engine.cpu_compile_cache import decode_status_text

        backend = gradio_app.EngineChat(
            AsyncEngine.from_pretrained(target, engine_config_from(args)))
        decode = decode_status_text(backend.engine.engine)
        if decode:
            print(f"litedeploy gradio: decode {decode}", flush=True)
    try:
        gradio_app.launch(backend, args.server_name, args.server_port, args.share)
    finally:
        if isinstance(backend, gradio_app.EngineChat):
            backend.engine.close()
    return 0


# ---- api_client --------------------------------------------------------------------------------
def _read_line(session) -> str | None:
    try:
        return session.prompt("user> ") if session else input("user> ")
    except EOFError:
        return None


def run_api_client(args: argparse.Namespace) -> int:
    """Type a message, read the streamed reply; `exit` quits, `reset` starts over."""
    import openai

    try:
        return _chat_loop(args)
    except openai.APIError as exc:  # connection refused, bad key, ...: one line, no traceback
        print(f"\nlitedeploy: error: {args.url}: {exc}", file=sys.stderr)
        return 1


def _chat_loop(args: argparse.Namespace) -> int:
    from openai import OpenAI

    base_url = args.url.rstrip("/")
    base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
    client = OpenAI(base_url=base_url, api_key=args.api_key or "EMPTY")
    model = client.models.list().data[0].id
    session = None
    if sys.stdin.isatty():
        from prompt_toolkit import PromptSession

        session = PromptSession()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"chatting with {model} at {args.url}; `exit` quits, `reset` starts over", flush=True)
    while (line := _read_line(session)) is not None:
        text = line.strip()
        if text == "exit":
            break
        if text in ("reset", "end"):
            history = []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        extra = {k: v for k, v in (("max_tokens", args.max_tokens),
                                   ("temperature", args.temperature)) if v is not None}
        reply = ""
        print("assistant> ", end="", flush=True)
        for chunk in client.chat.completions.create(model=model, messages=system + history,
                                                    stream=True, **extra):
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                reply += delta
                print(delta, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
    return 0
