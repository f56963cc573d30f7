"""The rules a GenerateRequest must follow, shared by the SDK and the servers.

The SDK checks them before sending (so a bad call fails without a round trip) and
servers check the received proto with the same functions, through
`types.Request.from_proto` (so a client that skips the SDK gets the same answer).
Keeping one copy keeps the two from drifting.
Everything here is a pure function: no I/O, no model, no gRPC call.

Each failure raises `InvalidRequest` (a `ValueError`) whose message starts with the
field name and gives the allowed range, e.g. "top_p: must be in [0, 1], got 1.5";
servers answer it with INVALID_ARGUMENT and the same message.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

from protocol.errors import InvalidRequest
from protocol.limits import (
    CHAT_ROLES,
    INT32_MAX,
    MAX_CHAT_MESSAGES,
    MAX_DRAFT_DEPTH,
    MAX_DRAFT_WIDTH,
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    MAX_PRIORITY,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    MAX_TPOT_SLO_MS,
    SEED_LIMIT,
)
from protocol.v1 import generation_pb2 as pb

_NAME = re.compile(rf"[a-z0-9_]{{0,{MAX_NAME_CHARS}}}")


def check_fits_model(
    prompt_tokens: Sequence[int],
    *,
    top_k: int,
    max_tokens: int,
    vocab_size: int,
    max_context: int,
) -> None:
    """The request's rules that depend on the serving model: prompt token ids and top_k
    within its vocabulary, max_tokens within its context. The rest were checked where
    the request was built (`types.Request`)."""
    _check_model_limit("vocab_size", vocab_size)
    _check_model_limit("max_context", max_context)
    for i, token in enumerate(prompt_tokens):
        _check_int(f"prompt_tokens[{i}]", token, 0, vocab_size - 1, shown=f"[0, {vocab_size})")
    _check_int("top_k", top_k, 0, vocab_size)
    limit = min(MAX_TOKENS, max_context)
    _check_int("max_tokens", max_tokens, 1, limit, shown=_max_tokens_range(f"{limit} here"))


def check_prompt(
    prompt: str,
    prompt_tokens: Sequence[int],
    messages: Sequence[object] = (),
) -> None:
    """Exactly one of `prompt` (text), `prompt_tokens` (ids) and `messages` (a chat:
    objects with `role` and `content`, the proto's or `types.ChatMessage`) is non-empty."""
    if not isinstance(prompt, str):
        raise InvalidRequest(
            f"prompt: must be a string, got {type(prompt).__name__}", field="prompt"
        )
    given = [bool(prompt), bool(len(prompt_tokens)), bool(len(messages))]
    if sum(given) != 1:
        got = "none" if not any(given) else "more than one"
        raise InvalidRequest(
            "prompt: exactly one of prompt, prompt_tokens and messages must be non-empty, "
            f"got {got}",
            field="prompt",
        )
    for i, token in enumerate(prompt_tokens):
        _check_int(f"prompt_tokens[{i}]", token, 0, INT32_MAX)
    check_messages(messages)


def check_messages(messages: Sequence[object]) -> None:
    """At most MAX_CHAT_MESSAGES, each with a role of CHAT_ROLES and a string content of
    at most MAX_MESSAGE_CHARS characters (empty allowed)."""
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequest(
            f"messages: at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}",
            field="messages",
        )
    for i, message in enumerate(messages):
        role = getattr(message, "role", None)
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                field=f"messages[{i}].role",
            )
        content = getattr(message, "content", None)
        if not isinstance(content, str) or len(content) > MAX_MESSAGE_CHARS:
            shown = f"{len(content)} characters" if isinstance(content, str) else repr(content)
            raise InvalidRequest(
                f"messages[{i}].content: must be a string of at most {MAX_MESSAGE_CHARS} "
                f"characters, got {shown}",
                field=f"messages[{i}].content",
            )


def check_generation(
    *,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    mode: int,
    stop: Sequence[str],
    adaptive_threshold: float,
    priority: int = 0,
    tpot_slo_ms: float = 0.0,
) -> None:
    """The per-request generation settings, whatever the model. `mode` is the proto
    enum value; 0 (unset) is allowed and means lossless."""
    _check_int(
        "max_tokens", max_tokens, 1, MAX_TOKENS, shown=_max_tokens_range(f"at most {MAX_TOKENS}")
    )
    check_sampling(temperature, top_k, top_p, seed)
    if mode not in pb.Mode.values():
        names = ", ".join(pb.Mode.keys())
        raise InvalidRequest(f"mode: must be one of {names}, got {mode!r}", field="mode")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(
            f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}", field="stop"
        )
    for i, text in enumerate(stop):
        if not isinstance(text, str) or not 1 <= len(text) <= MAX_STOP_CHARS:
            raise InvalidRequest(
                f"stop[{i}]: must be a string of 1 to {MAX_STOP_CHARS} characters, got {text!r}",
                field=f"stop[{i}]",
            )
    _check_real("adaptive_threshold", adaptive_threshold, 0.0, 1.0)
    check_schedule(priority, tpot_slo_ms)


def check_schedule(priority: int, tpot_slo_ms: float, *, prefix: str = "") -> None:
    """The request's scheduling class (lower first) and time-per-token target (0: none);
    `prefix` as in `check_sampling`."""
    _check_int(f"{prefix}priority", priority, -MAX_PRIORITY, MAX_PRIORITY)
    _check_real(f"{prefix}tpot_slo_ms", tpot_slo_ms, 0.0, MAX_TPOT_SLO_MS)


def check_sampling(
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    *,
    vocab_size: int | None = None,
    prefix: str = "",
) -> None:
    """How tokens are drawn; the generation request's and the verifier's
    `SamplingParams` message alike. `prefix` is the enclosing message's field path,
    e.g. "open.sampling." at the verifier."""
    _check_real(f"{prefix}temperature", temperature, 0.0, MAX_TEMPERATURE)
    _check_int(f"{prefix}top_k", top_k, 0, INT32_MAX if vocab_size is None else vocab_size)
    _check_real(f"{prefix}top_p", top_p, 0.0, 1.0)
    if seed is not None:
        _check_int(f"{prefix}seed", seed, 0, SEED_LIMIT - 1, shown="[0, 2**64)")


def check_draft(tree: str, width: int, depth: int, drafter: str = "") -> None:
    """Draft shape and source; zero values ("" and 0) mean the edge's defaults. Which
    tree shapes and drafters exist is the edge's to say: here a name is only checked
    to be one."""
    for field, name in (("draft.tree", tree), ("draft.drafter", drafter)):
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"{field}: must be a name of at most {MAX_NAME_CHARS} characters "
                f"(a-z, 0-9, _), got {name!r}",
                field=field,
            )
    _check_int("draft.width", width, 0, MAX_DRAFT_WIDTH)
    _check_int("draft.depth", depth, 0, MAX_DRAFT_DEPTH)


def _max_tokens_range(bound: str) -> str:
    """max_tokens' one range, as both its checks state it: the SDK's (any model) and the
    server's (its model), e.g. "[1, max_context] (the model's context; 512 here)"."""
    return f"[1, max_context] (the model's context; {bound})"


def _check_int(field: str, value: object, low: int, high: int, shown: str | None = None) -> None:
    span = shown or f"[{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequest(f"{field}: must be an integer in {span}, got {value!r}", field=field)
    if not low <= value <= high:
        raise InvalidRequest(f"{field}: must be in {span}, got {value}", field=field)


def _check_real(field: str, value: object, low: float, high: float) -> None:
    # `not low <= value <= high` also rejects NaN.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise InvalidRequest(f"{field}: must be in [{low:g}, {high:g}], got {value!r}", field=field)


def _check_model_limit(name: str, value: int) -> None:
    """The caller's own bound (not the request's): a wrong one is a programming error."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
