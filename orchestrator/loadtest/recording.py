"""Recording what a real edge sends its verifier, so that emulated edges can replay it.

A fleet of edge devices cannot be run on the verifier's own machine without their drafting
taking the verifier's cores. So the real edge (`edge_node.runtime.EdgeRuntime`, its SLM
drafter, a real verifier) generates from each prompt once, in lossless mode, and every
message it writes on its `Verifier.Verify` stream is recorded at the wire by a gRPC client
interceptor on its channel: the `open`, then each `round` (draft tree, draft distributions,
new tokens) with the reply it got and the edge's time before it (from the previous reply
to this send: drafting, mostly). Replaying the rounds against a verifier reproduces the
real acceptance, since verification is a function of the session's history and the tree:
greedy takes the argmax, seeded sampling draws position-keyed uniforms.

Pipelined drafting is off while recording (`DraftConfig.pipeline=False`), so each round's
edge time is spent before its send rather than hidden behind the previous verification.
The link is given the round trip the emulated edges will see (`RecordingKey.rtt_ms`, as
`CloudLinkConfig.simulated_rtt_ms`) so the adaptive shape policy drafts the trees an edge
on that link would draft; that wait falls between a send and its reply, not in edge time.

A recording file is JSON, protos as base64 of their wire bytes:
{"format": FORMAT, "recordings": [{"key": {...}, "source": "...", "requests": [
    {"prompt_index", "open", "output_tokens", "tau", "draft_ms",
     "rounds": [{"edge_ms", "request", "result"}]}]}]}
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from protocol.v1 import verification_pb2 as pb

FORMAT = "edgecloud-fleet-recording/1"


@dataclass(frozen=True)
class RecordingKey:
    """What a recording's rounds depend on besides the prompts and models: sampling, draft
    shape, tokens asked, and the round trip the edge's shape policy saw."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    # Needed when sampling: only seeded verification replays the same acceptance.
    seed: int | None = None
    max_tokens: int = 64
    tree: str = "beam"
    width: int = 4
    depth: int = 6
    adapt: bool = True
    rtt_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature > 0 and self.seed is None:
            raise ValueError(
                "seed: sampled rounds replay the same acceptance only when seeded; give one"
            )
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.rtt_ms < 0:
            raise ValueError(f"rtt_ms: must be >= 0, got {self.rtt_ms}")

    def describe(self) -> str:
        """E.g. "greedy, 64 tokens, beam 4x6 adaptive, shaped at 20 ms"."""
        sampling = "greedy" if self.temperature == 0 else f"T={self.temperature:g} seed {self.seed}"
        shape = f"{self.tree} {self.width}x{self.depth}{' adaptive' if self.adapt else ''}"
        return f"{sampling}, {self.max_tokens} tokens, {shape}, shaped at {self.rtt_ms:g} ms"


@dataclass(frozen=True)
class RecordedRound:
    # Edge time between the previous reply (the session's opening for the first round)
    # and this round's send: drafting, and applying the previous reply.
    edge_ms: float
    request: pb.VerifyRequest  # its `round`
    result: pb.RoundResult  # the reply the real edge got

    @property
    def tokens(self) -> int:
        """Tokens the reply yields: the accepted ones and the bonus."""
        return len(self.result.accepted_tokens) + 1


@dataclass(frozen=True)
class RecordedRequest:
    """One generation of the real edge, as its verifier stream saw it."""

    prompt_index: int
    open: pb.VerifyRequest  # its `open`: model, context (the prompt), sampling
    rounds: tuple[RecordedRound, ...]
    output_tokens: int  # tokens the generation produced (the last round may yield more)
    tau: float  # the real edge's tokens per round (GenerationStats.tokens_per_round)
    draft_ms: float  # the real edge's own drafting total (GenerationStats.draft_ms)

    @property
    def prompt_tokens(self) -> int:
        return len(self.open.open.context)


@dataclass(frozen=True)
class Recording:
    key: RecordingKey
    requests: tuple[RecordedRequest, ...]
    # Where it came from (models, prompts), for the reader.
    source: str = ""

    @property
    def tau(self) -> float:
        """Tokens per round over every recorded round, bonus included."""
        rounds = [r for request in self.requests for r in request.rounds]
        return sum(r.tokens for r in rounds) / len(rounds) if rounds else 0.0

    def edge_ms_per_round(self) -> float:
        rounds = [r for request in self.requests for r in request.rounds]
        return sum(r.edge_ms for r in rounds) / len(rounds) if rounds else 0.0


# ---- the file --------------------------------------------------------------------


def save_recordings(path: Path, recordings: Sequence[Recording]) -> None:
    """Writes `recordings` to `path`, keeping those already there under other keys."""
    path = Path(path)
    kept = [r for r in load_recordings(path) if r.key not in {n.key for n in recordings}]
    document = {"format": FORMAT, "recordings": [_recording_json(r) for r in kept + [*recordings]]}
    path.write_text(json.dumps(document) + "\n")


def load_recordings(path: Path) -> list[Recording]:
    """The recordings in `path`; none when it does not exist. ValueError when it is not a
    recording file."""
    document = read_document(path, FORMAT, "a fleet recording")
    return [] if document is None else [_recording_from_json(i) for i in document["recordings"]]


def read_document(path: Path, format_: str, kind: str) -> dict | None:
    """The JSON object in `path` whose "format" is `format_`; None when there is no file.
    ValueError, naming the file and `kind` (what it should have been), otherwise."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: not JSON ({exc.msg})") from None
    if not isinstance(document, dict) or document.get("format") != format_:
        raise ValueError(f"{path.name}: not {kind} (format {format_!r})")
    return document


def find_recording(recordings: Sequence[Recording], **wanted: object) -> Recording | None:
    """The recording whose key has every `wanted` field (RecordingKey's names) equal, the one
    shaped at the round trip nearest `rtt_ms` when that is wanted too; None when none fits.

    Example: find_recording(recs, temperature=0.0, max_tokens=64, rtt_ms=50) takes a greedy
    64-token recording shaped at 80 ms over one shaped at 0 ms."""
    rtt = wanted.pop("rtt_ms", None)
    fitting = [r for r in recordings if all(getattr(r.key, k) == v for k, v in wanted.items())]
    if not fitting:
        return None
    return min(fitting, key=lambda r: 0.0 if rtt is None else abs(r.key.rtt_ms - float(rtt)))


def _b64(message) -> str:
    return base64.b64encode(message.SerializeToString()).decode("ascii")


def _parse(cls, text: str):
    return cls.FromString(base64.b64decode(text))


def _recording_json(recording: Recording) -> dict[str, object]:
    return {
        "key": dataclasses.asdict(recording.key),
        "source": recording.source,
        "requests": [
            {
                "prompt_index": r.prompt_index,
                "open": _b64(r.open),
                "output_tokens": r.output_tokens,
                "tau": r.tau,
                "draft_ms": r.draft_ms,
                "rounds": [
                    {"edge_ms": x.edge_ms, "request": _b64(x.request), "result": _b64(x.result)}
                    for x in r.rounds
                ],
            }
            for r in recording.requests
        ],
    }


def _recording_from_json(item: dict) -> Recording:
    requests = tuple(
        RecordedRequest(
            prompt_index=r["prompt_index"],
            open=_parse(pb.VerifyRequest, r["open"]),
            rounds=tuple(
                RecordedRound(
                    x["edge_ms"],
                    _parse(pb.VerifyRequest, x["request"]),
                    _parse(pb.RoundResult, x["result"]),
                )
                for x in r["rounds"]
            ),
            output_tokens=r["output_tokens"],
            tau=r["tau"],
            draft_ms=r["draft_ms"],
        )
        for r in item["requests"]
    )
    return Recording(RecordingKey(**item["key"]), requests, item.get("source", ""))


# ---- recording a real edge ---------------------------------------------------------


class _Tape(aio.StreamStreamClientInterceptor):
    """Notes every message each stream-stream call writes and reads, with the time."""

    def __init__(self) -> None:
        # Per call: ("sent" | "received", perf_counter seconds, message).
        self.calls: list[list[tuple[str, float, object]]] = []

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        events: list[tuple[str, float, object]] = []
        self.calls.append(events)

        async def sent():
            async for request in request_iterator:
                events.append(("sent", time.perf_counter(), request))
                yield request

        call = await continuation(client_call_details, sent())

        async def received():
            async for response in call:
                events.append(("received", time.perf_counter(), response))
                yield response

        return received()


def _recorded_request(
    prompt_index: int, events: list[tuple[str, float, object]], stats
) -> RecordedRequest:
    """One generation's stream, as written and read, into its recorded rounds."""
    kinds = [kind for kind, _, _ in events]
    if kinds[:2] != ["sent", "received"] or kinds[2:] != ["sent", "received"] * (
        (len(kinds) - 2) // 2
    ):
        raise RuntimeError(f"recording: expected open, then round/reply pairs, got {kinds}")
    rounds = []
    for i in range(2, len(events), 2):
        (_, sent_at, request), (_, _, reply) = events[i], events[i + 1]
        edge_ms = (sent_at - events[i - 1][1]) * 1000
        rounds.append(RecordedRound(edge_ms, request, reply.result))
    return RecordedRequest(
        prompt_index=prompt_index,
        open=events[0][2],
        rounds=tuple(rounds),
        output_tokens=stats.generated_tokens,
        tau=stats.tokens_per_round,
        draft_ms=stats.draft_ms,
    )


async def record(
    draft,
    verifier: str,
    model: str,
    prompts: Sequence[Sequence[int]],
    key: RecordingKey,
    *,
    token: str | None = None,
    tls=None,
    source: str = "",
) -> Recording:
    """Generates from each of `prompts` (token ids) with the real edge on `draft` (an
    `lm.model.Transformer`) against the verifier at `verifier` serving `model`, one prompt
    after another, and records its streams. One untimed warm-up generation comes first.
    Raises RuntimeError when a generation failed over (its stream would be two) or did
    not end normally."""
    from edge_node.cloud_link import CloudLink, CloudLinkConfig
    from edge_node.picker import FixedListPicker, VerifierEndpoint
    from edge_node.runtime import EdgeConfig, EdgeRuntime
    from edge_node.types import DraftConfig, GenerationRequest
    from lm.sampling import SamplingParams
    from protocol.channel import channel_options
    from protocol.types import Mode

    tape = _Tape()

    class TapedLink(CloudLink):
        """The edge's link, its channels opened with the tape on."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.taped: dict[str, aio.Channel] = {}

        def channel(self, address: str) -> aio.Channel:
            if address not in self.taped:
                options = channel_options(server_name=tls.server_name if tls else None)
                self.taped[address] = (
                    aio.insecure_channel(address, options=options, interceptors=[tape])
                    if tls is None
                    else aio.secure_channel(
                        address, tls.credentials(), options=options, interceptors=[tape]
                    )
                )
            return self.taped[address]

        async def close(self) -> None:
            for channel in self.taped.values():
                await channel.close()
            await super().close()

    link = TapedLink(
        FixedListPicker([VerifierEndpoint(verifier, model)]),
        # Generous timeouts: on a loaded machine a slow round must not look like a failure.
        CloudLinkConfig(
            token=token,
            tls=tls,
            open_timeout_s=120,
            round_timeout_s=120,
            simulated_rtt_ms=key.rtt_ms,
        ),
    )
    runtime = EdgeRuntime(draft, EdgeConfig(model_name=model, threads=1), link=link)
    shape = DraftConfig(key.tree, key.width, key.depth, adapt=key.adapt, pipeline=False)
    sampling = SamplingParams(
        temperature=key.temperature, top_k=key.top_k, top_p=key.top_p, seed=key.seed
    )

    async def generate(prompt: Sequence[int], max_tokens: int):
        tape.calls.clear()
        request = GenerationRequest(
            prompt_tokens=tuple(prompt),
            max_tokens=max_tokens,
            sampling=sampling,
            mode=Mode.LOSSLESS,
            draft=shape,
        )
        chunks = [chunk async for chunk in runtime.generate(request)]
        stats = chunks[-1].stats
        if len(tape.calls) != 1 or stats is None or stats.failovers:
            raise RuntimeError(
                f"recording: the generation used {len(tape.calls)} verifier streams "
                f"({stats.failovers if stats else '?'} failovers); record on a quiet verifier"
            )
        return tape.calls[0], stats

    requests = []
    try:
        await generate(prompts[0], min(4, key.max_tokens))  # warms the SLM and the channel
        for index, prompt in enumerate(prompts):
            events, stats = await generate(prompt, key.max_tokens)
            requests.append(_recorded_request(index, events, stats))
    finally:
        await runtime.close()
    return Recording(key, tuple(requests), source)
