"""The committed stubs are exactly what the .proto files generate, and the public
protocol keeps the messages and fields other components rely on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="needs the dev extra")
def test_regenerating_changes_nothing(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "protos"))
    try:
        from generate import generate
    finally:
        sys.path.pop(0)
    protos = generate(tmp_path)
    assert protos, "no .proto files found"
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc wrote nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is generated but not committed"
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale: run `python protos/generate.py`"
        )


def test_services_and_methods():
    from protocol.v1 import generation_pb2, verification_pb2

    generation = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert {m.name: (m.client_streaming, m.server_streaming) for m in generation.methods} == {
        "Generate": (False, True),
        "ListModels": (False, False),
    }
    verifier = verification_pb2.DESCRIPTOR.services_by_name["Verifier"]
    assert {m.name: (m.client_streaming, m.server_streaming) for m in verifier.methods} == {
        "Verify": (True, True)
    }


def test_field_numbers_are_stable():
    """Renumbering a field breaks every deployed peer; this pins the wire contract."""
    from protocol.v1 import generation_pb2, verification_pb2

    pinned = {
        verification_pb2.OpenSession: {
            "model": 1,
            "context": 2,
            "sampling": 3,
            "session_id": 4,
            "return_hidden": 5,
        },
        verification_pb2.SessionOpened: {"max_context": 5, "hidden": 6},
        verification_pb2.HiddenState: {"dim": 1, "encoding": 2, "data": 3, "scale": 4},
        verification_pb2.Round: {"new_tokens": 1, "tree": 2, "draft_dists": 3, "round_id": 4},
        verification_pb2.RoundResult: {
            "round_id": 1,
            "accepted_nodes": 2,
            "accepted_tokens": 3,
            "bonus_token": 4,
            "nodes_verified": 5,
            "server_ms": 6,
            "batch_size": 7,
            "hidden": 8,
        },
        generation_pb2.GenerateRequest: {
            "prompt": 1,
            "prompt_tokens": 2,
            "model": 3,
            "max_tokens": 4,
            "temperature": 5,
            "top_k": 6,
            "top_p": 7,
            "seed": 8,
            "mode": 9,
            "stop": 10,
            "draft": 11,
            "adaptive_threshold": 12,
            "messages": 15,
        },
        generation_pb2.ChatMessage: {"role": 1, "content": 2},
        generation_pb2.GenerationStats: {"failovers": 11, "rollbacks": 15, "head_rounds": 16},
        generation_pb2.GenerateChunk: {
            "text": 1,
            "tokens": 2,
            "verified": 3,
            "rollback": 4,
            "stats": 5,
            "finish_reason": 6,
        },
    }
    for message, fields in pinned.items():
        numbers = {f.name: f.number for f in message.DESCRIPTOR.fields}
        for name, number in fields.items():
            assert numbers.get(name) == number, f"{message.DESCRIPTOR.name}.{name}"


def test_hidden_encodings_match_the_codec():
    """lm.hidden_codec.HiddenEncoding converts to and from the wire by value."""
    from lm.hidden_codec import HiddenEncoding
    from protocol.v1 import verification_pb2

    wire = verification_pb2.DESCRIPTOR.enum_types_by_name["HiddenEncoding"]
    assert {v.name: v.number for v in wire.values} == {
        f"HIDDEN_{e.name}": e.value for e in HiddenEncoding
    }


def test_sampling_parameters_travel_as_doubles():
    """A float32 field turned 0.7 into 0.699999988 and 1e-46 into 0 (greedy on the
    verifier while the edge sampled)."""
    from edge_node.verifier_client import sampling_message
    from lm.sampling import SamplingParams
    from protocol.v1 import generation_pb2, verification_pb2

    for value in (0.7, 1e-46):
        wire = verification_pb2.SamplingParams.FromString(
            sampling_message(SamplingParams(temperature=value, top_p=0.7)).SerializeToString()
        )
        assert (wire.temperature, wire.top_p) == (value, 0.7)
        request = generation_pb2.GenerateRequest(temperature=value, top_p=0.7)
        again = generation_pb2.GenerateRequest.FromString(request.SerializeToString())
        assert (again.temperature, again.top_p) == (value, 0.7)
