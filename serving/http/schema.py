"""OpenAI's request and response objects, mapped onto the protocol's: a completions or
chat body becomes a `Request` through the SDK's `GenerateOptions` (so HTTP and gRPC
refuse a bad field with the same message), and errors become OpenAI error bodies."""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass

from protocol.errors import EdgecloudError, InvalidRequest
from protocol.types import DraftOptions, GenerateOptions, GenerationStats, Request
from serving.auth import AuthConfig
from serving.errors import http_status

log = logging.getLogger(__name__)

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
# The fields `parse_request` reads on both endpoints: OpenAI's, then edgecloud's.
ACCEPTED = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options"}
    | {"mode", "draft", "top_k", "adaptive_threshold", "priority", "tpot_slo_ms", "timeout"}
    | {"ignore_eos"}  # vLLM's: GuideLLM and AIPerf send it for fixed-length outputs
)
# The fields of one endpoint only: chat (True) or completions (False).
ENDPOINT_FIELDS = {
    True: frozenset({"messages", "max_completion_tokens"}),
    False: frozenset({"prompt"}),
}
# Sent by OpenAI clients and load generators; accepted and ignored, as none changes the
# output here.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",  # OpenAI's, with code "model_not_found"
    429: "rate_limit_error",
}  # any other status: "server_error"
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
            check_timeout("default_timeout_s", self.default_timeout_s)


@dataclass(frozen=True)
class OpenAIRequest:
    """One parsed /v1/completions or /v1/chat/completions body."""

    request: Request
    model: str  # echoed in responses
    chat: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final chunk with `usage`
    timeout_s: float | None


def chat_messages(messages: object) -> list[dict[str, object]]:
    """OpenAI's chat messages as the protocol's {"role", "content"}: content given as a
    list of {"type": "text", "text"} parts is joined, null is "". The edge renders them
    with its model's chat template (`lm.chat`); roles are checked with the SDK's rule."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            f"messages: must be a non-empty list of messages, got {messages!r}", field="messages"
        )
    return [
        {"role": m.get("role"), "content": _message_text(m.get("content"), i)}
        if isinstance(m, dict)
        else m
        for i, m in enumerate(messages)
    ]


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
    """Maps an OpenAI request body onto a `Request`; raises `InvalidRequest` naming
    the field (the SDK's messages, so gRPC and HTTP agree)."""
    _check_known_fields(body, chat=chat)
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
            f"draft: allowed fields are tree, width, depth, drafter, got {sorted(draft)}",
            field="draft",
        ) from None
    if chat:
        prompt: str | list = chat_messages(body.get("messages"))
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
        priority=_first(body, "priority", default=0),
        tpot_slo_ms=_first(body, "tpot_slo_ms", default=0.0),
        ignore_eos=_first(body, "ignore_eos", default=False),
    )
    timeout_s = body.get("timeout")
    if timeout_s is None:
        timeout_s = config.default_timeout_s
    else:
        check_timeout("timeout", timeout_s)
    return OpenAIRequest(
        request=Request.of(prompt, options),
        model=options.model or config.default_model,
        chat=chat,
        stream=stream,
        include_usage=stream and bool(stream_options.get("include_usage")),
        timeout_s=timeout_s,
    )


def _check_known_fields(body: Mapping[str, object], *, chat: bool) -> None:
    """Refuses fields this server does not know: a misspelt or unimplemented option
    would otherwise be silently dropped (OpenAI refuses them too). `param` is the first,
    in alphabetical order."""
    known = ACCEPTED | ENDPOINT_FIELDS[chat] | UNSUPPORTED.keys() | IGNORED
    unknown = sorted(set(body) - known)
    if unknown:
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        raise InvalidRequest(
            f"{unknown[0]}: not a field of {endpoint} here (unknown: {', '.join(unknown)})",
            field=unknown[0],
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


def check_timeout(field: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0 < value <= MAX_TIMEOUT_S
    ):
        raise InvalidRequest(
            f"{field}: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {value!r}",
            field=field,
        )


def usage(stats: GenerationStats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    }


def stats_object(stats: GenerationStats) -> dict:
    """The `edgecloud` object: every GenerationStats field, plus tau."""
    return {**dataclasses.asdict(stats), "tau": stats.tau}


def classify(error: Exception) -> tuple[int, str, str | None, str | None]:
    """The one mapping from internal errors to (HTTP status, message, param, code).
    `param` is the field an INVALID_ARGUMENT or NOT_FOUND message starts with ("top_p:
    must be ..."), `code` the gRPC status name, or OpenAI's "model_not_found" for a
    model nothing here serves (404: the openai client does not retry it)."""
    if isinstance(error, InvalidRequest) and error.field:  # the SDK's checks name it
        return 400, error.message, error.field, "invalid_argument"
    if isinstance(error, EdgecloudError):
        status = http_status(error.code)
        match = _FIELD_PREFIX.match(str(error)) if status in (400, 404) else None
        param = match and match.group(1)
        code = "model_not_found" if (status, param) == (404, "model") else error.code.name.lower()
        return status, str(error), param, code
    log.exception("OpenAI HTTP request failed")
    return 500, "internal error", None, "internal"


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    error_type = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
