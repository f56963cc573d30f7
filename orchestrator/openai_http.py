"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions.

An ASGI app (Starlette, served by uvicorn inside the caller's event loop) in front of
any `Generation` backend given as two callables: `stream(GenerateRequest, timeout_s)`,
an async iterator of `GenerateChunk`s raising `ServingError`s (the gateway's `route`,
or an edge's runtime through `EdgeBackend`), and `models()`. So the openai client,
AIPerf and GuideLLM work unchanged against the gateway or a single edge.

Requests map onto `GenerateRequest` through the SDK's `GenerateOptions`, so HTTP and
gRPC answer a bad field with the same message:

| OpenAI field          | here                                                          |
|-----------------------|---------------------------------------------------------------|
| prompt                | a string, or a list of token ids (models without a tokenizer);|
|                       | a list of one of either; more prompts than one: 400           |
| messages (chat)       | joined into one prompt by `chat_prompt` (below)               |
| max_tokens            | default 16 (completions, as OpenAI); chat also reads          |
|                       | max_completion_tokens, default CHAT_MAX_TOKENS                |
| temperature           | default 1.0 as OpenAI (sampling); 0 is greedy, the only       |
|                       | setting where lossless output equals cloud_only token for     |
|                       | token; allowed [0, 100] (wider than OpenAI's [0, 2])          |
| top_p, seed, stop     | as OpenAI; stop is a string or up to 8 strings                |
| n, best_of, echo, ... | only their "off" values (UNSUPPORTED); anything else is a 400 |
| ignore_eos, user, ... | other fields are ignored (load tools send vLLM's ignore_eos:  |
|                       | the end-of-sequence token still ends a generation here)       |

Extra fields: `mode` ("lossless" | "adaptive" | "edge_only" | "cloud_only"), `top_k`
(vLLM's -1 means off, like 0), `draft` {tree, width, depth}, `adaptive_threshold`, and
`timeout` (seconds; default `HttpConfig.default_timeout_s`). The openai client sends
them with `extra_body={...}`.

Responses follow OpenAI's schema; each choice also carries `token_ids` (as vLLM does),
and the response (streaming: its last chunk) an `edgecloud` object with every
`GenerationStats` field plus `tau`. Errors are OpenAI-style bodies,
`{"error": {"message", "type", "param", "code"}}`, with `code` the gRPC status name and
`param` the field the message starts with; statuses are in `HTTP_STATUS`. Every path
but /health (open, for load balancers) needs the bearer token.

Rollbacks: adaptive mode may later replace unverified tokens, which an append-only
OpenAI stream cannot express. In adaptive mode a stream therefore holds unverified
text back until a verified chunk follows it (rollbacks never reach past one) or the
generation ends; non-streaming responses apply rollbacks like the SDK does. Other modes
never roll back and stream every chunk at once (edge_only's are final unverified).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import numbers
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_node.runtime import EdgeRuntime
from edge_node.service import GenerationService, chunk_to_proto
from edgecloud._errors import InvalidRequest
from edgecloud._types import (
    DraftOptions,
    FinishReason,
    GenerateOptions,
    GenerationResult,
    GenerationStats,
    Transcript,
)
from edgecloud.v1 import generation_pb2 as gpb
from serving.auth import AuthConfig
from serving.errors import DeadlineExceeded, Internal, ServingError
from serving.server import ServerConfig, TlsConfig

log = logging.getLogger(__name__)

Chunks = AsyncGenerator[gpb.GenerateChunk, None]
StreamFn = Callable[[gpb.GenerateRequest, float | None], Chunks]
ModelsFn = Callable[[], Awaitable[list[gpb.ModelInfo]]]

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# OpenAI's chat default is "until the context is full"; a bound keeps one request that
# omits it from holding an edge slot for a whole context.
CHAT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: requests that omit it are sampled
MAX_TIMEOUT_S = 24 * 3600.0
MAX_BODY_BYTES = 4 * 1024 * 1024  # the gRPC servers' message cap
# OpenAI parameters this server cannot honour: the values that mean "not used".
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}  # any other code: 500
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}  # any other status: "server_error"
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


@dataclass(frozen=True)
class HttpConfig:
    # Clients send `Authorization: Bearer <token>` (the openai client's api_key); the
    # same AuthConfig as the gRPC server, so `insecure_no_auth` is explicit here too.
    auth: AuthConfig
    # Echoed as `model` when a request names none: the backend's default model.
    default_model: str = ""
    # Deadline of requests that send no `timeout`; None: no deadline.
    default_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.default_timeout_s is not None:
            _check_timeout("default_timeout_s", self.default_timeout_s)


@dataclass(frozen=True)
class OpenAIRequest:
    """One parsed /v1/completions or /v1/chat/completions body."""

    request: gpb.GenerateRequest
    model: str  # echoed in responses
    chat: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final chunk with `usage`
    timeout_s: float | None


def chat_prompt(messages: object) -> str:
    """The prompt for a chat: the demo models are code models without a chat template,
    so every message becomes "<Role>: <content>" (roles System, User, Assistant;
    "developer" is System), messages are separated by a blank line, and "Assistant:"
    closes the prompt for the model to continue.

    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    -> "System: Be brief.\\n\\nUser: Hi\\n\\nAssistant:"
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            f"messages: must be a non-empty list of messages, got {messages!r}", field="messages"
        )
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                field=f"messages[{i}].role",
            )
        turns.append(f"{CHAT_ROLES[role]}: {_message_text(message.get('content'), i)}")
    return "\n\n".join([*turns, "Assistant:"])


def _message_text(content: object, i: int) -> str:
    """A message's content: a string, null, or a list of {"type": "text", "text"} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise InvalidRequest(
        f"messages[{i}].content: must be a string or a list of text parts, got {content!r}",
        field=f"messages[{i}].content",
    )


def parse_request(body: Mapping[str, object], *, chat: bool, config: HttpConfig) -> OpenAIRequest:
    """Maps an OpenAI request body onto a GenerateRequest; raises `InvalidRequest` naming
    the field (the SDK's messages, so gRPC and HTTP agree)."""
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in allowed:
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise InvalidRequest(
                f"{name}: this server supports only {shown}, got {body[name]!r}", field=name
            )
    stream = _typed(body, "stream", bool, False)
    stream_options = _typed(body, "stream_options", dict, {})
    draft = _typed(body, "draft", dict, {})
    try:
        draft_options = DraftOptions(**draft)
    except TypeError:
        raise InvalidRequest(
            f"draft: allowed fields are tree, width, depth, got {sorted(draft)}", field="draft"
        ) from None
    if chat:
        prompt: str | list[int] = chat_prompt(body.get("messages"))
        max_tokens = _first(body, "max_completion_tokens", "max_tokens", default=CHAT_MAX_TOKENS)
    else:
        prompt = _single_prompt(body.get("prompt"))
        max_tokens = _first(body, "max_tokens", default=COMPLETION_MAX_TOKENS)
    top_k = body.get("top_k")
    options = GenerateOptions(
        max_tokens=max_tokens,
        temperature=_first(body, "temperature", default=DEFAULT_TEMPERATURE),
        top_p=_first(body, "top_p", default=1.0),
        top_k=0 if top_k in (None, -1) else top_k,
        seed=body.get("seed"),
        mode=_first(body, "mode", default="lossless"),
        stop=_first(body, "stop", default=()),
        model=_first(body, "model", default=""),
        draft=draft_options,
        adaptive_threshold=_first(body, "adaptive_threshold", default=0.0),
    )
    timeout_s = body.get("timeout")
    if timeout_s is None:
        timeout_s = config.default_timeout_s
    else:
        _check_timeout("timeout", timeout_s)
    return OpenAIRequest(
        request=options.request(prompt),
        model=options.model or config.default_model,
        chat=chat,
        stream=stream,
        include_usage=stream and bool(stream_options.get("include_usage")),
        timeout_s=timeout_s,
    )


def _first(body: Mapping[str, object], *names: str, default: object) -> object:
    """The first of `names` the body sets to something other than null."""
    return next((body[n] for n in names if body.get(n) is not None), default)


def _typed(body: Mapping[str, object], name: str, kind: type, default: object) -> object:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise InvalidRequest(
            f"{name}: must be {'an object' if kind is dict else 'a boolean'}, got {value!r}",
            field=name,
        )
    return value


def _single_prompt(prompt: object) -> str | list[int]:
    """OpenAI's prompt forms: "text", [ids], ["text"], [[ids]]; batches of more than
    one prompt are refused (one generation per request, like `n`)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequest(
                f"prompt: this server takes one prompt per request, got {len(prompt)}",
                field="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, (str, list)):
        return prompt
    raise InvalidRequest(
        f"prompt: must be a string or a list of token ids, got {prompt!r}", field="prompt"
    )


def _check_timeout(field: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0 < value <= MAX_TIMEOUT_S
    ):
        raise InvalidRequest(
            f"{field}: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {value!r}",
            field=field,
        )


class _Output(Transcript):
    """The generation so far (the SDK's `Transcript`: rollbacks applied) and, when
    streaming, how much of it the client has been sent. With `hold_unverified`,
    unverified chunks wait until a verified chunk or the final one releases them.

    Worked example (adaptive, holding): chunk "Hi" verified -> sends "Hi"; chunk " wrld"
    unverified -> sends nothing; chunk Rollback(keep 1 token, 2 chars) + " world"
    verified -> sends " world". The client saw "Hi world", never " wrld".
    """

    def __init__(self, hold_unverified: bool = False) -> None:
        super().__init__()
        self.hold_unverified = hold_unverified
        self._sent_tokens = 0
        self._sent_chars = 0

    def add(self, msg: gpb.GenerateChunk) -> None:
        """Applies `msg` (a whole response: nothing has been sent yet)."""
        self._apply(msg)

    def feed(self, msg: gpb.GenerateChunk) -> tuple[str, tuple[int, ...]]:
        """Applies `msg`; returns the text and token ids released to the stream now."""
        if msg.HasField("rollback") and (
            msg.rollback.keep_tokens < self._sent_tokens
            or msg.rollback.keep_chars < self._sent_chars
        ):
            raise Internal("rollback: reaches output already streamed")
        self._apply(msg)
        if self.hold_unverified and not msg.verified and not msg.HasField("stats"):
            return "", ()
        text, tokens = self.text[self._sent_chars :], self.tokens[self._sent_tokens :]
        self._sent_chars += len(text)
        self._sent_tokens += len(tokens)
        return text, tokens

    def result(self) -> GenerationResult:
        """The whole generation; raises when its final chunk (with stats) never came."""
        return self._result()


class _Api:
    """The route handlers; one per app."""

    def __init__(self, stream: StreamFn, models: ModelsFn, config: HttpConfig) -> None:
        self.stream = stream
        self.models = models
        self.config = config
        self.created = int(time.time())
        token = config.auth.token
        self._expected = None if token is None else f"Bearer {token}".encode()

    async def health(self, request: Request) -> Response:
        return Response("ok", media_type="text/plain")

    async def list_models(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        try:
            models = await self.models()
        except Exception as error:
            return _json_error(*_classify(error))
        return JSONResponse({"object": "list", "data": [self._card(m) for m in models]})

    async def get_model(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        name = request.path_params["model"]
        try:
            found = [m for m in await self.models() if m.name == name]
        except Exception as error:
            return _json_error(*_classify(error))
        if not found:
            return _json_error(404, f"model: {name!r} is not served here", "model", "not_found")
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
        """401 unless the bearer token matches (compared in constant time)."""
        if self._expected is None:
            return None
        sent = request.headers.get("authorization")
        if sent is None:
            message = "missing bearer token in the Authorization header"
        elif not hmac.compare_digest(sent.encode(), self._expected):
            message = "wrong bearer token"
        else:
            return None
        return _json_error(401, message, None, "unauthenticated")

    async def _generate(self, request: Request, chat: bool) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        upstream: Chunks | None = None
        streaming = None
        try:
            call = parse_request(await _json_body(request), chat=chat, config=self.config)
            response = _Response(call)
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
            return _json_error(*_classify(error))
        finally:
            if upstream is not None and streaming is None:  # else events() closes it
                await upstream.aclose()


class _Response:
    """Builds one request's response objects, whole or as server-sent events."""

    def __init__(self, call: OpenAIRequest) -> None:
        self.call = call
        self.id = f"{'chatcmpl' if call.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.deadline = (
            None if call.timeout_s is None else asyncio.get_running_loop().time() + call.timeout_s
        )

    async def next(self, upstream: Chunks) -> gpb.GenerateChunk | None:
        """The next chunk, None at the end; DeadlineExceeded past the request's timeout."""
        timeout = asyncio.timeout_at(self.deadline)
        try:
            async with timeout:
                return await anext(upstream, None)
        except TimeoutError as error:
            if not timeout.expired():
                raise
            raise DeadlineExceeded(
                f"timeout: the request's {self.call.timeout_s:g} s deadline passed"
            ) from error

    async def complete(self, upstream: Chunks) -> dict:
        output = _Output()
        while (msg := await self.next(upstream)) is not None:
            output.add(msg)
        result = output.result()
        choice: dict[str, object] = {"index": 0}
        if self.call.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choice |= {
            "token_ids": list(result.tokens),
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        return {
            **self._head(),
            "choices": [choice],
            "usage": _usage(result.stats),
            "edgecloud": _stats(result.stats),
        }

    async def events(self, upstream: Chunks, first: gpb.GenerateChunk | None) -> AsyncIterator[str]:
        """`data: {chunk}` events, then `data: [DONE]`. An error after the first chunk
        becomes a `data: {"error": ...}` event (the status is already 200)."""
        output = _Output(hold_unverified=self.call.request.mode == gpb.MODE_ADAPTIVE)
        async with aclosing(upstream):
            try:
                if self.call.chat:
                    yield _event(self._chunk("", (), role=True))
                msg = first
                while msg is not None:
                    text, tokens = output.feed(msg)
                    final = msg if msg.HasField("stats") else None
                    if text or tokens or final:
                        yield _event(self._chunk(text, tokens, final))
                    if final and self.call.include_usage:
                        usage = _usage(GenerationStats.from_proto(final.stats))
                        yield _event({**self._head(chunk=True), "choices": [], "usage": usage})
                    msg = await self.next(upstream)
            except Exception as error:
                yield _event(_error_body(*_classify(error)))
            yield "data: [DONE]\n\n"

    def _chunk(
        self,
        text: str,
        tokens: tuple[int, ...],
        final: gpb.GenerateChunk | None = None,
        role: bool = False,
    ) -> dict:
        choice: dict[str, object] = {"index": 0}
        if not self.call.chat:
            choice["text"] = text
        elif role:
            choice["delta"] = {"role": "assistant", "content": ""}
        else:
            choice["delta"] = {"content": text} if text or final is None else {}
        choice |= {
            "token_ids": list(tokens),
            "logprobs": None,
            "finish_reason": None
            if final is None
            else FinishReason.from_proto(final.finish_reason),
        }
        chunk = {**self._head(chunk=True), "choices": [choice]}
        if final is not None:
            chunk["edgecloud"] = _stats(GenerationStats.from_proto(final.stats))
        return chunk

    def _head(self, chunk: bool = False) -> dict:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {
            "id": self.id,
            "object": kind if self.call.chat else "text_completion",
            "created": self.created,
            "model": self.call.model,
        }


def _usage(stats: GenerationStats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    }


def _stats(stats: GenerationStats) -> dict:
    """The `edgecloud` object: every GenerationStats field, plus tau."""
    return {**dataclasses.asdict(stats), "tau": stats.tau}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


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


def _classify(error: Exception) -> tuple[int, str, str | None, str | None]:
    """The one mapping from internal errors to (HTTP status, message, param, code).
    `param` is the field an INVALID_ARGUMENT message starts with ("top_p: must be ..."),
    `code` the gRPC status name."""
    if isinstance(error, InvalidRequest):
        return 400, error.message, error.field, "invalid_argument"
    if isinstance(error, ServingError):
        status = HTTP_STATUS.get(error.code, 500)
        match = _FIELD_PREFIX.match(str(error)) if status == 400 else None
        return status, str(error), match and match.group(1), error.code.name.lower()
    log.exception("OpenAI HTTP request failed")
    return 500, "internal error", None, "internal"


def _error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    error_type = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _json_error(status: int, message: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param, code), status_code=status)


async def _http_exception(request: Request, error: HTTPException) -> Response:
    """Unknown paths and methods answer in OpenAI's error shape too."""
    return _json_error(error.status_code, error.detail, None, None)


def create_app(stream: StreamFn, models: ModelsFn, config: HttpConfig) -> Starlette:
    """The ASGI app. `stream(request, timeout_s)` yields GenerateChunks and raises
    ServingErrors; `models()` lists what the backend serves."""
    api = _Api(stream, models, config)
    routes = [
        Route("/health", api.health),
        Route("/v1/models", api.list_models),
        Route("/v1/models/{model:path}", api.get_model),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})


class EdgeBackend:
    """An edge's own runtime behind the HTTP API (`edgecloud edge serve --http-port`):
    the same steps as its gRPC `Generate`."""

    def __init__(self, runtime: EdgeRuntime) -> None:
        self.runtime = runtime
        self._service = GenerationService(runtime)

    async def stream(self, request: gpb.GenerateRequest, timeout_s: float | None) -> Chunks:
        generation = self.runtime.request_from_proto(request, timeout_s)
        async for chunk in self.runtime.generate(generation):
            yield chunk_to_proto(chunk)

    async def models(self) -> list[gpb.ModelInfo]:
        response = await self._service.ListModels(gpb.ListModelsRequest(), None)
        return list(response.models)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signals to the process embedding it (the CLI drains on them)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn serving an app as a task of the running event loop."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, url: str, port: int) -> None:
        self._server = server
        self._task = task
        self.url = url  # e.g. http://127.0.0.1:8000
        self.port = port

    async def stop(self) -> None:
        """Graceful: stops accepting, lets in-flight responses finish within the grace
        period, then cancels what is left."""
        self._server.should_exit = True
        await self._task


async def start_http_server(
    app: Starlette,
    host: str,
    port: int,
    *,
    tls: TlsConfig | None = None,
    grace_s: float = 10.0,
) -> HttpServer:
    """Binds `host:port` (0 picks a free port: see `HttpServer.port`) and serves `app`;
    OSError naming http_port when the address cannot be bound."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise OSError(f"http_port: cannot bind {host}:{port} ({error.strerror})") from error
    tls_options = {}
    if tls is not None:
        tls_options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            tls_options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=grace_s,
        **tls_options,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"http_port: the server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"{'http' if tls is None else 'https'}://{shown}:{bound}"
    return HttpServer(server, task, url, bound)


async def start_edge_http(runtime: EdgeRuntime, server: ServerConfig, port: int) -> HttpServer:
    """`edgecloud edge serve --http-port`: the edge's runtime over HTTP, on its gRPC
    server's host, with the same token and TLS."""
    backend = EdgeBackend(runtime)
    config = HttpConfig(auth=server.auth, default_model=runtime.config.model_name)
    app = create_app(backend.stream, backend.models, config)
    return await start_http_server(app, server.host, port, tls=server.tls, grace_s=server.grace_s)
