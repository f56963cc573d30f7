"""Draft sources behind one interface: n-gram lookup drafts what the history repeats;
lossless output with it equals cloud-only (greedy and seeded sampling); draft names are
checked by the edge, which answers INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import pytest

import edgecloud
from edge_node.drafters.ngram import continuations_to_draft, lookup
from edge_node.server import start_edge_server
from edge_node.types import DraftConfig, GenerationRequest
from lm.sampling import SamplingParams
from protocol.types import Mode
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import make_runtime

# A prompt that repeats itself: its own continuation is in it.
LOOPING = (3, 8, 20, 5, 9, 3, 8, 20, 5, 9, 3, 8)


def test_lookup_finds_the_longest_suffix_seen_before():
    # n = 3 ([4, 1, 2]) was never seen; n = 2 ([1, 2]) was, at 0, followed by 3 4 1.
    assert lookup([1, 2, 3, 4, 1, 2], width=1, depth=3, max_n=3, min_n=1) == [(3, 4, 1)]
    # Two occurrences of [5, 6], most recent first; the continuation stops at the end.
    history = [5, 6, 7, 5, 6, 8, 5, 6]
    assert lookup(history, width=2, depth=3, max_n=2, min_n=2) == [(8, 5, 6), (7, 5, 6)]
    assert lookup([1, 2, 3], width=2, depth=4, max_n=3, min_n=1) == []


def test_continuations_merge_into_one_tree_with_the_first_as_main_path():
    draft = continuations_to_draft([(4, 5, 6), (4, 5, 9), (7,)])
    assert draft.tree.tokens == (4, 5, 6, 9, 7)
    assert draft.tree.parents == (-1, 0, 1, 1, -1)
    assert draft.main_path == (0, 1, 2)
    assert draft.undeduplicated == 7
    assert draft.drafter == "ngram" and draft.dists == {}
    assert all(node < 0 for node in draft.node_ids)  # no SLM cache entry behind them


async def generate(runtime, mode, sampling, draft=DraftConfig(drafter="ngram")):
    request = GenerationRequest(
        prompt_tokens=LOOPING, max_tokens=32, sampling=sampling, mode=mode, draft=draft
    )
    chunks = [c async for c in runtime.generate(request)]
    return [t for c in chunks for t in c.tokens], chunks[-1].stats


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(), SamplingParams(temperature=0.7, seed=11), SamplingParams(1.0, seed=4)],
    ids=["greedy", "t0.7", "t1.0"],
)
async def test_ngram_lossless_equals_cloud_only(runtime, sampling):
    tokens, stats = await generate(runtime, Mode.LOSSLESS, sampling)
    cloud, _ = await generate(runtime, Mode.CLOUD_ONLY, sampling)
    assert tokens == cloud
    # The prompt repeats itself, so lookups found drafts (the tiny target does not
    # continue the loop, so few are accepted: the output is the target's either way).
    assert stats.draft_tokens > 0 and stats.head_rounds == 0


async def test_the_edge_names_the_draft_field_it_does_not_offer(draft, verifier):
    runtime = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    edge = await start_edge_server(runtime, ServerConfig(port=0, auth=AuthConfig(token="t0k")))
    try:
        async with edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", token="t0k") as client:
            cases = [
                (edgecloud.DraftOptions(tree="bfs"), "draft.tree: must be one of"),
                (edgecloud.DraftOptions(drafter="eagle"), "draft.drafter: must be one of"),
                (edgecloud.DraftOptions(drafter="head"), "needs a draft head on this edge"),
            ]
            for options, message in cases:
                with pytest.raises(edgecloud.InvalidRequest, match=message):
                    await client.generate(list(LOOPING), max_tokens=4, draft=options)
            # Refused in every mode, not only the one that would draft with it.
            with pytest.raises(edgecloud.InvalidRequest, match="needs a draft head"):
                await client.generate(
                    list(LOOPING),
                    max_tokens=4,
                    mode="edge_only",
                    draft=edgecloud.DraftOptions(drafter="head"),
                )
            # The edge still serves, and a drafter named in the request is used.
            result = await client.generate(
                list(LOOPING), max_tokens=8, draft=edgecloud.DraftOptions(drafter="ngram")
            )
            assert len(result.tokens) == 8
    finally:
        await edge.drain()
