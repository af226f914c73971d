"""The OpenAI-compatible HTTP server: routes (chat and text completions, models, health, metrics), the gate before
them (API key, media type, body size), and a uvicorn server on a thread for tests and notebooks.

The routes only translate: k2jax.service prepares each request off the event loop and submits it; k2jax.responses
answers it, whole or as a stream. What a client controls is checked at the edge (k2jax.api_schema): body size (while
it is read), media type, JSON depth and Unicode, every value that reaches the model's arrays, tool and response
schemas (jsonschema), and prompt size before tokenizing. A request whose client disconnects is cancelled at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Self

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from k2jax.api_schema import APIError, ChatBody, CompletionBody
from k2jax.responses import Call
from k2jax.service import Service

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The raw request body, refused with a 413 as soon as it grows past `limit` bytes (chunked bodies too)."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body") from None
    return b"".join(chunks)


async def start_call(service: Service, request: HTTPRequest, schema: type[ChatBody] | type[CompletionBody]) -> Call:
    """Read the body, prepare it on one of the service's worker threads (off the event loop), submit it."""
    raw = await read_body(request, service.max_body_bytes)
    prepared = await asyncio.get_running_loop().run_in_executor(service.workers, service.prepare, raw, schema)
    return service.start(prepared)


async def respond(request: HTTPRequest, call: Call) -> Response:
    """A server-sent event stream, or the whole response once every choice has finished; either way the job is
    cancelled as soon as the client disconnects."""
    call.job.watch(request.receive)
    if call.stream:
        return StreamingResponse(call.events(), media_type="text/event-stream")
    try:
        await call.collect()
    finally:
        call.job.close()
    return JSONResponse(call.response())


def error_response(err: APIError) -> JSONResponse:
    """An APIError as a JSON response."""
    return JSONResponse(err.body(), status_code=err.status)


def media_type(headers: Headers) -> str:
    """The Content-Type without parameters, lower-case."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


class Gate:
    """ASGI middleware before the routes: the API key on /v1 routes, then JSON bodies only, no larger than the limit
    they declare. Pure ASGI (the receive channel passes untouched), so a client's disconnect reaches the handlers."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> APIError | None:
        """Why a request is refused before its route runs, or None."""
        headers = Headers(scope=scope)
        if scope["path"].startswith("/v1") and not self.service.authorized(headers.get("authorization")):
            return APIError(401, "Incorrect API key provided", code="invalid_api_key")
        if scope["method"] != "POST":
            return None
        if media_type(headers) != "application/json":
            return APIError(415, f"request body must be sent as application/json, not {media_type(headers) or 'none'}",
                            code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.service.max_body_bytes):
            return APIError(413, f"request body is {length} bytes, over the limit of {self.service.max_body_bytes}")
        return None


def create_app(service: Service) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    app = FastAPI(title="k2jax", docs_url=None, redoc_url=None, openapi_url=None)

    async def api_error(_request: HTTPRequest, err: APIError) -> JSONResponse:
        return error_response(err)

    async def http_error(_request: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), type=kind))

    async def internal_error(_request: HTTPRequest, err: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=err)
        return error_response(APIError(500, "internal server error", type="server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(Gate, service=service)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the serving programs are compiled and while the model thread runs, else 503."""
        scheduler = service.scheduler
        if not scheduler.alive:
            return JSONResponse({"status": "model thread stopped"}, status_code=503)
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "compiling"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one served model."""
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        """One model by id (404 unless it is the served one)."""
        service.check_model(name)
        return service.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        """OpenAI chat completions, streaming or not."""
        return await respond(request, await start_call(service, request, ChatBody))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        """OpenAI text completions, streaming or not."""
        return await respond(request, await start_call(service, request, CompletionBody))

    return app


class BackgroundServer:
    """A uvicorn server for `app` on its own thread (tests, benchmarks, notebooks); a context manager.

    port 0 picks a free port; `url` is the base URL (http://host:port/v1) once started.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        self.host, self.start_timeout = host, start_timeout
        self.thread = threading.Thread(target=self.server.run, name="k2jax-http", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start within {self.start_timeout} s")
            time.sleep(0.01)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(self.start_timeout)

    @property
    def port(self) -> int:
        """The bound port."""
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API."""
        return f"http://{self.host}:{self.port}/v1"
