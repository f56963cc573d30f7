"""The real Gemma 3 270M (Q4_K_M GGUF, assembled from four PyPI wheels, sha256-checked)
through our loader and model against transformers' own GGUF loading of the same file.

Each input is longer than the model's 512-token window, so the local layers' windows,
their RoPE base and the cache's windowed masks all move the logits compared here.
"""

import pytest
import torch

from lm.checkpoint import load_model
from lm.tree import TokenTree

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

LENGTH = 600  # past the 512-token window
ATOL = 2e-3  # measured 2e-4 on logits up to 220 in float32


@pytest.fixture(scope="module")
def pair(real_gemma3):
    """(ours, transformers') float32 models and 600 token ids (BOS, then random ids)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF")
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(
        real_gemma3.parent,
        gguf_file=real_gemma3.name,
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    ours = load_model(real_gemma3, device="cpu", dtype=torch.float32)
    ids = torch.randint(3, 262_000, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = ours.config.bos_token_id
    with torch.no_grad():
        expected = theirs(ids).logits[0]
    return ours, theirs, ids, expected


def test_config_is_read_from_the_file(pair):
    ours, theirs, _, _ = pair
    config = ours.config
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (640, 18, 4, 1)
    assert (config.head_dim, config.vocab_size, config.sliding_window) == (256, 262144, 512)
    global_layers = [i for i in range(18) if i not in config.sliding_layers]
    assert global_layers == [5, 11, 17]
    assert [theirs.config.layer_types[i] for i in global_layers] == ["full_attention"] * 3
    assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4)
    # norms are stored 1 + w in GGUF; both loaders take the 1 off
    state = theirs.state_dict()
    for ours_name, hf_name in (
        ("layers.0.attention.q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
        ("layers.5.post_ffn_norm.weight", "model.layers.5.post_feedforward_layernorm.weight"),
        ("norm.weight", "model.norm.weight"),
    ):
        torch.testing.assert_close(ours.state_dict()[ours_name], state[hf_name], atol=0, rtol=0)


@torch.no_grad()
def test_logits_past_the_window_match_transformers(pair):
    ours, _, ids, expected = pair
    assert expected.abs().max() > 50
    torch.testing.assert_close(ours(ids)[0], expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cached_decode_and_a_tree_past_the_window_match_transformers(pair):
    """Prefill 590 tokens, decode 4 one at a time, then verify a tree whose main path is
    the next 6 tokens: every position as transformers computes it without a cache."""
    ours, _, ids, expected = pair
    tokens = ids[0].tolist()
    cache = ours.new_cache(1, LENGTH + 8)
    got = [ours(ids[:, :590], cache=cache)[0, -1]]
    cache.commit(0, range(590))
    for position in range(590, 594):
        got.append(ours(ids[:, position : position + 1], cache=cache)[0, -1])
        cache.commit(0, [0])
    torch.testing.assert_close(torch.stack(got), expected[589:594], atol=ATOL, rtol=0)
    main = tokens[594:600]
    tree = TokenTree.from_beams([main, [main[0], 7, 8], [9, 10]])
    logits = ours(
        torch.tensor([tree.tokens]),
        cache=cache,
        positions=tree.positions(594)[None],
        mask=tree.attention_mask()[None],
    )[0]
    path = tree.path(tree.leaves()[0])
    assert [tree.tokens[n] for n in path] == main
    torch.testing.assert_close(logits[path], expected[594:600], atol=ATOL, rtol=0)
