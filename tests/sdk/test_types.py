"""The SDK's value types: rollback bookkeeping (the `Transcript` docstring's worked
example, replayed), proto conversions and option normalisation."""

from __future__ import annotations

import pytest

import edgecloud
from edgecloud import FinishReason, GenerateOptions, Mode, Rollback, ServerError
from protocol.types import Transcript
from protocol.v1 import generation_pb2 as pb


def test_transcript_docstring_example():
    transcript = Transcript()
    transcript._apply(pb.GenerateChunk(text="Héllo", tokens=[1, 2], verified=True))
    assert (transcript.text, transcript.tokens) == ("Héllo", (1, 2))
    transcript._apply(pb.GenerateChunk(text=" wrld", tokens=[3, 4], verified=False))
    assert (transcript.text, transcript.tokens) == ("Héllo wrld", (1, 2, 3, 4))
    chunk = transcript._apply(
        pb.GenerateChunk(
            text=" world",
            tokens=[5, 6],
            verified=True,
            rollback=pb.Rollback(keep_tokens=2, keep_chars=5),
        )
    )
    assert chunk.rollback == Rollback(keep_tokens=2, keep_chars=5)
    # keep_chars counts code points: cutting 5 UTF-8 bytes would leave "Héll".
    assert (transcript.text, transcript.tokens) == ("Héllo world", (1, 2, 5, 6))


def test_rollback_to_nothing_and_repeated_rollbacks():
    transcript = Transcript()
    transcript._apply(pb.GenerateChunk(text="ab", tokens=[1, 2]))
    transcript._apply(pb.GenerateChunk(text="c", tokens=[3], rollback=pb.Rollback()))
    assert (transcript.text, transcript.tokens) == ("c", (3,))
    transcript._apply(pb.GenerateChunk(text="de", tokens=[4, 5]))
    transcript._apply(pb.GenerateChunk(rollback=pb.Rollback(keep_tokens=2, keep_chars=2)))
    assert (transcript.text, transcript.tokens) == ("cd", (3, 4))


@pytest.mark.parametrize(
    ("rollback", "message"),
    [
        (
            pb.Rollback(keep_tokens=3, keep_chars=1),
            "rollback.keep_tokens: must be in [0, 2], got 3",
        ),
        (pb.Rollback(keep_tokens=1, keep_chars=3), "rollback.keep_chars: must be in [0, 2], got 3"),
        (pb.Rollback(keep_tokens=-1), "rollback.keep_tokens: must be in [0, 2], got -1"),
    ],
)
def test_rollback_past_the_output_is_a_server_error(rollback, message):
    transcript = Transcript()
    transcript._apply(pb.GenerateChunk(text="ab", tokens=[1, 2]))
    with pytest.raises(ServerError) as info:
        transcript._apply(pb.GenerateChunk(rollback=rollback))
    assert str(info.value) == message
    assert (transcript.text, transcript.tokens) == ("ab", (1, 2)), "a bad rollback changes nothing"


def test_result_needs_the_final_stats_chunk():
    transcript = Transcript()
    transcript._apply(pb.GenerateChunk(text="ab", tokens=[1, 2]))
    with pytest.raises(ServerError, match="without its final chunk"):
        transcript._result()
    transcript._apply(
        pb.GenerateChunk(stats=pb.GenerationStats(rounds=1), finish_reason=pb.FINISH_REASON_LENGTH)
    )
    result = transcript._result()
    assert (result.text, result.tokens, result.stats.rounds) == ("ab", (1, 2), 1)
    assert result.finish_reason is FinishReason.LENGTH


def test_mode_maps_to_every_proto_mode_but_unspecified():
    assert {m.proto for m in Mode} == set(pb.Mode.values()) - {pb.MODE_UNSPECIFIED}
    assert Mode.EDGE_ONLY.proto == pb.MODE_EDGE_ONLY
    assert GenerateOptions(mode="cloud_only").request("x").mode == pb.MODE_CLOUD_ONLY
    assert GenerateOptions.default.request("x").mode == pb.MODE_LOSSLESS


def test_finish_reason_from_proto():
    assert FinishReason.from_proto(pb.FINISH_REASON_UNSPECIFIED) is None
    assert FinishReason.from_proto(pb.FINISH_REASON_STOP) is FinishReason.STOP
    assert FinishReason.from_proto(pb.FINISH_REASON_LENGTH) is FinishReason.LENGTH
    assert FinishReason.from_proto(99) is None


def test_options_normalise_and_update():
    options = GenerateOptions(mode="adaptive", stop="\n", seed=5)
    assert options.mode is Mode.ADAPTIVE and options.stop == ("\n",)
    updated = options.updated(temperature=0.7, seed=None, stop=["a", "b"])
    assert (updated.temperature, updated.seed, updated.stop) == (0.7, 5, ("a", "b"))
    assert updated.mode is Mode.ADAPTIVE


def test_request_carries_every_option():
    options = GenerateOptions(
        max_tokens=9,
        temperature=0.5,
        top_p=0.25,
        top_k=4,
        seed=2**64 - 1,
        mode="edge_only",
        stop=["\n\n"],
        model="stories",
        draft=edgecloud.DraftOptions(tree="beam", width=3, depth=5),
        adaptive_threshold=0.75,
    )
    req = options.request([3, 1, 4])
    assert list(req.prompt_tokens) == [3, 1, 4] and req.prompt == ""
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k) == (9, 0.5, 0.25, 4)
    assert (req.seed, req.mode, list(req.stop), req.model) == (
        2**64 - 1,
        pb.MODE_EDGE_ONLY,
        ["\n\n"],
        "stories",
    )
    assert (req.draft.tree, req.draft.width, req.draft.depth) == ("beam", 3, 5)
    assert req.adaptive_threshold == 0.75
    assert not GenerateOptions.default.request("x").HasField("seed"), "no seed: fresh entropy"


def test_retry_policy_service_config_retries_unavailable_only():
    import json

    config = json.loads(edgecloud.RetryPolicy(max_attempts=3).service_config(["a.B"]))
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "a.B"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 3
    with pytest.raises(ValueError, match=r"^max_attempts: must be in \[2, 5\]"):
        edgecloud.RetryPolicy(max_attempts=6)
