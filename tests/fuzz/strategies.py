"""Hypothesis strategies for the wire messages, byte mutations, and the bookkeeping
every fuzz module shares.

The example budget per test is `EDGECLOUD_FUZZ_EXAMPLES` (default 25, what CI runs);
a long run is `EDGECLOUD_FUZZ_EXAMPLES=5000 pytest tests/fuzz`.
"""

from __future__ import annotations

import os
import socket
from collections import Counter

import grpc
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import verification_pb2 as pb
from tests.fleet import VOCAB
from tests.tiny import MODEL_NAME

EXAMPLES = int(os.environ.get("EDGECLOUD_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# What a server may answer to anything a client sends with the right token: the
# statuses the SDK and the protos document. UNKNOWN and INTERNAL mean an exception
# escaped a handler; anything else is undocumented.
DOCUMENTED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OUT_OF_RANGE,  # a round past the verifier's context
        grpc.StatusCode.NOT_FOUND,  # a model no node (or not this edge) serves
    }
)
# Seconds a fuzz call may take; longer ones end with DEADLINE_EXCEEDED, documented.
CALL_TIMEOUT_S = 3.0
# Allowed growth of a server's resident memory over one fuzz module (KiB).
RSS_GROWTH_LIMIT_KIB = 64 * 1024


def identity(data: bytes) -> bytes:
    return data


INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
FLOAT32 = st.floats(width=32)  # NaN and the infinities included
TOKEN = st.one_of(st.integers(0, VOCAB - 1), st.integers(-3, VOCAB + 3), INT32)
SMALL_TEXT = st.text(max_size=24)


def token_lists(max_size: int) -> st.SearchStrategy[list[int]]:
    """Short lists of any ints, or long runs of one valid token (context limits)."""
    long = st.integers(0, max_size).map(lambda n: [1] * n)
    return st.one_of(st.lists(TOKEN, max_size=8), long)


def _assign(message: Message, name: str, value: object) -> None:
    field = message.DESCRIPTOR.fields_by_name[name]
    if value is None:
        message.ClearField(name)
    elif field.is_repeated:
        del getattr(message, name)[:]
        getattr(message, name).extend(value)
    elif field.message_type is not None:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


def perturbed(
    valid: st.SearchStrategy[Message], wild: dict[str, st.SearchStrategy]
) -> st.SearchStrategy[Message]:
    """A valid message with up to three of its fields replaced by anything: most inputs
    then get past the first check and reach the code behind it."""

    @st.composite
    def build(draw) -> Message:
        message = draw(valid)
        for name in sorted(draw(st.sets(st.sampled_from(sorted(wild)), max_size=3))):
            _assign(message, name, draw(wild[name]))
        return message

    return build()


VALID_TOKENS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
GENERATE_WILD = {
    "prompt": SMALL_TEXT,
    "prompt_tokens": token_lists(300),
    "model": st.one_of(st.just(MODEL_NAME), SMALL_TEXT),
    "max_tokens": INT32,
    "temperature": FLOAT32,
    "top_k": INT32,
    "top_p": FLOAT32,
    "seed": st.one_of(st.none(), UINT64),
    "mode": st.integers(-1, 6),  # proto3 enums are open: unknown values arrive too
    "stop": st.lists(st.text(max_size=80), max_size=10),
    "draft": st.builds(
        gpb.DraftOptions,
        tree=st.one_of(st.sampled_from(["", "beam", "topk", "chain"]), SMALL_TEXT),
        width=st.one_of(st.integers(-1, 17), INT32),
        depth=st.one_of(st.integers(-1, 33), INT32),
    ),
    "adaptive_threshold": FLOAT32,
}


def generate_requests() -> st.SearchStrategy[gpb.GenerateRequest]:
    valid = st.builds(
        gpb.GenerateRequest,
        prompt_tokens=VALID_TOKENS,
        max_tokens=st.integers(1, 6),
        temperature=st.sampled_from([0.0, 0.8]),
        seed=st.one_of(st.none(), st.integers(0, 2**32)),
        mode=st.integers(0, 4),
        draft=st.builds(
            gpb.DraftOptions,
            tree=st.sampled_from(["", "beam", "topk", "chain"]),
            width=st.integers(0, 3),
            depth=st.integers(0, 4),
        ),
    )
    return perturbed(valid, GENERATE_WILD)


def opens(valid: bool) -> st.SearchStrategy[pb.VerifyRequest]:
    base = st.builds(
        pb.OpenSession,
        model=st.just(MODEL_NAME),
        context=VALID_TOKENS,
        session_id=st.text(max_size=8),
    )
    wild = {
        "model": SMALL_TEXT,
        "context": token_lists(300),
        "session_id": st.text(max_size=140),
        "sampling": st.builds(
            pb.SamplingParams,
            temperature=FLOAT32,
            top_k=INT32,
            top_p=FLOAT32,
            seed=st.one_of(st.none(), UINT64),
        ),
    }
    open_ = base if valid else perturbed(base, wild)
    return open_.map(lambda o: pb.VerifyRequest(open=o))


NODE = st.integers(-3, 20)
ROUND_WILD = {
    "new_tokens": st.lists(TOKEN, max_size=20),
    "tree": st.builds(
        pb.DraftTree,
        tokens=st.lists(TOKEN, max_size=20),
        parents=st.lists(NODE, max_size=20),
    ),
    "draft_dists": st.lists(
        st.builds(
            pb.DraftDistribution,
            node=NODE,
            tokens=st.lists(TOKEN, max_size=6),
            probs=st.lists(st.one_of(FLOAT32, st.floats(0, 1, width=32)), max_size=6),
        ),
        max_size=3,
    ),
    "round_id": UINT64,
}


def rounds() -> st.SearchStrategy[pb.VerifyRequest]:
    """A chain draft, or a tree with sampled q for the root's children, perturbed."""
    chain = VALID_TOKENS.map(
        lambda t: pb.Round(tree=pb.DraftTree(tokens=t, parents=range(-1, len(t) - 1)))
    )
    siblings = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4, unique=True).map(
        lambda t: pb.Round(
            tree=pb.DraftTree(tokens=t, parents=[-1] * len(t)),
            draft_dists=[pb.DraftDistribution(node=-1, tokens=t, probs=[1 / len(t)] * len(t))],
        )
    )
    round_ = perturbed(st.one_of(chain, siblings), ROUND_WILD)
    return round_.map(lambda r: pb.VerifyRequest(round=r))


def verify_streams() -> st.SearchStrategy[list[pb.VerifyRequest]]:
    """Mostly a valid open followed by fuzzed rounds, so rounds reach the engine."""
    anything = st.one_of(opens(False), rounds(), st.just(pb.VerifyRequest()))
    return st.one_of(
        st.tuples(opens(True), st.lists(rounds(), max_size=3)).map(lambda t: [t[0], *t[1]]),
        st.lists(anything, min_size=1, max_size=4),
    )


EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate"]),
        UINT64,
        st.binary(min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    """`data` with each edit applied at position `at` modulo its length."""
    out = bytearray(data)
    for op, at, payload in edits:
        i = at % (len(out) + 1)
        if op == "flip" and i < len(out):
            out[i] ^= payload[0] or 0xFF
        elif op == "insert":
            out[i:i] = payload
        elif op == "delete":
            del out[i : i + len(payload)]
        elif op == "truncate":
            del out[i:]
    return bytes(out)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def send_raw(address: str, data: bytes, preface: bool) -> None:
    """Writes `data` (after the HTTP/2 preface when `preface`) on a fresh TCP
    connection, reads whatever comes back for a moment, and hangs up."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        try:
            sock.sendall((HTTP2_PREFACE if preface else b"") + data)
            sock.settimeout(0.2)
            sock.recv(65536)
        except OSError:  # reset or timed out: the server may drop garbage at once
            pass


def code_of(call_outcome: Exception | None) -> grpc.StatusCode:
    if call_outcome is None:
        return grpc.StatusCode.OK
    assert isinstance(call_outcome, grpc.RpcError), repr(call_outcome)
    return call_outcome.code()


class Tally:
    """Statuses seen, per method: the figures the suite reports."""

    def __init__(self) -> None:
        self.by_method: dict[str, Counter[str]] = {}
        # The first message seen per (method, status), for the summary.
        self.first: dict[tuple[str, str], str] = {}

    def record(self, method: str, code: grpc.StatusCode, details: str = "") -> None:
        """Counts a call's status; fails the test on an undocumented one."""
        self.note(method, code.name)
        self.first.setdefault((method, code.name), details[:160])
        assert code in DOCUMENTED, f"{method}: undocumented status {code.name}: {details}"

    def note(self, method: str, outcome: str) -> None:
        self.by_method.setdefault(method, Counter())[outcome] += 1

    def summary(self) -> str:
        lines = []
        for method, counts in sorted(self.by_method.items()):
            seen = ", ".join(f"{name} {n}" for name, n in counts.most_common())
            lines.append(f"{method}: {sum(counts.values())} inputs ({seen})")
            for name in counts:
                if self.first.get((method, name)):
                    lines.append(f"    {name}: e.g. {self.first[method, name]}")
        return "\n".join(lines)
