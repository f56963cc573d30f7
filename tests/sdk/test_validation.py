"""The request rules that the SDK checks before sending and servers check on receipt
(`protocol.validation`, through `Request.from_proto`, and `Request.check_fits` for the
serving model's limits): every rule rejects its bad values with the field's name and
allowed range, and the SDK's options and the server's proto check agree."""

from __future__ import annotations

import pytest

import edgecloud
from edgecloud import InvalidRequest
from protocol.types import Request
from protocol.v1 import generation_pb2 as pb


def validate_generate_request(
    msg: pb.GenerateRequest, *, vocab_size: int | None = None, max_context: int | None = None
) -> Request:
    """A server's two checks: the request's own rules on receipt, then the model's."""
    request = Request.from_proto(msg)
    if vocab_size or max_context:
        request.check_fits(vocab_size=vocab_size or 2**31, max_context=max_context or 2**20)
    return request


NOT_A_PROMPT = "prompt: must be a str, a sequence of token ids or a list of chat messages"
EXACTLY_ONE = "prompt: exactly one of prompt, prompt_tokens and messages must be non-empty"
# max_tokens' range before the model is known (the server names its own context).
ANY_MODEL = "[1, max_context] (the model's context; at most 1048576)"


def valid_request(**fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"prompt": "Once upon a time", "max_tokens": 16, **fields})


def test_valid_requests_pass():
    validate_generate_request(valid_request())
    validate_generate_request(
        pb.GenerateRequest(prompt_tokens=[0, 99], max_tokens=64), vocab_size=100, max_context=64
    )
    validate_generate_request(
        valid_request(
            temperature=100,
            top_k=100,
            top_p=1,
            seed=2**64 - 1,
            mode=pb.MODE_CLOUD_ONLY,
            stop=["x" * 64] * 8,
            draft=pb.DraftOptions(tree="chain", width=16, depth=32),
            adaptive_threshold=1,
        ),
        vocab_size=100,
    )


@pytest.mark.parametrize(
    ("fields", "limits", "message"),
    [
        ({"prompt": ""}, {}, f"{EXACTLY_ONE}, got none"),
        ({"prompt_tokens": [1]}, {}, f"{EXACTLY_ONE}, got more than one"),
        (
            {"prompt": "", "prompt_tokens": [1, -3]},
            {},
            "prompt_tokens[1]: must be in [0, 2147483647], got -3",
        ),
        (
            {"prompt": "", "prompt_tokens": [100]},
            {"vocab_size": 100},
            "prompt_tokens[0]: must be in [0, 100), got 100",
        ),
        (
            {"prompt": "", "messages": [pb.ChatMessage(role="user"), pb.ChatMessage(role="")]},
            {},
            "messages[1].role: must be one of system, developer, user, assistant, tool, got ''",
        ),
        (
            {"messages": [pb.ChatMessage(role="user", content="hi")]},
            {},
            f"{EXACTLY_ONE}, got more than one",
        ),
        ({"max_tokens": 0}, {}, f"max_tokens: must be in {ANY_MODEL}, got 0"),
        ({"max_tokens": (1 << 20) + 1}, {}, f"max_tokens: must be in {ANY_MODEL}, got 1048577"),
        (
            {"max_tokens": 65},
            {"max_context": 64},
            "max_tokens: must be in [1, max_context] (the model's context; 64 here), got 65",
        ),
        ({"temperature": 100.5}, {}, "temperature: must be in [0, 100], got 100.5"),
        ({"temperature": -0.5}, {}, "temperature: must be in [0, 100], got -0.5"),
        ({"temperature": float("nan")}, {}, "temperature: must be in [0, 100], got nan"),
        ({"top_k": -1}, {}, "top_k: must be in [0, 2147483647], got -1"),
        ({"top_k": 101}, {"vocab_size": 100}, "top_k: must be in [0, 100], got 101"),
        ({"top_p": 1.5}, {}, "top_p: must be in [0, 1], got 1.5"),
        (
            {"mode": 7},
            {},
            "mode: must be one of MODE_UNSPECIFIED, MODE_LOSSLESS, MODE_ADAPTIVE, "
            "MODE_EDGE_ONLY, MODE_CLOUD_ONLY, got 7",
        ),
        ({"stop": ["a"] * 9}, {}, "stop: at most 8 strings, got 9"),
        ({"stop": ["a", ""]}, {}, "stop[1]: must be a string of 1 to 64 characters, got ''"),
        ({"stop": ["x" * 65]}, {}, "stop[0]: must be a string of 1 to 64 characters"),
        (
            {"draft": pb.DraftOptions(tree="x" * 33)},
            {},
            "draft.tree: must be a name of at most 32 characters (a-z, 0-9, _)",
        ),
        (
            {"draft": pb.DraftOptions(drafter="Eagle!")},
            {},
            "draft.drafter: must be a name of at most 32 characters (a-z, 0-9, _)",
        ),
        ({"draft": pb.DraftOptions(width=17)}, {}, "draft.width: must be in [0, 16], got 17"),
        ({"draft": pb.DraftOptions(depth=-1)}, {}, "draft.depth: must be in [0, 32], got -1"),
        ({"adaptive_threshold": 1.5}, {}, "adaptive_threshold: must be in [0, 1], got 1.5"),
    ],
)
def test_each_rule_names_field_and_range(fields, limits, message):
    with pytest.raises(InvalidRequest) as info:
        validate_generate_request(valid_request(**fields), **limits)
    assert str(info.value).startswith(message)
    assert info.value.field == message.split(":")[0]
    assert isinstance(info.value, ValueError), "servers catch it as a ValueError"


@pytest.mark.parametrize(
    "options",
    [
        {"max_tokens": 0},
        {"temperature": 101.0},
        {"top_k": -2},
        {"top_p": 2.0},
        {"stop": ("a",) * 9},
        {"stop": ("",)},
        {"adaptive_threshold": -1.0},
    ],
)
def test_sdk_options_and_server_proto_reject_the_same_values(options):
    with pytest.raises(InvalidRequest) as from_sdk:
        edgecloud.GenerateOptions(**options)
    with pytest.raises(InvalidRequest) as from_server:
        validate_generate_request(valid_request(**options))
    assert from_sdk.value.field == from_server.value.field
    assert str(from_sdk.value) == str(from_server.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seed": -1}, "seed: must be in [0, 2**64), got -1"),
        ({"seed": 2**64}, "seed: must be in [0, 2**64), got 18446744073709551616"),
        ({"max_tokens": 2**40}, f"max_tokens: must be in {ANY_MODEL}, got 1099511627776"),
        ({"max_tokens": 2.5}, f"max_tokens: must be an integer in {ANY_MODEL}, got 2.5"),
        ({"temperature": "hot"}, "temperature: must be in [0, 100], got 'hot'"),
        (
            {"mode": "fast"},
            "mode: must be one of lossless, adaptive, edge_only, cloud_only, got 'fast'",
        ),
        ({"stop": 3}, "stop: must be a string or a list of strings, got 3"),
        ({"model": 3}, "model: must be a string, got 3"),
        ({"ignore_eos": "yes"}, "ignore_eos: must be true or false, got 'yes'"),
    ],
)
def test_values_the_proto_cannot_hold_are_rejected_by_name(options, message):
    """Out-of-range integers and wrong types fail with the field's name, not with a
    protobuf TypeError/ValueError from building the message."""
    with pytest.raises(InvalidRequest, match=f"^{message.split(':')[0]}:") as info:
        edgecloud.GenerateOptions(**options)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", f"{EXACTLY_ONE}, got none"),
        ([], f"{EXACTLY_ONE}, got none"),
        ([3, 2**31], "prompt_tokens[1]: must be in [0, 2147483647], got 2147483648"),
        (b"bytes", f"{NOT_A_PROMPT}, got bytes"),
        (7, f"{NOT_A_PROMPT}, got int"),
        (
            [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}],
            "messages[1].role: must be one of system, developer, user, assistant, tool, "
            "got 'robot'",
        ),
        (
            [{"role": "user", "content": 3}],
            "messages[0].content: must be a string of at most 1048576 characters, got 3",
        ),
        (
            [{"role": "user", "content": "hi"}, 5],
            "messages[1]: must be a ChatMessage or a {'role', 'content'} dict, got 5",
        ),
        (
            [{"role": "user", "content": "hi", "name": "x"}],
            "messages[0]: allowed keys are role and content, got ['name']",
        ),
        ([{"role": "user", "content": ""}] * 257, "messages: at most 256 messages, got 257"),
    ],
)
def test_prompt_is_text_or_token_ids_or_a_chat(prompt, message):
    with pytest.raises(InvalidRequest) as info:
        edgecloud.GenerateOptions.default.request(prompt)
    assert str(info.value) == message


def test_a_chat_prompt_is_sent_as_messages():
    messages = [edgecloud.ChatMessage("system", "Be brief."), {"role": "user", "content": "Hi"}]
    req = edgecloud.GenerateOptions.default.request(messages)
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]
    assert req.prompt == "" and not req.prompt_tokens


def test_draft_options_are_checked_on_construction():
    with pytest.raises(InvalidRequest, match=r"^draft\.width: must be in \[0, 16\], got 20$"):
        edgecloud.DraftOptions(tree="beam", width=20)
