"""The protocol's values: request options in, chunks, statistics and results out.

All are frozen dataclasses or enums, converted from and to the `protocol.v1` protos
here and nowhere else: the SDK hands them to users, the edge produces them, and the
servers convert them to protos with the same functions the SDK reads them back with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Literal, TypedDict

from protocol.errors import InvalidRequest, ServerError
from protocol.v1 import generation_pb2 as pb
from protocol.validation import check_draft, check_fits_model, check_generation, check_prompt

ModeName = Literal["lossless", "adaptive", "edge_only", "cloud_only"]
ChatRole = Literal["system", "developer", "user", "assistant", "tool"]


class Mode(StrEnum):
    """Who decides each token. Methods accept the enum or its string value."""

    # The cloud verifies every token: output identical to cloud-only decoding.
    LOSSLESS = "lossless"
    # The edge keeps tokens it is confident of and escalates the rest; may roll back.
    ADAPTIVE = "adaptive"
    # The edge alone; no cloud. Tokens arrive with verified=False.
    EDGE_ONLY = "edge_only"
    # The cloud decodes autoregressively: the baseline.
    CLOUD_ONLY = "cloud_only"

    @property
    def proto(self) -> int:
        return pb.Mode.Value(f"MODE_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> Mode:
        """MODE_UNSPECIFIED (0) means lossless."""
        return cls.LOSSLESS if value == pb.MODE_UNSPECIFIED else cls[pb.Mode.Name(value)[5:]]

    @property
    def uses_cloud(self) -> bool:
        return self is not Mode.EDGE_ONLY

    @property
    def drafts(self) -> bool:
        return self in (Mode.LOSSLESS, Mode.ADAPTIVE)


class FinishReason(StrEnum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # a stop string or the end-of-sequence token

    @classmethod
    def from_proto(cls, value: int) -> FinishReason | None:
        """None for FINISH_REASON_UNSPECIFIED (every chunk but the last) and for values
        newer than this SDK."""
        name = pb.FinishReason.Name(value) if value in pb.FinishReason.values() else ""
        return cls.__members__.get(name.removeprefix("FINISH_REASON_"))

    @staticmethod
    def to_proto(reason: FinishReason | None) -> int:
        return pb.FinishReason.Value(f"FINISH_REASON_{reason.name if reason else 'UNSPECIFIED'}")


class HealthStatus(StrEnum):
    """grpc.health.v1 serving status. A draining server answers NOT_SERVING."""

    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    SERVICE_UNKNOWN = "service_unknown"


@dataclass(frozen=True)
class DraftOptions:
    """How the edge drafts. Zero values mean the server's defaults."""

    # The SLM's tree shape: "beam" (ReDrafter-style beams, shared prefixes merged),
    # "topk" or "chain". The edge checks the name.
    tree: str = ""
    # Beams (beam tree) or branching factor (top-k tree), in [0, 16].
    width: int = 0
    # Draft tokens per beam, in [0, 32].
    depth: int = 0
    # Who drafts lossless rounds: "slm", "head" (the recurrent head; needs one on the
    # edge), "ngram" (lookup in the history) or "auto". The edge checks the name.
    drafter: str = ""

    default: ClassVar[DraftOptions]

    def __post_init__(self) -> None:
        check_draft(self.tree, self.width, self.depth, self.drafter)


DraftOptions.default = DraftOptions()


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat. A list of them (or of {"role", "content"} dicts) given as a
    prompt is rendered by the edge with its model's chat template, followed by an open
    assistant turn."""

    role: ChatRole | str
    content: str

    @classmethod
    def of(cls, message: ChatMessage | Mapping[str, object], i: int) -> ChatMessage:
        """`message`, or a {"role", "content"} mapping as one; `i` its index, for errors."""
        if isinstance(message, ChatMessage):
            return message
        if not isinstance(message, Mapping):
            raise InvalidRequest(
                f"messages[{i}]: must be a ChatMessage or a {{'role', 'content'}} dict, "
                f"got {message!r}",
                field=f"messages[{i}]",
            )
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise InvalidRequest(
                f"messages[{i}]: allowed keys are role and content, got {extra}",
                field=f"messages[{i}]",
            )
        return cls(role=message.get("role"), content=message.get("content"))

    def to_proto(self) -> pb.ChatMessage:
        return pb.ChatMessage(role=self.role, content=self.content)


@dataclass(frozen=True)
class Schedule:
    """How the verifier orders a session's rounds against others' (its validated
    `priority` and `tpot_slo_ms`, as they travel from the edge to the verifier)."""

    priority: int = 0  # lower goes first
    tpot_slo_ms: float = 0.0  # the time per output token the client needs; 0 = none


@dataclass(frozen=True)
class GenerateOptions:
    """Everything about a generation except the prompt. Validated on construction with
    the server's rules (`InvalidRequest` names the field and its range)."""

    # Tokens to generate, in [1, 2**20] (and at most the model's context).
    max_tokens: int = 256
    # 0 = greedy; otherwise in (0, 100].
    temperature: float = 0.0
    # Nucleus sampling mass in [0, 1]; 0 or 1 = off.
    top_p: float = 1.0
    # Keep the k most likely tokens, in [0, vocab]; 0 = off.
    top_k: int = 0
    # Seeds the request's sampler, in [0, 2**64); None = fresh entropy.
    seed: int | None = None
    # Given as the enum or its string value; stored as the enum.
    mode: Mode | ModeName = Mode.LOSSLESS
    # Up to 8 strings of 1..64 characters; the text stops before the first one seen.
    # A single string means a list of one; stored as a tuple.
    stop: str | Sequence[str] = ()
    # Model name; "" = the server's default.
    model: str = ""
    draft: DraftOptions = DraftOptions.default
    # Adaptive mode: the edge keeps its token when its probability is at least this,
    # in [0, 1]; 0 = server default.
    adaptive_threshold: float = 0.0
    # Scheduling class at the verifier, in [-100, 100]: lower goes first.
    priority: int = 0
    # The time per output token this client needs, in ms, in [0, 60000]; 0 = none. The
    # verifier serves first the rounds closest to missing their target.
    tpot_slo_ms: float = 0.0
    # Generate past the model's end-of-sequence tokens, to max_tokens or a stop string
    # (vLLM's ignore_eos: fixed-length outputs for load tests).
    ignore_eos: bool = False

    default: ClassVar[GenerateOptions]

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            names = ", ".join(m.value for m in Mode)
            raise InvalidRequest(
                f"mode: must be one of {names}, got {self.mode!r}", field="mode"
            ) from None
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Iterable):
            raise InvalidRequest(
                f"stop: must be a string or a list of strings, got {stop!r}", field="stop"
            )
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.model, str):
            raise InvalidRequest(f"model: must be a string, got {self.model!r}", field="model")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(
                f"ignore_eos: must be true or false, got {self.ignore_eos!r}", field="ignore_eos"
            )
        if not isinstance(self.draft, DraftOptions):
            raise InvalidRequest(
                f"draft: must be a DraftOptions, got {type(self.draft).__name__}", field="draft"
            )
        check_generation(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            mode=Mode(self.mode).proto,
            stop=self.stop,
            adaptive_threshold=self.adaptive_threshold,
            priority=self.priority,
            tpot_slo_ms=self.tpot_slo_ms,
        )

    def updated(self, **changes: object) -> GenerateOptions:
        """A copy with the changes that are not None (None means "keep mine")."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def request(self, prompt: Prompt) -> pb.GenerateRequest:
        """The wire request for `prompt` with these options (see `Request.of`)."""
        return Request.of(prompt, self).to_proto()


GenerateOptions.default = GenerateOptions()
# What `generate` and `stream` take: text, token ids, or a chat.
Prompt = str | Sequence[int] | Sequence[ChatMessage | Mapping[str, str]]


@dataclass(frozen=True)
class Request:
    """One generation as the client asked for it: the prompt and the options, checked
    against every rule that does not depend on the model (`check_fits` adds those).

    This is what the servers hand each other: the gateway parses the wire request into
    one and gives it to an edge actor, the HTTP front builds one from an OpenAI body,
    and the edge runtime resolves it against its model (tokenizer, vocabulary,
    context). It is validated once, where it is built.
    """

    # Text, token ids, or a chat; exactly one form, non-empty.
    prompt: str | tuple[int, ...] | tuple[ChatMessage, ...]
    options: GenerateOptions = GenerateOptions.default

    @classmethod
    def of(cls, prompt: Prompt, options: GenerateOptions) -> Request:
        """`prompt` as text, a sequence of token ids, or a chat: a list of `ChatMessage`s
        or {"role", "content"} dicts."""
        text, tokens, messages = "", (), ()
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, Iterable) and not isinstance(prompt, (bytes, bytearray)):
            items = tuple(prompt)
            if items and isinstance(items[0], (ChatMessage, Mapping)):
                messages = tuple(ChatMessage.of(m, i) for i, m in enumerate(items))
            else:
                tokens = items
        else:
            raise InvalidRequest(
                "prompt: must be a str, a sequence of token ids or a list of chat messages, "
                f"got {type(prompt).__name__}",
                field="prompt",
            )
        check_prompt(text, tokens, messages)
        return cls(text or tuple(int(t) for t in tokens) or messages, options)

    @classmethod
    def from_proto(cls, msg: pb.GenerateRequest) -> Request:
        """The server's entry: a received request checked with the SDK's rules (a client
        that skips the SDK gets the same answers)."""
        check_prompt(msg.prompt, msg.prompt_tokens, msg.messages)
        if msg.mode not in pb.Mode.values():
            names = ", ".join(pb.Mode.keys())
            raise InvalidRequest(f"mode: must be one of {names}, got {msg.mode!r}", field="mode")
        read = {
            "seed": msg.seed if msg.HasField("seed") else None,
            "mode": Mode.from_proto(msg.mode),
            "draft": DraftOptions(**_fields_of(DraftOptions, msg.draft)),
        }
        for field in dataclasses.fields(GenerateOptions):  # the rest: same name, same value
            read.setdefault(field.name, getattr(msg, field.name))
        options = GenerateOptions(**read)
        messages = tuple(ChatMessage(m.role, m.content) for m in msg.messages)
        return cls(msg.prompt or tuple(msg.prompt_tokens) or messages, options)

    @property
    def prompt_tokens(self) -> tuple[int, ...]:
        """The prompt's token ids, when it was given as ids; () otherwise."""
        return self.prompt if self.prompt and isinstance(self.prompt[0], int) else ()

    @property
    def messages(self) -> tuple[ChatMessage, ...]:
        return self.prompt if self.prompt and isinstance(self.prompt[0], ChatMessage) else ()

    def check_fits(self, *, vocab_size: int, max_context: int) -> None:
        """The rules that depend on the serving model: token ids and top_k within its
        vocabulary, max_tokens within its context."""
        check_fits_model(
            self.prompt_tokens,
            top_k=self.options.top_k,
            max_tokens=self.options.max_tokens,
            vocab_size=vocab_size,
            max_context=max_context,
        )

    def to_proto(self) -> pb.GenerateRequest:
        options = self.options
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)} | {
            "mode": Mode(options.mode).proto,
            "draft": pb.DraftOptions(**dataclasses.asdict(options.draft)),
        }
        return pb.GenerateRequest(
            prompt=self.prompt if isinstance(self.prompt, str) else "",
            prompt_tokens=self.prompt_tokens,
            messages=[m.to_proto() for m in self.messages],
            **{name: value for name, value in fields.items() if value is not None},  # seed
        )


class GenerateKwargs(TypedDict, total=False):
    """`GenerateOptions`' fields as keyword arguments of the clients' `generate` and
    `stream` (None: the client's default). tests/sdk/test_contract.py keeps the two
    equal."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    mode: Mode | ModeName | None
    stop: str | Sequence[str] | None
    model: str | None
    draft: DraftOptions | None
    adaptive_threshold: float | None
    priority: int | None
    tpot_slo_ms: float | None
    ignore_eos: bool | None


@dataclass(frozen=True)
class GenerationStats:
    """What one generation cost. Sent by the server with the last chunk. The schema of
    every statistic: the `GenerationStats` proto has the same fields, converted by name
    (a test keeps the two equal), and the servers' metrics read them from here."""

    rounds: int = 0  # verification rounds sent to the cloud
    tokens_per_round: float = 0.0  # mean tokens accepted per round, bonus included (tau)
    cloud_forward_passes: int = 0  # target-model forward passes the cloud ran
    generated_tokens: int = 0
    prompt_tokens: int = 0
    bytes_to_cloud: int = 0  # verification bytes edge -> cloud
    bytes_from_cloud: int = 0  # verification bytes cloud -> edge
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    degraded: bool = False  # some output token was never verified by the cloud
    failovers: int = 0  # times the edge reopened its session on another verifier
    draft_tokens: int = 0  # draft tokens proposed
    accepted_tokens: int = 0  # draft tokens the cloud accepted
    # accepted_per_position[i]: rounds in which the draft's (i+1)-th token was accepted
    accepted_per_position: tuple[int, ...] = ()
    rollbacks: int = 0  # rollbacks sent in this stream
    head_rounds: int = 0  # rounds drafted by the recurrent head (the rest by the edge's SLM)
    # Tree nodes the prefix deduplication saved against sending every beam whole.
    dedup_saved_tokens: int = 0
    draft_ms: float = 0.0  # time the edge spent drafting
    # Rounds whose draft was made while the previous round was verified, and used.
    pipelined_rounds: int = 0
    # Rounds the verifier served last: this request was too far behind its tpot_slo_ms.
    slo_unreachable_rounds: int = 0
    # The verifier's load in its last reply (0 idle .. 1 saturated), which shapes the drafts.
    verifier_load: float = 0.0

    @property
    def tau(self) -> float:
        """Mean accepted tokens per round, the speculative-decoding literature's tau."""
        return self.tokens_per_round

    @classmethod
    def from_proto(cls, msg: pb.GenerationStats) -> GenerationStats:
        return cls(**_fields_of(cls, msg))

    def to_proto(self) -> pb.GenerationStats:
        return pb.GenerationStats(**dataclasses.asdict(self))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    max_context: int
    roles: tuple[str, ...]  # who serves it here: "edge", "cloud"

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(**_fields_of(cls, msg))


@dataclass(frozen=True)
class Rollback:
    """Before appending the chunk that carries it: keep only the first `keep_tokens`
    output tokens and the first `keep_chars` characters (code points) of text."""

    keep_tokens: int
    keep_chars: int


@dataclass(frozen=True)
class Chunk:
    """One streamed message. `text` is the delta of the text, `tokens` of the token ids;
    apply `rollback` (if any) to what you have shown before appending them. The text may
    lag the tokens by a few characters that could start a stop string (the next chunks,
    or the last one, carry them). The stream object tracks the accumulated text and
    tokens with rollbacks applied (`stream.text`, `stream.tokens`)."""

    text: str = ""
    tokens: tuple[int, ...] = ()
    # The cloud verified these tokens (always in lossless and cloud_only modes).
    verified: bool = True
    rollback: Rollback | None = None
    # Set on the last chunk only.
    stats: GenerationStats | None = None
    finish_reason: FinishReason | None = None

    @classmethod
    def from_proto(cls, msg: pb.GenerateChunk) -> Chunk:
        rollback = msg.rollback if msg.HasField("rollback") else None
        return cls(
            text=msg.text,
            tokens=tuple(msg.tokens),
            verified=msg.verified,
            rollback=None if rollback is None else Rollback(**_fields_of(Rollback, rollback)),
            stats=GenerationStats.from_proto(msg.stats) if msg.HasField("stats") else None,
            finish_reason=FinishReason.from_proto(msg.finish_reason),
        )

    def to_proto(self) -> pb.GenerateChunk:
        msg = pb.GenerateChunk(
            text=self.text,
            tokens=self.tokens,
            verified=self.verified,
            finish_reason=FinishReason.to_proto(self.finish_reason),
        )
        if self.rollback is not None:
            msg.rollback.CopyFrom(pb.Rollback(**dataclasses.asdict(self.rollback)))
        if self.stats is not None:
            msg.stats.CopyFrom(self.stats.to_proto())
        return msg


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: tuple[int, ...]
    stats: GenerationStats
    finish_reason: FinishReason | None


class Transcript:
    """The output of one stream so far, with rollbacks applied. Base of the stream
    classes, which feed it one chunk at a time.

    Worked example (adaptive mode corrects an unverified span):

        chunk "Héllo" [1, 2] verified          -> "Héllo",        [1, 2]
        chunk " wrld" [3, 4] unverified        -> "Héllo wrld",   [1, 2, 3, 4]
        chunk Rollback(keep_tokens=2, keep_chars=5), " world" [5, 6] verified
                                               -> "Héllo world",  [1, 2, 5, 6]

    `keep_chars` counts characters (code points), not UTF-8 bytes: "Héllo" is 5.
    """

    def __init__(self) -> None:
        self._tokens: list[int] = []
        self._parts: list[str] = []  # joined lazily: appending stays O(delta)
        self._chars = 0
        self._stats: GenerationStats | None = None
        self._finish_reason: FinishReason | None = None

    @property
    def text(self) -> str:
        """The text received so far, rollbacks applied."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def tokens(self) -> tuple[int, ...]:
        """The output token ids received so far, rollbacks applied."""
        return tuple(self._tokens)

    @property
    def stats(self) -> GenerationStats | None:
        """The final statistics; None until the last chunk has arrived."""
        return self._stats

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._finish_reason

    def _apply(self, msg: pb.GenerateChunk) -> Chunk:
        chunk = Chunk.from_proto(msg)
        if chunk.rollback is not None:
            keep_tokens, keep_chars = chunk.rollback.keep_tokens, chunk.rollback.keep_chars
            if not 0 <= keep_tokens <= len(self._tokens):
                raise ServerError(
                    f"rollback.keep_tokens: must be in [0, {len(self._tokens)}], got {keep_tokens}"
                )
            if not 0 <= keep_chars <= self._chars:
                raise ServerError(
                    f"rollback.keep_chars: must be in [0, {self._chars}], got {keep_chars}"
                )
            del self._tokens[keep_tokens:]
            self._parts[:] = [self.text[:keep_chars]]
            self._chars = keep_chars
        self._tokens.extend(chunk.tokens)
        self._parts.append(chunk.text)
        self._chars += len(chunk.text)
        if chunk.stats is not None:
            self._stats = chunk.stats
            self._finish_reason = chunk.finish_reason
        return chunk

    def _result(self) -> GenerationResult:
        """The finished generation; the stream must have ended."""
        if self._stats is None:
            raise ServerError("the stream ended without its final chunk (the one with stats)")
        return GenerationResult(self.text, self.tokens, self._stats, self._finish_reason)


def _fields_of(cls: type, msg: object) -> dict[str, object]:
    """The dataclass `cls`'s fields read from the proto `msg` by name; repeated -> tuple."""
    values = {}
    for field in dataclasses.fields(cls):
        value = getattr(msg, field.name)
        values[field.name] = value if isinstance(value, (str, bytes, int, float)) else tuple(value)
    return values
