"""The routes of the OpenAI-compatible API, over any `Generation` backend given as two
callables (see the package docstring)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from protocol import types
from protocol.channel import AUTH_HEADER
from protocol.errors import InvalidRequest, NotFound
from protocol.v1 import generation_pb2 as gpb
from serving.auth import bearer_denial
from serving.http.schema import MAX_BODY_BYTES, HttpConfig, classify, error_body, parse_request
from serving.http.sse import Chunks, Responder
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import exposition

StreamFn = Callable[[types.Request, float | None], Chunks]
ModelsFn = Callable[[], Awaitable[list[gpb.ModelInfo]]]


class _Api:
    """The route handlers; one per app."""

    def __init__(
        self,
        stream: StreamFn,
        models: ModelsFn,
        config: HttpConfig,
        registry: CollectorRegistry | None,
    ) -> None:
        self.stream = stream
        self.registry = registry
        self.models = models
        self.config = config
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        return Response("ok", media_type="text/plain")

    async def list_models(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        try:
            models = await self.models()
        except Exception as error:
            return json_error(*classify(error))
        return JSONResponse({"object": "list", "data": [self._card(m) for m in models]})

    async def get_model(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        name = request.path_params["model"]
        try:
            found = [m for m in await self.models() if m.name == name]
            if not found:
                raise NotFound(f"model: {name!r} is not served here")
        except Exception as error:
            return json_error(*classify(error))
        return JSONResponse(self._card(found[0]))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    def _card(self, info: gpb.ModelInfo) -> dict:
        return {
            "id": info.name,
            "object": "model",
            "created": self.created,
            "owned_by": "edgecloud",
            "edgecloud": {
                "roles": list(info.roles),
                "vocab_size": info.vocab_size,
                "max_context": info.max_context,
            },
        }

    def _deny(self, request: Request) -> Response | None:
        """401 unless the bearer token matches."""
        denial = bearer_denial(self.config.auth.token, request.headers.get(AUTH_HEADER))
        return None if denial is None else json_error(401, denial, None, "unauthenticated")

    async def metrics(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        if self.registry is None:
            return json_error(404, "metrics: this server keeps none", None, "not_found")
        return Response(exposition(self.registry), media_type=METRICS_CONTENT_TYPE)

    async def _generate(self, request: Request, chat: bool) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        upstream: Chunks | None = None
        streaming = None
        try:
            call = parse_request(await _json_body(request), chat=chat, config=self.config)
            response = Responder(call)
            upstream = self.stream(call.request, call.timeout_s)
            if not call.stream:
                return JSONResponse(await response.complete(upstream))
            # Read the first chunk before answering: most errors come before it, and get
            # their own status instead of an error event in a 200 stream.
            first = await response.next(upstream)
            streaming = StreamingResponse(
                response.events(upstream, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
            return streaming
        except Exception as error:
            return json_error(*classify(error))
        finally:
            if upstream is not None and streaming is None:  # else events() closes it
                await upstream.aclose()


async def _json_body(request: Request) -> dict:
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise InvalidRequest(f"body: must be at most {MAX_BODY_BYTES} bytes", field="body")
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest("body: must be a JSON object", field="body")
    return value


def json_error(status: int, message: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


async def _http_exception(request: Request, error: HTTPException) -> Response:
    """Unknown paths and methods answer in OpenAI's error shape too."""
    return json_error(error.status_code, error.detail, None, None)


def create_app(
    stream: StreamFn,
    models: ModelsFn,
    config: HttpConfig,
    metrics: CollectorRegistry | None = None,
) -> Starlette:
    """The ASGI app. `stream(request, timeout_s)` yields GenerateChunks and raises
    EdgecloudErrors; `models()` lists what the backend serves; `metrics` is served at
    /metrics (behind the token)."""
    api = _Api(stream, models, config, metrics)
    routes = [
        Route("/health", api.health),
        Route("/metrics", api.metrics),
        Route("/v1/models", api.list_models),
        Route("/v1/models/{model:path}", api.get_model),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
