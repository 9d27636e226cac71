"""Engine replicas behind Ray Serve's HTTP proxy (`litedeploy serve ray`).

Two deployments:
- `EngineReplica` (N of them, or autoscaled): each owns an AsyncEngine (its own KV cache) and the
  api_server's own FastAPI app (`openai_server.create_app`), so every route, error envelope and
  stream is the api_server's. A request reaches the app through `asgi_bridge.call_app`.
- `OpenAIIngress`: the HTTP entry point. It reads each request into an `HttpCall` whose routing key
  is the prompt's start, and sends it through a handle whose request router
  (`ray_router.PrefixAffinityRouter`) prefers the replica holding that prefix. It is an ingress of
  its own because Ray's proxy routes before the body is read, and the prompt is in the body.

Every response carries the serving replica's id in X-Litedeploy-Replica; a request that sends
that header goes to that replica (per-replica /metrics). A replica that dies mid-request answers
its clients with a 503 envelope, or with an error event and [DONE] on a stream that had started;
Ray Serve starts a new replica in its place.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from litedeploy.config import EngineConfig
from litedeploy.serve.asgi_bridge import REPLICA_HEADER, HttpCall, call_app, routing_key
from litedeploy.serve.errors import APIError, error_body, error_response
from litedeploy.serve.ray_router import IMBALANCED_THRESHOLD, PrefixAffinityRouter

logger = logging.getLogger(__name__)

APP_NAME = "litedeploy"
REPLICA_DEPLOYMENT = "EngineReplica"
INGRESS_DEPLOYMENT = "OpenAIIngress"
REPLICA_FAILED = "the model replica serving this request failed"
# A replica's engine takes this long at most to finish its step when Ray Serve stops it.
CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReplicaOptions:
    num_replicas: int = 1
    min_replicas: int | None = None  # autoscaling when min/max are set
    max_replicas: int | None = None
    num_gpus: float = 0.0  # per replica: its tensor-parallel size on GPUs
    num_cpus: float = 1.0
    max_ongoing_requests: int = 256  # per replica; Ray Serve's default (5) starves a batch
    target_ongoing_requests: int = 64  # what autoscaling aims at per replica
    imbalanced_threshold: int = IMBALANCED_THRESHOLD

    def __post_init__(self) -> None:
        if self.autoscaling and not (self.lowest <= self.num_replicas <= self.highest):
            raise ValueError(f"--replicas {self.num_replicas} must lie between --min-replicas "
                             f"{self.lowest} and --max-replicas {self.highest}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def lowest(self) -> int:
        return self.min_replicas if self.min_replicas is not None else 1

    @property
    def highest(self) -> int:
        return self.max_replicas if self.max_replicas is not None else max(
            self.lowest, self.num_replicas)

    def replica_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "request_router_config": RequestRouterConfig(
                request_router_class=PrefixAffinityRouter,
                request_router_kwargs={"imbalanced_threshold": self.imbalanced_threshold}),
        }
        if self.autoscaling:
            kwargs["autoscaling_config"] = {
                "min_replicas": self.lowest, "max_replicas": self.highest,
                "initial_replicas": self.num_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}
        else:
            kwargs["num_replicas"] = self.num_replicas
        return kwargs

    def ingress_kwargs(self) -> dict[str, Any]:
        # light (forwards bytes), so no CPU reserved; one per replica keeps it off the hot path
        return {"num_replicas": self.highest, "ray_actor_options": {"num_cpus": 0},
                "max_ongoing_requests": self.max_ongoing_requests * self.highest}


@serve.deployment(name=REPLICA_DEPLOYMENT)
class EngineReplica:
    def __init__(self, model_path: str | None, engine_config: EngineConfig,
                 settings: dict[str, Any]):
        from litedeploy.engine.async_engine import AsyncEngine
        from litedeploy.serve.openai_server import ServerSettings, create_app

        self.engine = AsyncEngine.from_pretrained(model_path, engine_config)
        settings = {**settings, "model_name": settings.get("model_name") or self.engine.model_name}
        self.app = create_app(self.engine, ServerSettings(**settings))
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.headers = [(REPLICA_HEADER.encode(), self.replica_id.encode())]

    async def handle(self, call: HttpCall) -> AsyncIterator[object]:
        async for item in call_app(self.app, call, self.headers):
            yield item

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout_s=CLOSE_TIMEOUT_S)


@serve.deployment(name=INGRESS_DEPLOYMENT)
class OpenAIIngress:
    def __init__(self, replicas: DeploymentHandle):
        self.replicas = replicas.options(stream=True)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        client = (request.client.host, request.client.port) if request.client else ("", 0)
        call = HttpCall(request.method, path, request.scope.get("query_string", b""),
                        list(request.scope["headers"]), body, routing_key(path, body),
                        request.headers.get(REPLICA_HEADER), client)
        stream: DeploymentResponseGenerator = self.replicas.handle.remote(call)
        try:
            status, headers = await stream.__anext__()
        except RayError as exc:  # the replica died (or its app failed) before answering
            logger.warning("%s %s: %s: %s", request.method, path, REPLICA_FAILED, exc)
            return error_response(APIError(503, f"{REPLICA_FAILED}; retry the request",
                                           code="replica_failed"))
        event_stream = any(key == b"content-type" and value.startswith(b"text/event-stream")
                           for key, value in headers)
        response = StreamingResponse(_relay(stream, event_stream), status_code=status)
        response.raw_headers = list(headers)  # the app's own, content-length included
        return response


async def _relay(stream: DeploymentResponseGenerator, event_stream: bool) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    except RayError as exc:  # the replica died mid-answer: end the stream the way errors do
        logger.warning("%s mid-response: %s", REPLICA_FAILED, exc)
        finished = True
        if event_stream:
            event = json.dumps(error_body(503, REPLICA_FAILED, code="replica_failed"))
            yield f"data: {event}\n\ndata: [DONE]\n\n".encode()
    finally:
        if not finished:  # the client left: stop the replica's generation too
            stream.cancel()


def build_app(model_path: str | None, engine_config: EngineConfig, settings: dict[str, Any],
              options: ReplicaOptions):
    """The Ray Serve application: ingress -> N engine replicas. `settings` are ServerSettings
    fields (model_name None: the model's own name)."""
    replicas = EngineReplica.options(**options.replica_kwargs()).bind(
        model_path, engine_config, settings)
    return OpenAIIngress.options(**options.ingress_kwargs()).bind(replicas)
