"""The real Gemma 3 270M (Q4_K_M GGUF, assembled from four PyPI wheels, sha256-checked)
through our loader and model against transformers' own GGUF loading of the same file.

Each input is longer than the model's 512-token window, so the local layers' windows,
their RoPE base and the cache's windowed masks all move the logits compared here.
"""

import pytest
import torch

from lm.checkpoint import load_model
from lm.tree import TokenTree
from tests.lm.conftest import REPO

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


TEXTS = [
    "Hello world",
    "  two spaces  and\ttabs\nnewline",
    "ünïcödé 日本語 emoji 🤖 and a bell \x07",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x**2  # square",
    "     leading spaces",
]


def test_tokenizer_and_greedy_text_match_transformers(real_gemma3, pair):
    """The SentencePiece tokenizer rebuilt from the file (no merges in it), then 12 greedy
    tokens through our cache against transformers' generate."""
    from transformers import AutoTokenizer

    from lm.tokenizer import Tokenizer

    ours_model, theirs_model, _, _ = pair
    ours = Tokenizer.from_dir(real_gemma3)
    theirs = AutoTokenizer.from_pretrained(real_gemma3.parent, gguf_file=real_gemma3.name)
    readme = (REPO / "README.md").read_text(encoding="utf-8")[:20000]  # prose, tables, code
    for text in [*TEXTS, *(readme[i : i + 2000] for i in range(0, len(readme), 2000))]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id) == (2, 1)
    prompt = ours.encode(TEXTS[3])
    with torch.no_grad():
        expected = theirs_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False
        )[0, len(prompt) :].tolist()
        cache = ours_model.new_cache(1, len(prompt) + 13)
        logits = ours_model(torch.tensor([prompt]), cache=cache)[0, -1]
        cache.commit(0, range(len(prompt)))
        got = []
        for _ in range(12):
            got.append(int(logits.argmax()))
            logits = ours_model(torch.tensor([[got[-1]]]), cache=cache)[0, -1]
            cache.commit(0, [0])
    assert got == expected, (ours.decode(got), ours.decode(expected))
