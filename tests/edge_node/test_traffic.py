"""Lossless under real traffic, edge and verifier together over real gRPC: greedy with a
seed, the verifier's context limit, seeded sampling with default options across round
trips and failovers, half precision, and many sessions with cancellations, stalls,
round timeouts and a short session TTL."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import pytest
import torch

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.cloud_link import CloudLink, CloudLinkConfig
from edge_node.picker import FixedListPicker, VerifierEndpoint
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.types import DraftConfig, GenerationRequest
from lm.sampling import SamplingParams
from protocol import validation
from protocol.types import GenerateOptions, Mode, Request
from protocol.v1 import generation_pb2 as gpb
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import make_runtime, noisy_copy
from tests.tiny import MODEL_NAME, TOKEN, tiny_model

PROMPT = (1, 5, 9, 22)


def request(mode=Mode.LOSSLESS, max_tokens=30, prompt=PROMPT, **sampling) -> GenerationRequest:
    return GenerationRequest(
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        sampling=SamplingParams(**sampling),
        mode=mode,
        draft=DraftConfig(),  # the defaults users get: adaptive shape, pipelining
    )


async def generate(runtime, req: GenerationRequest):
    chunks = [c async for c in runtime.generate(req)]
    return [t for c in chunks for t in c.tokens], chunks[-1]


async def serve(model, **overrides):
    config = VerifierConfig(model_name=MODEL_NAME, **{"max_context": 256, **overrides})
    return await start_verifier(model, config, ServerConfig(port=0, auth=AuthConfig(token=TOKEN)))


async def test_greedy_with_a_seed_finishes_and_equals_greedy(runtime):
    plain, _ = await generate(runtime, request())
    seeded, last = await generate(runtime, request(temperature=0.0, seed=1))
    assert seeded == plain
    assert last.finish_reason == "length" and last.stats.failovers == 0


@pytest.mark.parametrize("mode", [Mode.LOSSLESS, Mode.CLOUD_ONLY])
async def test_verifier_context_ends_the_generation_with_length(mode, target, draft, runtime):
    reference, _ = await generate(runtime, request(Mode.CLOUD_ONLY, max_tokens=60))
    limit = 40
    server = await serve(target, max_context=limit)
    small = make_runtime(draft, [f"127.0.0.1:{server.port}"])
    try:
        before = server.engine.forward_passes
        tokens, last = await generate(small, request(mode, max_tokens=60))
    finally:
        await small.close()
        await server.drain()
    assert last.finish_reason == "length"
    assert tokens == reference[: limit - len(PROMPT)]
    assert last.stats.failovers == 0
    # One prefill pass, then one pass per round: nothing was prefilled again.
    assert server.engine.forward_passes - before == 1 + last.stats.rounds


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.7, 1.0])
async def test_seeded_sampling_reproduces_with_default_options(temperature, target, draft):
    """Same seed, same text: whatever the round trip (which moves the adaptive shape
    policy), and equal to seeded cloud_only."""
    server = await serve(target)
    address = f"127.0.0.1:{server.port}"
    runtimes = [make_runtime(draft, [address]), make_runtime(draft, [address], simulated_rtt_ms=30)]
    try:
        for seed in (1, 2, 3):
            req = request(max_tokens=40, temperature=temperature, seed=seed)
            cloud, _ = await generate(
                runtimes[0], request(Mode.CLOUD_ONLY, 40, **vars(req.sampling))
            )
            fast, fast_last = await generate(runtimes[0], req)
            slow, slow_last = await generate(runtimes[1], req)
            assert fast == slow == cloud, seed
            assert fast_last.stats.rounds < 40  # drafts were accepted: not one token a round
    finally:
        for rt in runtimes:
            await rt.close()
        await server.drain()


async def failover_runs(target, draft, req, kill_after: int, **second_options):
    """`req` three times on a round-robin pair of verifiers: on the first, on the second
    (started with `second_options`), then on the first again, which is stopped abruptly
    (its open stream cancelled) after `kill_after` chunks. Returns the three token lists
    and the last run's final stats."""
    first, second = await serve(target), await serve(target, **second_options)
    runtime = make_runtime(draft, [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"])
    try:
        on_first, _ = await generate(runtime, req)
        on_second, _ = await generate(runtime, req)
        chunks, tokens = [], []
        async for chunk in runtime.generate(req):
            chunks.append(chunk)
            tokens += chunk.tokens
            if len(chunks) == kill_after:
                await first.server.server.stop(0)
    finally:
        await runtime.close()
        await second.drain()
    return on_first, on_second, tokens, chunks[-1].stats


async def test_seeded_sampling_reproduces_across_a_failover(target, draft):
    req = request(max_tokens=40, temperature=1.0, seed=11)
    reference, _, failed_over, stats = await failover_runs(target, draft, req, kill_after=2)
    assert stats.failovers == 1
    assert failed_over == reference


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
async def test_half_precision_greedy_lossless_equals_cloud_only(dtype):
    """The README's promise per dtype: in bfloat16 and float16 on CPU (the verifier's
    batch-invariant attention, on by default there) greedy lossless is cloud_only token
    for token. Without it, 17 of 30 such prompts diverged in bfloat16 (40 tokens each)."""
    target = tiny_model(seed=21, vocab=512, dim=128, layers=4)
    draft = noisy_copy(target, 0.01, seed=5).to(dtype)
    server = await serve(target.to(dtype))
    runtime = make_runtime(draft, [f"127.0.0.1:{server.port}"])
    rng = random.Random(0)
    try:
        for _ in range(20):
            prompt = tuple(rng.randrange(512) for _ in range(rng.randrange(1, 20)))
            cloud, _ = await generate(runtime, request(Mode.CLOUD_ONLY, 32, prompt))
            lossless, last = await generate(runtime, request(Mode.LOSSLESS, 32, prompt))
            assert lossless == cloud, prompt
            assert last.stats.rounds < 32
    finally:
        await runtime.close()
        await server.drain()


class Stalls:
    """Holds one forward pass in `every` for `seconds` (a verifier that stalls: the edge's
    round timeout fires and cancels the stream while its round is in the pass)."""

    def __init__(self, model, every: int, seconds: float) -> None:
        self.count = 0
        self.every, self.seconds = every, seconds
        self.handle = model.layers[0].register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1
        if self.count % self.every == 0:
            time.sleep(self.seconds)


@pytest.mark.slow
async def test_many_sessions_with_cancels_timeouts_and_a_short_ttl(target, draft):
    """24 concurrent sessions, greedy and seeded sampling mixed in every batch; a third
    of the clients cancel mid-generation, one pass in 7 stalls past the edge's round
    timeout, and idle sessions expire after 0.5 s. Every session that was not cancelled
    finishes with exactly its cloud_only output; none fails because of another."""
    server = await serve(target, max_sessions=32, session_ttl_s=0.5, max_batch=8)
    address = f"127.0.0.1:{server.port}"
    picker = FixedListPicker([VerifierEndpoint(address, MODEL_NAME)])
    link = CloudLink(picker, CloudLinkConfig(token=TOKEN, round_timeout_s=0.25))
    runtime = EdgeRuntime(draft, EdgeConfig(model_name=MODEL_NAME, max_concurrency=32), link=link)
    rng = random.Random(3)
    requests = []
    for i in range(24):
        prompt = tuple(rng.randrange(64) for _ in range(rng.randrange(2, 12)))
        sampling = {} if i % 2 else {"temperature": rng.choice([0.7, 1.0]), "seed": i}
        requests.append(request(Mode.LOSSLESS, 24, prompt, **sampling))
    try:
        references = [
            (
                await generate(
                    runtime, request(Mode.CLOUD_ONLY, 24, r.prompt_tokens, **vars(r.sampling))
                )
            )[0]
            for r in requests
        ]
        stalls = Stalls(target, every=7, seconds=0.4)
        tasks = [asyncio.ensure_future(generate(runtime, r)) for r in requests]
        cancelled = set(rng.sample(range(24), 8))
        for i in sorted(cancelled):
            await asyncio.sleep(rng.uniform(0.0, 0.15))
            tasks[i].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stalls.handle.remove()
    finally:
        await runtime.close()
        await server.drain()
    failovers = 0
    for i, result in enumerate(results):
        if i in cancelled and isinstance(result, asyncio.CancelledError):
            continue
        assert not isinstance(result, BaseException), (i, result)
        tokens, last = result
        assert tokens == references[i], i
        failovers += last.stats.failovers
    assert failovers > 0, "no round timed out: the stalls did not bite"
    assert stalls.count > 0


async def test_cloud_only_is_not_clipped_to_the_edge_models_context(target, verifier):
    """cloud_only never runs the SLM, so an edge model with a short context no longer
    cuts its max_tokens; lossless, which drafts with it, still ends at its room."""
    short_draft = tiny_model(seed=21, vocab=64, sharpen=3.0, max_seq_len=160)
    runtime = make_runtime(short_draft, [f"127.0.0.1:{verifier.port}"])

    def parsed(mode):  # through the servers' own parsing, where the budget is set
        message = gpb.GenerateRequest(prompt_tokens=PROMPT, max_tokens=60, mode=mode)
        return runtime.resolve(Request.from_proto(message), timeout_s=None)

    try:
        cloud, cloud_last = await generate(runtime, parsed(gpb.MODE_CLOUD_ONLY))
        lossless, lossless_last = await generate(runtime, parsed(gpb.MODE_LOSSLESS))
    finally:
        await runtime.close()
    assert len(cloud) == 60 and cloud_last.finish_reason == "length"
    # 160 positions - 1 - 2 x 65 reserved for drafts - 4 prompt tokens = 25.
    assert lossless == cloud[:25] and lossless_last.finish_reason == "length"


async def test_temperature_is_checked_once_on_its_way_to_the_sampler(draft, monkeypatch):
    """SDK options -> wire -> the server's `Request` -> the edge's `GenerationRequest`:
    the sampling rules run where the SDK builds its options and where the server
    receives the proto, and not again in the runtime or the sampling code."""
    checked = []
    rule = validation.check_sampling

    def counted(temperature, *args, **kwargs):
        checked.append(temperature)
        return rule(temperature, *args, **kwargs)

    monkeypatch.setattr(validation, "check_sampling", counted)
    options = GenerateOptions(temperature=0.7, seed=5, max_tokens=8)
    assert checked == [0.7], "the SDK checks its options once"
    request = Request.from_proto(options.request(list(PROMPT)))
    assert checked == [0.7, 0.7], "the server checks the received proto once"
    runtime = make_runtime(draft, ["127.0.0.1:1"])
    try:
        resolved = runtime.resolve(request, timeout_s=None)
        tokens, _ = await generate(runtime, replace(resolved, mode=Mode.EDGE_ONLY))
    finally:
        await runtime.close()
    assert resolved.sampling == SamplingParams(temperature=0.7, seed=5)
    assert len(tokens) == 8
    assert checked == [0.7, 0.7], "nothing after the server's entry checks it again"


async def test_a_failover_to_a_smaller_verifier_recuts_the_round(target, draft):
    """The round in flight when its verifier dies is resent cut to the next verifier's
    limits (here 4 tree nodes against the default 4x6 beams); it used to be resent whole
    and refused as INVALID_ARGUMENT, which reached the client as INTERNAL."""
    reference, on_small, failed_over, stats = await failover_runs(
        target, draft, request(max_tokens=40), kill_after=2, max_tree_nodes=4
    )
    assert on_small == reference
    assert stats.failovers == 1
    assert failed_over == reference


async def test_adaptive_gate_reads_the_distribution_the_token_was_drawn_from(runtime):
    """With top_k 1 the edge's sampled token is certain under the distribution it was
    drawn from, so adaptive keeps every one unverified; the raw softmax (what the gate
    read before) is below the 0.9 threshold for some of them and sent them to the cloud."""
    req = replace(
        request(Mode.ADAPTIVE, 30, temperature=1.0, top_k=1, seed=3),
        draft=DraftConfig("chain", 1, 3, adapt=False),
    )
    chunks = [c async for c in runtime.generate(req)]
    assert chunks[-1].stats.rounds == 0
    assert sum(len(c.tokens) for c in chunks) == 30 and not any(c.verified for c in chunks[:-1])


async def test_cloud_only_streams_from_the_verifier_and_fails_over(target, draft):
    """cloud_only is server-side decoding: one request, then the verifier's stream. A
    verifier that dies mid-stream is replaced and asked for the rest: same text."""
    req = request(Mode.CLOUD_ONLY, max_tokens=40, temperature=1.0, seed=4)
    reference, again, failed_over, stats = await failover_runs(target, draft, req, kill_after=5)
    assert again == reference and failed_over == reference
    assert stats.failovers == 1 and stats.cloud_forward_passes == 40
    # Two opens and two requests: the old one round per token sent over 300 bytes here.
    assert stats.bytes_to_cloud < 300


async def test_generations_share_the_edges_view_of_its_verifier(verifier, draft):
    """What one generation's replies say of the verifier (its ms per node, its fitted
    pass cost) is the edge's, so the next generation starts from it (`VerifierView`)."""
    runtime = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    try:
        assert runtime.verifier.ms_per_node == 0.0
        await generate(runtime, request(Mode.LOSSLESS, max_tokens=24))
        heard = runtime.verifier.ms_per_node
        assert heard > 0.0
        await generate(runtime, request(Mode.LOSSLESS, max_tokens=24))
    finally:
        await runtime.close()
    assert runtime.verifier.ms_per_node != heard  # the second one updated the same view


@pytest.mark.parametrize("mode", [Mode.LOSSLESS, Mode.CLOUD_ONLY])
async def test_ignore_eos_generates_past_the_end_of_sequence_token(verifier, draft, mode):
    """vLLM's ignore_eos: the end token no longer ends the output, which runs to
    max_tokens and equals the output with no end token at all (greedy)."""
    runtime = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    try:
        full, _ = await generate(runtime, request(mode, max_tokens=24))
        saved = runtime.model.config
        runtime.model.config = replace(saved, eos_token_id=full[5])  # the 6th token ends it
        try:
            stopped, stopped_last = await generate(runtime, request(mode, max_tokens=24))
            ignoring = replace(request(mode, max_tokens=24), ignore_eos=True)
            past, past_last = await generate(runtime, ignoring)
        finally:
            runtime.model.config = saved
    finally:
        await runtime.close()
    assert stopped == full[: full.index(full[5])] and stopped_last.finish_reason == "stop"
    assert past == full and past_last.finish_reason == "length"


async def test_cloud_only_stopping_early_stops_the_verifier(target, draft, verifier):
    """An end-of-sequence token ends the generation before the tokens asked of the
    verifier: the edge cancels the stream, and the verifier stops decoding for it."""
    runtime = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    # A tiny model decodes 200 tokens faster than a cancel crosses loopback: 5 ms a pass.
    slow = Stalls(verifier.engine.model, every=1, seconds=0.005)
    try:
        full, _ = await generate(runtime, request(Mode.CLOUD_ONLY, max_tokens=200))
        before = verifier.engine.forward_passes
        # EOS: the runtime's model says which token ends a sequence; use the 6th one.
        saved = runtime.model.config
        runtime.model.config = replace(saved, eos_token_id=full[5])
        try:
            tokens, last = await generate(runtime, request(Mode.CLOUD_ONLY, max_tokens=200))
        finally:
            runtime.model.config = saved
        await asyncio.sleep(0.3)
        passes = verifier.engine.forward_passes - before
    finally:
        slow.handle.remove()
        await runtime.close()
    assert tokens == full[: full.index(full[5])] and last.finish_reason == "stop"
    assert passes < 20, passes  # not the 200 asked for
    assert verifier.engine.sessions == {}
