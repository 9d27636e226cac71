"""`litedeploy serve ray`: N engine replicas behind Ray Serve's HTTP proxy (optional extra)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import threading

from litedeploy.cli.args import (
    HelpFormatter,
    add_engine_args,
    add_log_arg,
    add_model_arg,
    engine_config_from,
    positive_int,
)
from litedeploy.errors import LiteDeployError

API_SERVER_PORT = 23333
LOCALHOST = "127.0.0.1"
RAY_MISSING = ("`serve ray` needs Ray Serve, which is not installed: "
               "pip install 'litedeploy[ray]'")


def add_ray_parser(kinds) -> None:
    parser = kinds.add_parser("ray", formatter_class=HelpFormatter,
                              help="engine replicas behind Ray Serve (prefix-cache-aware routing)")
    add_model_arg(parser)
    group = parser.add_argument_group("replicas")
    group.add_argument("--replicas", type=positive_int, default=1,
                       help="engine replicas, each with its own KV cache (and --tp GPUs)")
    group.add_argument("--min-replicas", type=positive_int, default=None,
                       help="autoscaling: fewest replicas (Ray Serve's autoscaling_config)")
    group.add_argument("--max-replicas", type=positive_int, default=None,
                       help="autoscaling: most replicas")
    group.add_argument("--max-ongoing-requests", type=positive_int, default=256,
                       help="requests one replica takes at once; more wait in Ray Serve")
    group.add_argument("--target-ongoing-requests", type=positive_int, default=64,
                       help="autoscaling: requests per replica it aims at")
    group.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="CPUs Ray reserves for each replica")
    group.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                       help="a running Ray cluster (default: $RAY_ADDRESS, else start one here)")
    group = parser.add_argument_group("server")
    group.add_argument("--server-name", default=LOCALHOST, help="address to listen on")
    group.add_argument("--server-port", type=int, default=API_SERVER_PORT)
    group.add_argument("--model-name", default=None,
                       help="name in /v1/models and in requests (default: the model's)")
    group.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                       help="accept only `Authorization: Bearer KEY` (default: "
                            "$LITEDEPLOY_API_KEYS, space-separated)")
    add_engine_args(parser)
    add_log_arg(parser)
    parser.set_defaults(run=run_ray)


def _check_port(host: str, port: int) -> None:
    """Fail before starting Ray and loading models if the proxy could not listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LiteDeployError(f"cannot listen on {host}:{port} ({exc.strerror}); pick "
                                  "another --server-port or stop the program using it") from None


def run_ray(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve

        from litedeploy.serve.ray_app import APP_NAME, ReplicaOptions, build_app
    except ImportError as exc:
        if (exc.name or "ray").split(".")[0] != "ray":
            raise
        raise LiteDeployError(RAY_MISSING) from None
    options = ReplicaOptions(  # checks the replica bounds before Ray starts
        num_replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        num_cpus=args.cpus_per_replica, max_ongoing_requests=args.max_ongoing_requests,
        target_ongoing_requests=args.target_ongoing_requests)
    _check_port(args.server_name, args.server_port)
    ray.init(address=args.ray_address, include_dashboard=False,
             logging_level=args.log_level, log_to_driver=args.log_level in ("DEBUG", "INFO"))
    try:
        options = dataclasses.replace(options, num_gpus=_gpus_per_replica(args, ray))
        api_keys = args.api_keys or os.environ.get("LITEDEPLOY_API_KEYS", "").split() or None
        settings = {"model_name": args.model_name, "api_keys": api_keys}
        serve.start(http_options={"host": args.server_name, "port": args.server_port})
        app = build_app(args.model_path, engine_config_from(args), settings, options)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica could not start (a bad model or flag)
            raise LiteDeployError(f"Ray Serve could not start the replicas ({exc}); their "
                                  "errors are in Ray's logs/serve folder (or rerun with "
                                  "--log-level INFO)") from None
        print(f"litedeploy serve ray: {args.replicas} replica(s) on Ray at "
              f"{ray.get_runtime_context().gcs_address}; serving http://{args.server_name}:"
              f"{args.server_port} (OpenAI API at /v1)", flush=True)
        _wait_for_signal()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _gpus_per_replica(args: argparse.Namespace, ray) -> float:
    on_gpu = args.device == "cuda" or (
        args.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    return float(args.tp) if on_gpu else 0.0


def _wait_for_signal() -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(timeout=1.0):
        pass
    print("litedeploy serve ray: shutting down", file=sys.stderr, flush=True)
