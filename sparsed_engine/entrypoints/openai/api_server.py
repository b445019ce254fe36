"""The FastAPI app: OpenAI routes over an AsyncLLM, /health, /version, /metrics."""
from __future__ import annotations

import asyncio
import contextlib
import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

import sparsed_engine
from sparsed_engine.engine.async_llm import AsyncLLM, EngineDeadError
from sparsed_engine.entrypoints.openai.metrics import ServerMetrics
from sparsed_engine.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from sparsed_engine.entrypoints.openai.serving_chat import OpenAIServingChat
from sparsed_engine.entrypoints.openai.serving_completion import OpenAIServingCompletion
from sparsed_engine.entrypoints.openai.serving_engine import APIError, error_response, until_disconnected
from sparsed_engine.executor.base import ExecutorDeadError

HEALTH_PROBE_S = 5.0   # how long /health waits for the workers' answer


class APIKeyMiddleware:
    """Every /v1 request needs 'Authorization: Bearer <key>'. A plain ASGI middleware: starlette's
    BaseHTTPMiddleware would hide a client's disconnect from the endpoint."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          "AuthenticationError", None, "invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class ArrivalMiddleware:
    """Announces each generation request to the AsyncLLM as soon as it begins, before its body is
    read and validated, so that an idle engine admits a burst of requests in one step."""
    PATHS = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, llm: AsyncLLM):
        self.app, self.llm = app, llm

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.PATHS:
            return await self.app(scope, receive, send)
        key = self.llm.expect_request()
        scope.setdefault("state", {})["arrival"] = key
        try:
            return await self.app(scope, receive, send)
        finally:
            self.llm.request_arrived(key)


def build_app(llm: AsyncLLM, model_names: list[str], api_key: str | None = None) -> FastAPI:
    if not model_names:
        raise ValueError("model_names is empty: the server must serve at least one name")
    app = FastAPI(title="sparsed-engine", version=sparsed_engine.__version__)
    metrics = ServerMetrics(llm, model_names[0])
    completions = OpenAIServingCompletion(llm, model_names, metrics)
    chat = OpenAIServingChat(llm, model_names, metrics)
    app.state.llm, app.state.metrics = llm, metrics

    app.add_middleware(ArrivalMiddleware, llm=llm)
    if api_key is not None:   # added last, so it runs first: a refused request is never announced
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"] if x != "body"]
        # a union field reports each member type tried: name the field, not the type
        param = ".".join(x for x in loc if not x.startswith(("list[", "str", "int", "dict[")) and x != "function-after")
        if err["type"] == "extra_forbidden":
            message = f"{param} is not a field sparsed-engine supports"
        else:
            message = f"{param}: {err['msg']} (got {err.get('input')!r:.200})"
        return error_response(400, message, "BadRequestError", param or None)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.get("/health")
    async def health():
        if llm.is_healthy:
            # a busy engine answers at its next step boundary; past the wait, its steps will tell
            with contextlib.suppress(asyncio.TimeoutError, EngineDeadError, ExecutorDeadError):
                await asyncio.wait_for(llm.check_health(), HEALTH_PROBE_S)
        if llm.is_healthy:
            return Response(status_code=200)
        return error_response(503, f"the engine is dead: {llm.dead}", "ServiceUnavailableError", None, "engine_dead")

    @app.get("/version")
    async def version():
        return {"version": sparsed_engine.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=name) for name in model_names])

    def arrival(raw_request: Request) -> tuple | None:
        return getattr(raw_request.state, "arrival", None)

    def respond(result):
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream")
        return JSONResponse(result.model_dump())

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request):
        return respond(await until_disconnected(completions.create(request, arrival(raw_request)), raw_request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        return respond(await until_disconnected(chat.create(request, arrival(raw_request)), raw_request))

    return app
