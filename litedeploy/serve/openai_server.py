"""OpenAI-compatible HTTP API over one AsyncEngine: the app and its routes.

The state behind the routes is `state.OpenAIServer`; request handling lives in `handlers`
(generation endpoints) and `streaming` (fan-out, SSE); the ASGI guards (keys, body, overload,
draining) in `guards`; debug endpoints in `debug`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from litedeploy import __version__
from litedeploy.engine.async_engine import AsyncEngine
from litedeploy.serve import handlers
from litedeploy.serve import protocol as p
from litedeploy.serve.errors import install_error_handlers
from litedeploy.serve.guards import (
    AUTH_EXEMPT_PATHS,
    AdmissionGuard,
    ApiKeyGuard,
    BodyLimitGuard,
)
from litedeploy.serve.state import OpenAIServer, ServerSettings
from litedeploy.serve.tokenize_routes import add_tokenize_routes

__all__ = ["OpenAIServer", "ServerSettings", "create_app"]


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    docs = not settings.disable_fastapi_docs
    app = FastAPI(title="litedeploy OpenAI-compatible API", version=__version__,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    server = OpenAIServer(engine, settings)
    app.state.server = server
    install_error_handlers(app)
    _add_routes(app, server)
    add_tokenize_routes(app, server)  # /tokenize, /detokenize, /tokenizer_info, /v1/models/{id}
    if settings.enable_debug_endpoints:
        from litedeploy.serve.debug import add_debug_routes

        add_debug_routes(app, server)
    # added innermost first: CORS outermost so that even error answers carry its headers
    app.add_middleware(AdmissionGuard, admission=server.admission)
    app.add_middleware(BodyLimitGuard, max_bytes=settings.max_request_bytes,
                       read_timeout_s=settings.body_read_timeout_s,
                       body_timeout_s=settings.body_timeout_s)
    if settings.api_keys:  # before the body guard: no key, no body read
        public = AUTH_EXEMPT_PATHS | ({"/metrics"} if settings.metrics_public else set())
        app.add_middleware(ApiKeyGuard, api_keys=settings.api_keys, public_paths=public)
    if settings.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allow_origins,
                           allow_credentials=settings.allow_credentials,
                           allow_methods=settings.allow_methods,
                           allow_headers=settings.allow_headers)
    return app


# ---- routes -------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, server: OpenAIServer) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with both
    async def health() -> Response:
        # 503 while draining, so load balancers stop sending before the process exits
        return Response(status_code=503 if server.admission.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = server.metrics.render()
        return Response(content, media_type=content_type)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> p.ModelList:
        engine = server.engine.engine
        card = p.ModelCard(id=server.settings.model_name, created=server.created,
                           root=server.settings.model_name, max_model_len=engine.session_len,
                           device=str(engine.device))
        return p.ModelList(data=[card])

    @app.post("/v1/encode", response_model=p.EncodeResponse, responses=p.ERROR_RESPONSES)
    async def encode(body: p.EncodeRequest) -> p.EncodeResponse:
        texts = [body.input] if isinstance(body.input, str) else body.input
        # lmdeploy's add_bos: True keeps the tokenizer's own BOS rule, False drops the BOS
        ids = [server.prompts.encode(text) if body.do_preprocess
               else server.engine.tokenizer.encode(text, add_bos=None if body.add_bos else False)
               for text in texts]
        if isinstance(body.input, str):
            return p.EncodeResponse(input_ids=ids[0], length=len(ids[0]))
        return p.EncodeResponse(input_ids=ids, length=[len(item) for item in ids])

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse,
              responses=p.ERROR_RESPONSES)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        return await handlers.chat_completions(server, body, request)

    @app.post("/v1/completions", response_model=p.CompletionResponse,
              responses=p.ERROR_RESPONSES)
    async def completions(body: p.CompletionRequest, request: Request):
        return await handlers.completions(server, body, request)
