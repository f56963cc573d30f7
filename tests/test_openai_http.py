"""The OpenAI-compatible HTTP API, driven by the real `openai` client over uvicorn on
loopback. Behind it: a real edge runtime and verifier (tiny models, a tiny BPE
tokenizer), also served over gRPC so that both paths can be compared token for token;
and, for rollbacks (which only an outage makes), a scripted chunk stream."""

from __future__ import annotations

import asyncio
import json

import grpc
import openai
import pytest

import edgecloud
from edge_node.http import start_edge_http
from edge_node.server import start_edge_server
from lm.chat import plain_chat_prompt, render_chat_template
from lm.tokenizer import Tokenizer
from lm.training.bpe import save_tokenizer, train_bpe
from protocol.channel import bearer_metadata
from protocol.errors import Unavailable
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import generation_pb2_grpc
from serving.auth import AuthConfig
from serving.http.app import create_app
from serving.http.schema import HttpConfig
from serving.http.server import start_http_server
from serving.server import ServerConfig
from tests.edge_node.conftest import draft, make_runtime, verifier  # noqa: F401 (fixtures)
from tests.tiny import MODEL_NAME, tiny_model

CLIENT_TOKEN = "client-token-openai-5"
PROMPT = [1, 5, 9, 22]
CODE_LINES = [
    "def read_lines(path):\n    with open(path) as f:\n        return f.readlines()\n",
    "def add(a, b):\n    return a + b\n",
    "for item in items:\n    print(item)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_bpe(CODE_LINES, vocab_size=300))


@pytest.fixture(scope="module")
def target(tokenizer):
    """Overrides the edge conftest's target: a vocabulary the tokenizer covers."""
    return tiny_model(seed=21, vocab=tokenizer.vocab_size, sharpen=3.0)


@pytest.fixture
async def servers(draft, verifier, tokenizer):  # noqa: F811
    """The same edge runtime behind gRPC (for the SDK) and HTTP (for openai)."""
    runtime = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    runtime.tokenizer = tokenizer
    server = ServerConfig(port=0, auth=AuthConfig(token=CLIENT_TOKEN))
    edge = await start_edge_server(runtime, server)
    http = await start_edge_http(runtime, server, 0)
    assert http.url == f"http://127.0.0.1:{http.port}"
    yield edge, http
    await http.stop()
    await edge.drain()


def openai_client(http, api_key: str = CLIENT_TOKEN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{http.url}/v1", api_key=api_key, max_retries=0)


def sdk_client(edge) -> edgecloud.AsyncClient:
    return edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", token=CLIENT_TOKEN)


async def collect(stream) -> tuple[str, list[int], list]:
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
    return text, tokens, chunks


async def test_completions_equal_the_grpc_path_and_cloud_only(servers):
    edge, http = servers
    async with openai_client(http) as client:
        whole = await client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0
        )
        stream = await client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, tokens, chunks = await collect(stream)
        cloud = await client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            extra_body={"mode": "cloud_only"},
        )
    async with sdk_client(edge) as sdk:
        grpc_result = await sdk.generate(PROMPT, max_tokens=24)

    choice = whole.choices[0]
    assert choice.token_ids == tokens == cloud.choices[0].token_ids == list(grpc_result.tokens)
    assert len(tokens) == 24 and choice.finish_reason == "length"
    assert choice.text == text == grpc_result.text and text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (4, 24)
    assert whole.usage.total_tokens == 28
    stats, cloud_stats = whole.edgecloud, cloud.edgecloud
    assert stats["rounds"] < cloud_stats["rounds"] == 24
    assert stats["tau"] == stats["tokens_per_round"] > 1.5
    assert stats["cloud_forward_passes"] == stats["rounds"] and not stats["degraded"]
    assert stats["failovers"] == 0 and stats["generated_tokens"] == 24
    # Streaming: the chunk with finish_reason carries the stats, then a usage-only chunk.
    *_, last, usage = chunks
    assert last.choices[0].finish_reason == "length" and last.edgecloud["rounds"] >= 1
    assert usage.choices == [] and usage.usage.completion_tokens == 24
    assert {c.object for c in chunks} == {"text_completion"} and whole.model == MODEL_NAME


async def test_text_prompt_and_chat(servers):
    edge, http = servers
    messages = [
        {"role": "system", "content": "Write Python."},
        {"role": "user", "content": [{"type": "text", "text": "def add(a, b):"}]},
    ]
    # The tokenizer has no chat template: the edge writes "Role: content" turns.
    prompt = plain_chat_prompt(
        [
            {"role": "system", "content": "Write Python."},
            {"role": "user", "content": "def add(a, b):"},
        ]
    )
    assert prompt == "System: Write Python.\n\nUser: def add(a, b):\n\nAssistant:"
    async with openai_client(http) as client:
        completion = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0
        )
        chat = await client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0
        )
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0, stream=True
        )
        chunks = [chunk async for chunk in stream]
    async with sdk_client(edge) as sdk:
        grpc_result = await sdk.generate(prompt, max_tokens=12)
        sdk_chat = await sdk.generate(
            [
                edgecloud.ChatMessage("system", "Write Python."),
                messages[1] | {"content": "def add(a, b):"},
            ],
            max_tokens=12,
        )

    assert sdk_chat.tokens == grpc_result.tokens
    assert completion.choices[0].text == grpc_result.text
    assert chat.choices[0].message.content == grpc_result.text
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    assert chat.choices[0].token_ids == list(grpc_result.tokens)
    assert chat.usage.prompt_tokens == grpc_result.stats.prompt_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == grpc_result.text
    assert chunks[-1].choices[0].finish_reason == "length" and "tau" in chunks[-1].edgecloud


CHATML = (
    "{% for message in messages %}{{ '<|bos|>' + message['role'] + '\\n' + message['content']"
    " + '<|eos|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bos|>assistant\\n' }}{% endif %}"
)


async def test_chat_is_rendered_with_the_models_template(servers, tmp_path):
    """A tokenizer_config.json with a chat_template next to the tokenizer: the edge
    receives the template's encoding, through the SDK and /v1/chat/completions alike."""
    edge, http = servers
    save_tokenizer(train_bpe(CODE_LINES, vocab_size=300), tmp_path, max_length=512)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML}))
    templated = Tokenizer.from_dir(tmp_path)
    runtime = edge.runtime
    runtime.tokenizer = templated
    received = []
    resolve = runtime.resolve

    def spy(request, *args, **kwargs):
        resolved = resolve(request, *args, **kwargs)
        received.append(resolved.prompt_tokens)
        return resolved

    runtime.resolve = spy
    messages = [
        {"role": "system", "content": "Write Python."},
        {"role": "user", "content": "def add(a, b):"},
    ]
    text = render_chat_template(CHATML, messages, add_generation_prompt=True)
    assert text.endswith("<|bos|>assistant\n")
    expected = tuple(templated.encode(text, add_special_tokens=False))
    async with sdk_client(edge) as sdk:
        sdk_chat = await sdk.generate(messages, max_tokens=12)
        by_tokens = await sdk.generate(list(expected), max_tokens=12)
    async with openai_client(http) as client:
        chat = await client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0
        )
    assert received == [expected] * 3
    assert sdk_chat.tokens == by_tokens.tokens == tuple(chat.choices[0].token_ids)
    assert chat.usage.prompt_tokens == sdk_chat.stats.prompt_tokens == len(expected)


async def test_bad_chat_role_is_invalid_argument_naming_it(servers):
    edge, http = servers
    messages = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    async with openai_client(http) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL_NAME, messages=messages)
    assert caught.value.body["param"] == "messages[1].role"
    request = gpb.GenerateRequest(
        messages=[gpb.ChatMessage(role="user", content="hi"), gpb.ChatMessage(role="robot")],
        max_tokens=4,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}")
    stub = generation_pb2_grpc.GenerationStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as via_grpc:
        async for _ in stub.Generate(request, metadata=bearer_metadata(CLIENT_TOKEN)):
            pass
    await channel.close()
    assert via_grpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert via_grpc.value.details().startswith("messages[1].role: must be one of")


async def test_models_are_listed(servers):
    _, http = servers
    async with openai_client(http) as client:
        listed = [m async for m in client.models.list()]
        one = await client.models.retrieve(MODEL_NAME)
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("other-model")
    assert [m.id for m in listed] == [MODEL_NAME] and one.id == MODEL_NAME
    assert one.edgecloud == {"roles": ["edge", "cloud"], "vocab_size": 300, "max_context": 512}


async def test_wrong_or_missing_key_is_an_authentication_error(servers):
    _, http = servers
    async with openai_client(http, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError, match="wrong bearer token"):
            await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
        with pytest.raises(openai.AuthenticationError, match="missing bearer token"):
            await client.models.list(extra_headers={"Authorization": openai.omit})


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_p", 2.0),
        ("temperature", -1.0),
        ("top_k", 10_000),  # beyond this model's vocabulary: the edge's own check
        ("max_tokens", 0),
        ("max_tokens", 10_000),  # beyond this model's 512-token context: the edge's check
        ("temperature", 100.5),
        ("seed", -1),
        ("mode", "fast"),
        ("stop", ["x"] * 9),
        ("prompt", [300]),  # a token id beyond the vocabulary: the edge's own check
        ("priority", 500),
        ("tpot_slo_ms", -5.0),
    ],
)
async def test_bad_parameter_is_a_bad_request_with_the_grpc_message(servers, field, value):
    edge, http = servers
    prompt = value if field == "prompt" else PROMPT
    options = {"max_tokens": 3, "temperature": 0} | ({} if field == "prompt" else {field: value})
    async with openai_client(http) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL_NAME, prompt=prompt, extra_body=options)
    async with sdk_client(edge) as sdk:
        with pytest.raises(edgecloud.InvalidRequest) as via_grpc:
            await sdk.generate(prompt, **options)
    error = caught.value.body
    assert error["message"] == via_grpc.value.message
    assert error["param"] == ("prompt_tokens[0]" if field == "prompt" else field)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_argument"


async def test_unsupported_openai_options_and_bad_bodies(servers):
    _, http = servers
    async with openai_client(http) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=2)
        assert caught.value.body["param"] == "n"
        assert caught.value.body["message"] == "n: this server supports only null or 1, got 2"
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role"):
            await client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "function", "content": "x"}]
            )
        with pytest.raises(openai.BadRequestError, match="draft: allowed fields"):
            await client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, extra_body={"draft": {"breadth": 2}}
            )
        # logprobs: the verifier does not send the target's probabilities back (README).
        with pytest.raises(openai.BadRequestError) as completion_logprobs:
            await client.completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=2)
        with pytest.raises(openai.BadRequestError) as chat_logprobs:
            await client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], logprobs=True
            )
    assert (
        completion_logprobs.value.body["param"] == chat_logprobs.value.body["param"] == "logprobs"
    )


async def test_unknown_fields_are_refused_and_common_client_fields_ignored(servers):
    """A field this server does not know is a 400 naming it (it would otherwise be
    dropped without a word); the fields OpenAI clients and load generators commonly
    send, and edgecloud's own, are accepted."""
    _, http = servers
    messages = [{"role": "user", "content": "def add(a, b):"}]
    async with openai_client(http) as client:
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, extra_body={"top_n": 3, "frequency": 0}
            )
        with pytest.raises(openai.BadRequestError) as other_endpoints:
            await client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, extra_body={"messages": messages}
            )
        chat = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=4,
            temperature=0,
            user="user-1",
            metadata={"run": "7"},
            store=False,
            service_tier="auto",
            parallel_tool_calls=False,
            extra_body={"ignore_eos": True, "mode": "lossless", "top_k": 0, "seed": 1}
            | {"draft": {}, "adaptive_threshold": 0.5, "priority": 1, "tpot_slo_ms": 50.0}
            | {"timeout": 30},
        )
        completion = await client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=4,
            temperature=0,
            user="user-1",
            extra_body={"metadata": {"run": "7"}, "store": False, "ignore_eos": True},
        )
    assert unknown.value.body["param"] == "frequency"
    assert unknown.value.body["message"] == (
        "frequency: not a field of /v1/completions here (unknown: frequency, top_n)"
    )
    assert other_endpoints.value.body["param"] == "messages"
    assert len(chat.choices[0].token_ids) == len(completion.choices[0].token_ids) == 4


async def test_temperature_beyond_openais_2_is_accepted_and_max_tokens_reads_alike(servers):
    """temperature is the gRPC API's [0, 100] (README: a superset of OpenAI's [0, 2]).
    max_tokens' range reads the same whether the front end (any model) or the edge
    (its 512-token context) refuses it."""
    _, http = servers
    async with openai_client(http) as client:
        hot = await client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=2.5, seed=3
        )
        refusals = []
        for max_tokens in (0, 10_000):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.completions.create(
                    model=MODEL_NAME, prompt=PROMPT, max_tokens=max_tokens, temperature=0
                )
            refusals.append(caught.value.body["message"])
    assert len(hot.choices[0].token_ids) == 4
    assert refusals == [
        "max_tokens: must be in [1, max_context] (the model's context; at most 1048576), got 0",
        "max_tokens: must be in [1, max_context] (the model's context; 512 here), got 10000",
    ]


async def test_usage_counts_only_the_tokens_whose_text_is_returned(servers):
    """A stop string cuts the text before it; the tokens from the one it starts in on
    are not returned, and usage (and gRPC's generated_tokens) do not count them. A stop
    at the first character returns nothing and counts nothing."""
    edge, http = servers
    prompt = "def add(a, b):"
    request = dict(model=MODEL_NAME, prompt=prompt, max_tokens=40, temperature=0)
    async with openai_client(http) as client:
        full = await client.completions.create(**request)
        text, tokens = full.choices[0].text, full.choices[0].token_ids
        assert "\n" in text[1:]  # this model's greedy text has a line break to stop at
        first = await client.completions.create(**request, stop=[text[0]])
        line = await client.completions.create(**request, stop=["\n"])
        stream = await client.completions.create(
            **request, stop=["\n"], stream=True, stream_options={"include_usage": True}
        )
        streamed_text, streamed_tokens, chunks = await collect(stream)
    async with sdk_client(edge) as sdk:
        via_grpc = await sdk.generate(prompt, max_tokens=40, stop="\n")

    assert (first.choices[0].text, first.choices[0].token_ids) == ("", [])
    assert first.usage.completion_tokens == 0
    choice = line.choices[0]
    assert choice.text == text[: text.index("\n")] and choice.finish_reason == "stop"
    assert choice.token_ids == tokens[: len(choice.token_ids)]
    assert edge.runtime.tokenizer.decode(choice.token_ids) == choice.text
    assert line.usage.completion_tokens == len(choice.token_ids) < len(tokens)
    assert (streamed_text, streamed_tokens) == (choice.text, choice.token_ids)
    assert chunks[-1].usage.completion_tokens == len(choice.token_ids)
    assert list(via_grpc.tokens) == choice.token_ids
    assert via_grpc.stats.generated_tokens == len(choice.token_ids)


async def test_deadline_is_a_504(servers):
    _, http = servers
    async with openai_client(http) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, max_tokens=200, extra_body={"timeout": 0.001}
            )
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "deadline_exceeded"


def scripted(chunks: list[gpb.GenerateChunk], fail_after: int | None = None):
    """A stream callable replaying `chunks` (adaptive-mode rollbacks need an outage to
    happen for real); with `fail_after`, raises UNAVAILABLE after that many."""

    async def stream(request: gpb.GenerateRequest, timeout_s: float | None):
        for i, chunk in enumerate(chunks):
            if i == fail_after:
                raise Unavailable("edges edge-0 failed mid-stream")
            await asyncio.sleep(0)
            yield chunk

    async def models() -> list[gpb.ModelInfo]:
        return [gpb.ModelInfo(name=MODEL_NAME)]

    return stream, models


ROLLBACK_CHUNKS = [
    gpb.GenerateChunk(text="Hi", tokens=[1], verified=True),
    gpb.GenerateChunk(text=" wrld", tokens=[2], verified=False),
    gpb.GenerateChunk(
        text=" world",
        tokens=[3],
        verified=True,
        rollback=gpb.Rollback(keep_tokens=1, keep_chars=2),
    ),
    gpb.GenerateChunk(
        verified=True,
        finish_reason=gpb.FINISH_REASON_STOP,
        stats=gpb.GenerationStats(rounds=1, generated_tokens=2, prompt_tokens=4, rollbacks=1),
    ),
]


async def scripted_server(chunks, fail_after=None):
    stream, models = scripted(chunks, fail_after)
    app = create_app(stream, models, HttpConfig(auth=AuthConfig(insecure_no_auth=True)))
    return await start_http_server(app, "127.0.0.1", 0)


async def test_adaptive_stream_sends_only_text_that_stays():
    """The worked example of `_Output`: " wrld" is held back and never sent."""
    http = await scripted_server(ROLLBACK_CHUNKS)
    try:
        async with openai_client(http, api_key="unused") as client:
            request = dict(model=MODEL_NAME, prompt=PROMPT, extra_body={"mode": "adaptive"})
            stream = await client.completions.create(**request, stream=True)
            text, tokens, chunks = await collect(stream)
            whole = await client.completions.create(**request)
    finally:
        await http.stop()
    assert [c.choices[0].text for c in chunks] == ["Hi", " world", ""]
    assert (text, tokens) == ("Hi world", [1, 3])
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].edgecloud["rollbacks"] == 1
    assert (whole.choices[0].text, whole.choices[0].token_ids) == ("Hi world", [1, 3])


async def test_error_after_the_first_chunk_ends_the_stream_with_an_error_event():
    http = await scripted_server(ROLLBACK_CHUNKS, fail_after=1)
    try:
        async with openai_client(http, api_key="unused") as client:
            stream = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, stream=True)
            texts = []
            with pytest.raises(openai.APIError, match="failed mid-stream"):
                async for chunk in stream:
                    texts.append(chunk.choices[0].text)
    finally:
        await http.stop()
    assert texts == ["Hi"]


async def test_seeds_through_sdk_and_http(servers):
    """temperature 0 with a seed finishes (it used to retry until the deadline) and is
    plain greedy; a seeded sampled request, with default options, gives the same text
    every time and equals seeded cloud_only, over both front ends."""
    edge, http = servers
    async with sdk_client(edge) as sdk:
        greedy = await sdk.generate(PROMPT, max_tokens=16, timeout=20)
        seeded_greedy = await sdk.generate(PROMPT, max_tokens=16, temperature=0, seed=1, timeout=20)
        sampled = [
            await sdk.generate(PROMPT, max_tokens=24, temperature=1.0, seed=5, timeout=20)
            for _ in range(3)
        ]
        cloud = await sdk.generate(
            PROMPT, max_tokens=24, temperature=1.0, seed=5, mode="cloud_only", timeout=20
        )
    assert list(seeded_greedy.tokens) == list(greedy.tokens)
    assert {tuple(s.tokens) for s in sampled} == {tuple(cloud.tokens)}
    async with openai_client(http) as client:
        over_http = [
            await client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=t, seed=s, timeout=20
            )
            for t, s in ((0, 1), (1.0, 5), (1.0, 5))
        ]
    assert (
        over_http[0].choices[0].token_ids
        == list(greedy.tokens) + over_http[0].choices[0].token_ids[16:]
    )
    assert over_http[1].choices[0].token_ids == over_http[2].choices[0].token_ids
    assert over_http[1].choices[0].token_ids == list(cloud.tokens)


async def test_unknown_model_is_a_404_model_not_found_not_retried(servers):
    """OpenAI's answer (and the gateway's) to a model not served here: 404 with code
    model_not_found and param `model`, which the openai client does not retry, even
    with retries on; over gRPC the same check says NOT_FOUND."""
    edge, http = servers
    sent: list[str] = []

    async def record(request) -> None:
        sent.append(request.url.path)

    async with openai.AsyncOpenAI(
        base_url=f"{http.url}/v1",
        api_key=CLIENT_TOKEN,
        max_retries=3,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]}),
    ) as client:
        with pytest.raises(openai.NotFoundError) as generated:
            await client.completions.create(model="other-model", prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.NotFoundError) as retrieved:
            await client.models.retrieve("other-model")
    async with sdk_client(edge) as sdk:
        with pytest.raises(edgecloud.EdgecloudError) as via_grpc:
            await sdk.generate(PROMPT, max_tokens=2, model="other-model")

    assert sent == ["/v1/completions", "/v1/models/other-model"]
    for error in (generated.value, retrieved.value):
        assert error.status_code == 404
        assert error.body["code"] == "model_not_found" and error.body["param"] == "model"
        assert error.body["type"] == "invalid_request_error"
    assert "this edge serves 'tiny-target', got 'other-model'" in generated.value.body["message"]
    assert via_grpc.value.code is grpc.StatusCode.NOT_FOUND
