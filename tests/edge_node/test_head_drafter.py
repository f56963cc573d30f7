"""The recurrent draft head as the edge's drafter, against a real gRPC verifier:
greedy output equals cloud_only token for token, sampling keeps the target's
distribution, `auto` picks the better drafter, and an old verifier falls back to
the SLM."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.cloud_link import CloudLink, CloudLinkConfig
from edge_node.drafter_choice import DrafterChoice
from edge_node.generation import Generation
from edge_node.picker import FixedListPicker, VerifierEndpoint
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.types import DraftConfig, GenerationRequest
from lm.draft_head import DraftHead, DraftHeadConfig
from lm.sampling import SamplingParams, probs_from_logits
from protocol.types import Mode
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import noisy_copy
from tests.stats import chi_square_pvalue
from tests.tiny import MODEL_NAME, TOKEN, tiny_model

PROMPTS = [(1, 5, 9), (3,), (7, 7, 7, 2, 40, 11)]


def random_head(target, seed: int) -> DraftHead:
    """A head trained on nothing: its drafts are mostly rejected, which losslessness
    must not depend on."""
    torch.manual_seed(seed)
    config = DraftHeadConfig(target.config.vocab_size, target.config.dim, state_size=16)
    head = DraftHead(config).eval()
    with torch.no_grad():
        for block in head.blocks:
            block.linear.weight.normal_(0, 0.3)
    return head


def bigram_target(seed: int):
    """A target whose next token depends on the current token alone: attention and MLP
    outputs are zero, so its hidden state is norm(e(t)) and greedy decoding follows
    argmax output(e(t)) (the norm only rescales; its weights are ones)."""
    model = tiny_model(seed=seed, vocab=64, sharpen=3.0)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.down.weight.zero_()
    return model


def exact_head(target) -> DraftHead:
    """A head that drafts the bigram target's greedy chain exactly: s = [SiLU(k e(t)) ;
    SiLU(-k e(t))] and SiLU(z) - SiLU(-z) = z, so out(s) = e(t) and the logits are
    output(e(t)), whatever the hidden state."""
    dim, k = target.config.dim, 4.0
    head = DraftHead(DraftHeadConfig(target.config.vocab_size, dim, state_size=2 * dim, n_blocks=0))
    eye = torch.eye(dim)
    with torch.no_grad():
        head.embedding.weight.copy_(target.tok_embeddings.weight)
        head.w.weight.copy_(torch.cat([eye, -eye]) * k)
        head.u.weight.zero_()
        head.u.bias.zero_()
        head.out.weight.copy_(torch.cat([torch.zeros(dim, dim), eye / k, -eye / k], dim=1))
        head.lm_head.weight.copy_(target.output.weight)
    return head.eval()


async def serve(target, max_context: int = 256):
    return await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=max_context, max_sessions=16),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN)),
    )


def edge(slm, head, port: int) -> EdgeRuntime:
    picker = FixedListPicker([VerifierEndpoint(f"127.0.0.1:{port}", MODEL_NAME)])
    link = CloudLink(picker, CloudLinkConfig(token=TOKEN))
    return EdgeRuntime(slm, EdgeConfig(model_name=MODEL_NAME), link=link, head=head)


async def run(runtime, prompt, mode, draft=DraftConfig(), max_tokens=30, sampling=None):
    request = GenerationRequest(
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        sampling=sampling or SamplingParams(),
        mode=mode,
        draft=draft,
    )
    chunks = [c async for c in runtime.generate(request)]
    return [t for c in chunks for t in c.tokens], chunks[-1].stats


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=21, vocab=64, sharpen=3.0)


@pytest.mark.parametrize(
    "options",
    [
        DraftConfig("beam", 4, 5, drafter="head"),
        DraftConfig("beam", 2, 8, adapt=False, drafter="head", hidden_encoding="int8"),
        DraftConfig("beam", 3, 4, drafter="auto"),
    ],
    ids=["head", "head-int8-fixed", "auto"],
)
async def test_random_head_greedy_equals_cloud_only(target, options):
    verifier = await serve(target)
    runtime = edge(noisy_copy(target, 0.01, seed=5), random_head(target, 1), verifier.port)
    try:
        for prompt in PROMPTS:
            expected, _ = await run(runtime, prompt, Mode.CLOUD_ONLY)
            got, stats = await run(runtime, prompt, Mode.LOSSLESS, options)
            assert got == expected, prompt
            assert stats.generated_tokens == 30
            # Every round after the first has the last reply's hidden state to draft from.
            first_from_slm = len(prompt) == 1
            if options.drafter == "head":
                assert stats.head_rounds == stats.rounds - first_from_slm
            else:
                assert 0 < stats.head_rounds < stats.rounds
    finally:
        await runtime.close()
        await verifier.drain()


async def test_exact_head_accepts_whole_drafts_and_stays_lossless():
    """Long accepted paths exercise the hidden state at deep nodes. The SLM is never run
    while the head drafts, yet its history stays whole: when next needed, it forwards
    the pending tokens and predicts exactly as a fresh forward over the history."""
    target = bigram_target(seed=4)
    verifier = await serve(target)
    slm = noisy_copy(target, 0.01, seed=5)
    slm_calls = []
    slm.register_forward_hook(lambda *_: slm_calls.append(1))
    runtime = edge(slm, exact_head(target), verifier.port)
    draft = DraftConfig("beam", 2, 6, adapt=False, drafter="head")
    try:
        for prompt in PROMPTS:
            expected, _ = await run(runtime, prompt, Mode.CLOUD_ONLY)
            slm_calls.clear()
            generation = Generation(
                GenerationRequest(prompt, 30, mode=Mode.LOSSLESS, draft=draft),
                slm,
                link=runtime.link,
                model_name=MODEL_NAME,
                tokenizer=None,
                executor=runtime.executor,
                head=runtime.head,
            )
            chunks = [c async for c in generation.stream()]
            stats = chunks[-1].stats
            assert [t for c in chunks for t in c.tokens] == expected
            # Every head round's whole 6-token main path was accepted.
            assert len(stats.accepted_per_position) == 6
            assert stats.accepted_per_position[5] >= stats.head_rounds >= stats.rounds - 1
            # A one-token prompt has no hidden state before its first reply: the SLM drafts.
            assert bool(slm_calls) == (stats.head_rounds < stats.rounds)
            with torch.inference_mode():
                fresh = slm(torch.tensor([generation.lm.tokens]))[0, -1]
                assert torch.allclose(generation.lm.next_logits(), fresh, atol=1e-4)
            # The history holds the last round whole; the output stops at max_tokens.
            assert generation.lm.tokens[: len(prompt) + 30] == [*prompt, *expected]
    finally:
        await runtime.close()
        await verifier.drain()


async def test_auto_picks_the_better_drafter():
    target = bigram_target(seed=4)
    verifier = await serve(target)
    draft = DraftConfig("beam", 2, 6, adapt=False, drafter="auto")
    cases = {
        # An SLM identical to the target against a head trained on nothing.
        "slm": (copy.deepcopy(target), random_head(target, 2)),
        # A head that drafts exactly against an unrelated SLM.
        "head": (tiny_model(seed=99, vocab=64, sharpen=3.0), exact_head(target)),
    }
    try:
        for expected, (slm, head) in cases.items():
            runtime = edge(slm, head, verifier.port)
            try:
                got, stats = await run(runtime, PROMPTS[0], Mode.LOSSLESS, draft, max_tokens=120)
                reference, _ = await run(runtime, PROMPTS[0], Mode.CLOUD_ONLY, max_tokens=120)
            finally:
                await runtime.close()
            assert got == reference
            head_share = stats.head_rounds / stats.rounds
            if expected == "head":
                assert head_share > 0.75, stats
            else:
                assert head_share < 0.25, stats
    finally:
        await verifier.drain()


def test_choice_probes_both_then_keeps_the_faster_and_reprobes():
    choice = DrafterChoice("auto", probe_rounds=2, reprobe_every=4)
    picks = []
    for _ in range(12):
        kind = choice.pick()
        picks.append(kind)
        tokens, draft_ms = (5, 1.0) if kind == "head" else (6, 20.0)
        choice.observe(kind, tokens, draft_ms, round_ms=50.0)
    # head 5 / 51 > slm 6 / 70: probes, then head, with the SLM retried every 4 rounds.
    assert picks[:4] == ["head", "head", "slm", "slm"]
    assert picks[4:] == ["head"] * 4 + ["slm"] + ["head"] * 3
    assert choice.pick(unready={"head"}) == "slm"
    assert not choice.may_speculate()
    assert DrafterChoice("slm").may_speculate() and not DrafterChoice("head").may_speculate()


async def test_old_verifier_without_hidden_falls_back_to_slm(target, caplog, monkeypatch):
    """A verifier that predates the field sends no hidden state: the edge drafts with
    the SLM, says so once, and the output is unchanged."""
    import cloud_node.service

    monkeypatch.setattr(cloud_node.service, "hidden_message", lambda hidden: None)
    verifier = await serve(target)
    runtime = edge(noisy_copy(target, 0.01, seed=5), random_head(target, 1), verifier.port)
    try:
        expected, _ = await run(runtime, PROMPTS[0], Mode.CLOUD_ONLY)
        with caplog.at_level(logging.WARNING, logger="edge_node.generation"):
            got, stats = await run(runtime, PROMPTS[0], Mode.LOSSLESS, DraftConfig(drafter="head"))
    finally:
        await runtime.close()
        await verifier.drain()
    assert got == expected
    assert stats.head_rounds == 0 and stats.rounds < 30
    warnings = [r for r in caplog.records if "no hidden state" in r.getMessage()]
    assert len(warnings) == 1


def test_bad_drafter_settings_name_the_field(target):
    with pytest.raises(ValueError, match="drafter: must be one of"):
        DraftConfig(drafter="eagle")
    with pytest.raises(ValueError, match="hidden_encoding: must be one of"):
        DraftConfig(hidden_encoding="int4")
    with pytest.raises(ValueError, match="draft.drafter: 'head' needs a draft head"):
        EdgeRuntime(target, EdgeConfig(MODEL_NAME, draft=DraftConfig(drafter="head")))
    wrong_vocab = DraftHead(DraftHeadConfig(32, target.config.dim, state_size=8))
    with pytest.raises(ValueError, match="head: its vocabulary"):
        EdgeRuntime(target, EdgeConfig(MODEL_NAME), head=wrong_vocab)


async def test_request_for_head_on_an_edge_without_one_is_invalid(target):
    from protocol.errors import InvalidRequest

    verifier = await serve(target)
    runtime = edge(target, None, verifier.port)
    try:
        with pytest.raises(InvalidRequest, match="draft.drafter"):
            await run(runtime, PROMPTS[0], Mode.LOSSLESS, DraftConfig(drafter="auto"))
    finally:
        await runtime.close()
        await verifier.drain()


VOCAB = 8
PROMPT = (1, 2, 3)
TRIALS = 600


@pytest.mark.slow
async def test_sampled_first_token_follows_the_target_with_the_head():
    """The head's beam tree is verified as point masses; 600 seeded generations'
    first tokens follow the target's distribution (chi-square). This head's tree has
    three root children (tokens 3, 4 and 5, target probabilities .06, .004 and .33), so
    sibling rejection and the residual distribution are both exercised."""
    target = tiny_model(seed=31, vocab=VOCAB, sharpen=2.0)
    verifier = await serve(target, max_context=128)
    runtime = edge(noisy_copy(target, 0.3, seed=2), random_head(target, 4), verifier.port)
    draft = DraftConfig("beam", 3, 2, adapt=False, drafter="head")
    firsts, head_rounds, from_draft = [], 0, 0
    try:
        for seed in range(TRIALS):
            tokens, stats = await run(
                runtime,
                PROMPT,
                Mode.LOSSLESS,
                draft,
                max_tokens=1,
                sampling=SamplingParams(temperature=1.0, seed=seed),
            )
            firsts.append(tokens[0])
            head_rounds += stats.head_rounds
            from_draft += stats.accepted_tokens > 0
    finally:
        await runtime.close()
        await verifier.drain()
    assert head_rounds == TRIALS
    print(f"first token from the head's draft in {from_draft} of {TRIALS}")
    assert from_draft > TRIALS // 10  # the draft's tokens are tested, not just the bonus
    with torch.inference_mode():
        p = probs_from_logits(target(torch.tensor([PROMPT]))[0, -1], SamplingParams(1.0))
    counts = torch.bincount(torch.tensor(firsts), minlength=VOCAB).tolist()
    p_value = chi_square_pvalue(counts, p.tolist())
    print(f"head: p={p_value:.3g}")
    assert p_value > 1e-3


def test_edge_serve_flags_name_the_problem(target, tmp_path, capsys):
    from lm.checkpoint import save_model
    from lm.draft_head import save_head
    from orchestrator.cli import main

    save_model(target, tmp_path / "slm")
    save_head(DraftHead(DraftHeadConfig(32, target.config.dim, state_size=8)), tmp_path / "head")
    serve = ["edge", "serve", "--model", str(tmp_path / "slm"), "--insecure-no-auth"]
    assert main([*serve, "--drafter", "auto"]) == 2
    assert "--head: needed with --drafter auto" in capsys.readouterr().err
    assert main([*serve, "--drafter", "head", "--head", str(tmp_path / "slm")]) == 2
    assert "head_config.json: missing" in capsys.readouterr().err
    assert main([*serve, "--drafter", "head", "--head", str(tmp_path / "head")]) == 2
    assert "head: its vocabulary has 32 tokens, the SLM's 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*serve, "--drafter", "eagle"])
    assert "--drafter: invalid choice" in capsys.readouterr().err


async def test_head_session_fails_over_with_identical_output():
    """A verifier stopped mid-generation: the session reopens on the other one, whose
    opening reply brings the hidden state back, and the head keeps drafting."""
    target = bigram_target(seed=4)
    first, second = await serve(target), await serve(target)
    picker = FixedListPicker(
        [VerifierEndpoint(f"127.0.0.1:{v.port}", MODEL_NAME) for v in (first, second)]
    )
    runtime = EdgeRuntime(
        noisy_copy(target, 0.01, seed=5),
        EdgeConfig(model_name=MODEL_NAME),
        link=CloudLink(picker, CloudLinkConfig(token=TOKEN)),
        head=exact_head(target),
    )
    request = GenerationRequest(
        prompt_tokens=PROMPTS[2],
        max_tokens=40,
        mode=Mode.LOSSLESS,
        draft=DraftConfig("beam", 2, 3, adapt=False, drafter="head"),
    )
    try:
        expected, _ = await run(runtime, PROMPTS[2], Mode.CLOUD_ONLY, max_tokens=40)  # on first
        chunks = []
        async for chunk in runtime.generate(request):  # on second
            chunks.append(chunk)
            if len(chunks) == 2:
                await second.server.server.stop(0)  # abrupt: cancels the open stream
    finally:
        await runtime.close()
        await first.drain()
    stats = chunks[-1].stats
    assert [t for c in chunks for t in c.tokens] == expected
    assert stats.failovers == 1
    assert stats.head_rounds == stats.rounds
