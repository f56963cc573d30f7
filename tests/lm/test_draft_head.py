"""The ReDrafter draft head (lm/draft_head.py): the recurrence and logits against the formulas,
teacher forcing against step-by-step drafting, beam search against an exhaustive reference and
the worked examples, the lookahead windows used by training, and save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lm.draft_head import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DraftHead,
    DraftHeadConfig,
    extend_beams,
    load_head,
    save_head,
)
from lm.errors import CheckpointError
from lm.training.evaluate import accepted_length
from lm.training.lookahead import lookahead_inputs, lookahead_starts, lookahead_targets
from lm.tree import TokenTree

CONFIG = DraftHeadConfig(vocab_size=23, hidden_size=12, state_size=8, n_blocks=2)


def _random_head(seed: int = 0, config: DraftHeadConfig = CONFIG) -> DraftHead:
    """A head with every weight random (a fresh one has identity blocks and would hide bugs)."""
    torch.manual_seed(seed)
    head = DraftHead(config)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.7)
    return head.eval()


def _markov_head(transitions: dict[int, dict[int, float]], vocab: int = 8) -> DraftHead:
    """A head whose next-token distribution depends only on the previous token:
    P(next | t) = transitions[t] (the rest of the mass spread evenly).  The embedding is the
    identity, W = c I and U = 0 make s = silu(c) onehot(t), `out` reads s back as onehot(t),
    and lm_head holds log P(. | t) in column t."""
    c = 12.0
    head = DraftHead(DraftHeadConfig(vocab, hidden_size=vocab, state_size=vocab, n_blocks=0))
    log_p = torch.empty(vocab, vocab)
    for t in range(vocab):
        given = transitions.get(t, {})
        rest = (1 - sum(given.values())) / (vocab - len(given))
        log_p[:, t] = math.log(rest)
        for nxt, p in given.items():
            log_p[nxt, t] = math.log(p)
    with torch.no_grad():
        head.embedding.weight.copy_(torch.eye(vocab))
        head.w.weight.copy_(c * torch.eye(vocab))
        head.u.weight.zero_()
        head.u.bias.zero_()
        head.out.weight.zero_()
        head.out.weight[:, vocab:].copy_(torch.eye(vocab) / F.silu(torch.tensor(c)))
        head.lm_head.weight.copy_(log_p)
    return head.eval()


def test_forward_follows_the_recurrence_formula():
    head = _random_head()
    hidden, tokens = torch.randn(3, 12), torch.randint(0, 23, (3, 4))
    state = torch.zeros(3, 8)
    for k in range(4):
        e = head.embedding.weight[tokens[:, k]]
        state = F.silu(e @ head.w.weight.T + state @ head.u.weight.T + head.u.bias)
        x = torch.cat([hidden, state], dim=-1)
        for block in head.blocks:
            x = x + F.silu(x @ block.linear.weight.T + block.linear.bias)
        expected = x @ head.out.weight.T @ head.lm_head.weight.T
        torch.testing.assert_close(head(hidden, tokens)[:, k], expected, rtol=1e-5, atol=1e-4)


def test_teacher_forced_forward_equals_step_by_step():
    head = _random_head(1)
    hidden, tokens = torch.randn(4, 12), torch.randint(0, 23, (4, 6))
    state, steps = head.initial_state(4), []
    for k in range(6):
        state = head.advance(state, tokens[:, k])
        steps.append(head.logits(hidden, state))
    torch.testing.assert_close(head(hidden, tokens), torch.stack(steps, dim=1))
    assert head.initial_state(4).shape == (4, 8) and not head.initial_state(4).any()


def test_fresh_blocks_are_the_identity():
    head = DraftHead(CONFIG)
    x = torch.randn(5, CONFIG.input_size)
    torch.testing.assert_close(head.blocks(x), x)


def _reference_beams(head: DraftHead, hidden, last: int, width: int, depth: int):
    """Beam search that scores every candidate sequence from scratch with the teacher-forced
    forward, protecting the greedy chain as edge_node/drafters/beam.py does."""
    beams, scores, greedy = [[]], [0.0], 0
    for _ in range(depth):
        candidates = []
        for i, beam in enumerate(beams):
            logits = head(hidden[None], torch.tensor([[last, *beam]]))[0, -1]
            for token, lp in enumerate(F.log_softmax(logits, -1).tolist()):
                candidates.append((scores[i] + lp, i, token))
        ranked = sorted(candidates, key=lambda c: -c[0])[:width]
        greedy_row = [c for c in candidates if c[1] == greedy]
        greedy_pick = max(greedy_row, key=lambda c: c[0])
        if greedy_pick not in ranked:
            ranked[-1] = greedy_pick
        greedy = ranked.index(greedy_pick)
        beams = [beams[i] + [token] for _, i, token in ranked]
        scores = [score for score, _, _ in ranked]
    return beams, greedy


@pytest.mark.parametrize("seed, width, depth", [(2, 3, 4), (3, 4, 5), (4, 2, 1)])
def test_beam_search_matches_an_exhaustive_reference(seed, width, depth):
    head = _random_head(seed)
    hidden = torch.randn(12)
    draft = head.beam_search(hidden, 5, width=width, depth=depth)
    beams, greedy = _reference_beams(head, hidden, 5, width, depth)
    assert draft.tree == TokenTree.from_beams(beams)
    assert [draft.tree.tokens[n] for n in draft.main_path] == beams[greedy]
    assert draft.undeduplicated == width * depth
    assert draft.tree.size <= width * depth


def test_main_path_is_the_greedy_chain_and_width_one_is_that_chain():
    head = _random_head(5)
    hidden = torch.randn(12)
    chain, state = [], head.advance(head.initial_state(1), torch.tensor([7]))
    for _ in range(6):
        chain.append(int(head.logits(hidden[None], state).argmax()))
        state = head.advance(state, torch.tensor(chain[-1:]))
    assert head.beam_search(hidden, 7, width=1, depth=6).tree == TokenTree.chain(chain)
    for width in (2, 4, 8):
        draft = head.beam_search(hidden, 7, width=width, depth=6)
        assert draft.main_path == tuple(draft.tree.path(draft.main_path[-1]))
        assert [draft.tree.tokens[n] for n in draft.main_path] == chain


def test_beam_search_docstring_example():
    # From 0: 5 (greedy) or 3; from 5: 7 or 2, which beat everything after 3.
    head = _markov_head({0: {5: 0.5, 3: 0.4}, 5: {7: 0.5, 2: 0.45}, 3: {1: 0.3}})
    draft = head.beam_search(torch.zeros(8), 0, width=2, depth=2)
    assert draft.tree == TokenTree(tokens=(5, 7, 2), parents=(-1, 0, 0))
    assert draft.main_path == (0, 1)
    assert draft.undeduplicated == 4


def test_beam_search_keeps_the_greedy_chain_that_plain_beams_drop():
    # Both continuations of 3 (0.45 * 0.6, 0.45 * 0.35) outscore the greedy 5 -> 7 (0.5 * 0.25):
    # plain beam search would keep [3, 4], [3, 6]; the greedy chain replaces the worse one.
    head = _markov_head({0: {5: 0.5, 3: 0.45}, 5: {7: 0.25}, 3: {4: 0.6, 6: 0.35}})
    draft = head.beam_search(torch.zeros(8), 0, width=2, depth=2)
    assert draft.tree == TokenTree.from_beams([[3, 4], [5, 7]])
    assert [draft.tree.tokens[n] for n in draft.main_path] == [5, 7]


def test_extend_beams_docstring_example():
    logprobs = torch.full((2, 8), -5.0)
    logprobs[0, 7] = -1.4
    logprobs[1, 4], logprobs[1, 6] = -0.5, -1.0
    beams = torch.tensor([[3], [2]])
    rows, beams, scores, greedy = extend_beams(beams, torch.tensor([-0.7, -0.8]), 0, logprobs, 2)
    assert rows.tolist() == [1, 0]
    assert beams.tolist() == [[2, 4], [3, 7]]
    torch.testing.assert_close(scores, torch.tensor([-1.3, -2.1]))
    assert greedy == 1
    # Kept by plain beam search too: then it keeps its rank.
    _, beams, _, greedy = extend_beams(beams, torch.tensor([-0.7, -0.8]), 1, logprobs, 2)
    assert beams.tolist() == [[3, 7, 4], [3, 7, 6]] and greedy == 0


def test_accepted_length_docstring_example():
    tree = TokenTree.from_beams([[5, 7, 9], [5, 2]])
    assert accepted_length(tree, [5, 7, 1]) == 2
    assert accepted_length(tree, [2]) == 0
    assert accepted_length(tree, [5, 2, 4]) == 2
    assert accepted_length(tree, [5, 7, 9, 9]) == 3


def test_beam_search_rejects_bad_shapes():
    head = _random_head()
    with pytest.raises(ValueError, match=r"^width: must be >= 1, got 0$"):
        head.beam_search(torch.zeros(12), 0, width=0, depth=3)
    with pytest.raises(ValueError, match=r"^depth: must be >= 1, got 0$"):
        head.beam_search(torch.zeros(12), 0, width=2, depth=0)


def test_lookahead_starts_worked_example():
    assert lookahead_starts(2, 8, 2, 2).tolist() == [[0, 2, 4], [1, 3, 5]]
    assert lookahead_starts(1, 4, 2).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match=r"^depth: must be in \[1, 4\), got 4$"):
        lookahead_starts(1, 4, 4)
    with pytest.raises(ValueError, match=r"^stride: must be in \[1, 2\], got 3$"):
        lookahead_starts(1, 4, 2, 3)


@pytest.mark.parametrize("stride", [1, 3])
def test_lookahead_windows_pair_each_start_with_the_right_tokens_and_targets(stride):
    batch, time, depth, dim = 3, 11, 4, 5
    tokens = torch.randint(0, 50, (batch, time))
    hidden = torch.randn(batch, time, dim)
    target_out = torch.randn(batch, time, 7)
    h, inputs = lookahead_inputs(hidden, tokens, depth, stride)
    wanted = lookahead_targets(target_out, depth, stride)
    i = 0
    for b, starts in enumerate(lookahead_starts(batch, time, depth, stride).tolist()):
        for p in starts:
            torch.testing.assert_close(h[i], hidden[b, p])
            assert inputs[i].tolist() == tokens[b, p + 1 : p + 1 + depth].tolist()
            torch.testing.assert_close(wanted[i], target_out[b, p + 1 : p + 1 + depth])
            i += 1
    assert i == len(h) == len(inputs) == len(wanted)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^vocab_size: must be an integer >= 1, got 0$"):
        DraftHeadConfig(vocab_size=0, hidden_size=4, state_size=4)
    with pytest.raises(ValueError, match=r"^state_size: must be an integer >= 1, got -2$"):
        DraftHeadConfig(vocab_size=8, hidden_size=4, state_size=-2)
    with pytest.raises(ValueError, match=r"^n_blocks: must be an integer >= 0, got -1$"):
        DraftHeadConfig(vocab_size=8, hidden_size=4, state_size=4, n_blocks=-1)
    with pytest.raises(ValueError, match=r"^depth: unknown field"):
        DraftHeadConfig.from_dict({**CONFIG.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match=r"^hidden_size: missing$"):
        DraftHeadConfig.from_dict({"vocab_size": 8, "state_size": 4})
    assert DraftHeadConfig.from_dict(CONFIG.to_dict()) == CONFIG


def test_save_load_roundtrip_is_exact(tmp_path):
    head = _random_head(6)
    save_head(head, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == CONFIG.to_dict()
    loaded = load_head(tmp_path, device="cpu", dtype=torch.float32)
    assert loaded.config == CONFIG and not loaded.training
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    hidden, tokens = torch.randn(2, 12), torch.randint(0, 23, (2, 3))
    assert torch.equal(loaded(hidden, tokens), head(hidden, tokens))


def test_save_in_float16_loads_the_rounded_weights(tmp_path):
    head = _random_head(7)
    save_head(head, tmp_path, dtype=torch.float16)
    loaded = load_head(tmp_path, device="cpu", dtype=torch.float16)
    assert loaded.u.weight.dtype == torch.float16
    assert torch.equal(loaded.u.weight, head.u.weight.half())
    promoted = load_head(tmp_path, device="cpu", dtype=torch.float32)
    assert torch.equal(promoted.lm_head.weight, head.lm_head.weight.half().float())


def _corrupt(tmp_path, what: str):
    save_head(_random_head(), tmp_path)
    config, weights = tmp_path / CONFIG_FILE, tmp_path / WEIGHTS_FILE
    if what == "no config":
        config.unlink()
    elif what == "no weights":
        weights.unlink()
    elif what == "bad json":
        config.write_text("{not json")
    elif what == "bad field":
        config.write_text(json.dumps({**CONFIG.to_dict(), "state_size": 0}))
    elif what == "other shape":
        config.write_text(json.dumps({**CONFIG.to_dict(), "state_size": 9}))
    elif what == "missing tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        del tensors["u.bias"]
        save_file(tensors, weights)
    elif what == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])


@pytest.mark.parametrize(
    "what, file, message",
    [
        ("no config", CONFIG_FILE, "missing"),
        ("no weights", WEIGHTS_FILE, "missing"),
        ("bad json", CONFIG_FILE, "Expecting property name"),
        ("bad field", CONFIG_FILE, "state_size: must be an integer >= 1, got 0"),
        ("other shape", WEIGHTS_FILE, "has shape (8, 12), head_config.json implies (9, 12)"),
        ("missing tensor", WEIGHTS_FILE, "missing tensor u.bias"),
        ("truncated", WEIGHTS_FILE, "not a readable safetensors file"),
    ],
)
def test_load_head_errors_name_the_file(tmp_path, what, file, message):
    _corrupt(tmp_path, what)
    with pytest.raises(CheckpointError) as info:
        load_head(tmp_path, device="cpu")
    assert str(info.value).startswith(f"{tmp_path / file}: ")
    assert message in str(info.value)
