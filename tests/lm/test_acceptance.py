import pytest
import torch

from lm.acceptance import Acceptance, DraftDistribution, verify_siblings, verify_tree
from lm.tree import TokenTree

F64 = torch.float64

# The worked example of lm/acceptance.py's module docstring.
EXAMPLE_P = torch.tensor([0.2, 0.3, 0.4, 0.1], dtype=F64)
EXAMPLE_Q = torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=F64)
EXAMPLE_TREE = TokenTree(tokens=(1, 2), parents=(-1, -1))
EXAMPLE_DRAFT = {-1: DraftDistribution(node=-1, tokens=(0, 1, 2), probs=(0.1, 0.6, 0.3))}
# Rows after node 0 (token 1) and node 1 (token 2): any distributions will do.
EXAMPLE_TARGET = torch.stack(
    [
        EXAMPLE_P,
        torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64),
        torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64),
    ]
)


def one_hot(token: int, vocab: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), vocab).to(torch.float32)


def inverse_cdf(probs: torch.Tensor, uniform: float) -> int:
    cdf = torch.cumsum(probs, 0)
    return int((cdf <= uniform * float(cdf[-1])).sum())


def test_worked_example_both_siblings_rejected() -> None:
    accepted, residual = verify_siblings(EXAMPLE_P, EXAMPLE_Q, [1, 2], [0.7, 0.6])
    assert accepted is None
    torch.testing.assert_close(residual, torch.tensor([0.2, 0.0, 0.0, 0.8], dtype=F64))


def test_worked_example_second_sibling_accepted() -> None:
    accepted, residual = verify_siblings(EXAMPLE_P, EXAMPLE_Q, [1, 2], [0.7, 0.3])
    assert accepted == 1
    torch.testing.assert_close(residual, torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3], dtype=F64))


@pytest.mark.parametrize(("uniform", "accepted"), [(0.499, 0), (0.501, None)])
def test_worked_example_first_threshold_is_one_half(uniform: float, accepted: int | None) -> None:
    # Second sibling threshold is 4/9: 0.45 rejects it.
    assert verify_siblings(EXAMPLE_P, EXAMPLE_Q, [1, 2], [uniform, 0.45])[0] == accepted


def test_worked_example_through_verify_tree_replays_the_uniforms() -> None:
    """verify_tree draws size + 1 float64 uniforms up front: u[i] tests node i, u[-1] the bonus."""
    outcomes = set()
    for seed in range(300):
        u = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=F64).tolist()
        if u[0] < 0.5:
            expected = Acceptance((0,), (1,), bonus=inverse_cdf(EXAMPLE_TARGET[1], u[2]))
        elif u[1] < 4 / 9:
            expected = Acceptance((1,), (2,), bonus=inverse_cdf(EXAMPLE_TARGET[2], u[2]))
        else:
            expected = Acceptance(nodes=(), tokens=(), bonus=0 if u[2] < 0.2 else 3)
        generator = torch.Generator().manual_seed(seed)
        result = verify_tree(EXAMPLE_TREE, EXAMPLE_TARGET, EXAMPLE_DRAFT, generator, greedy=False)
        assert result == expected, seed
        outcomes.add((result.nodes, result.bonus))
    assert {(), (0,), (1,)} == {nodes for nodes, _ in outcomes}
    assert {((), 0), ((), 3)} <= outcomes


def test_sampling_consumes_exactly_size_plus_one_uniforms() -> None:
    generator = torch.Generator().manual_seed(3)
    twin = torch.Generator().manual_seed(3)
    verify_tree(EXAMPLE_TREE, EXAMPLE_TARGET.float(), EXAMPLE_DRAFT, generator, greedy=False)
    torch.rand(EXAMPLE_TREE.size + 1, generator=twin, dtype=F64)
    assert torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=twin))


def test_draft_equal_to_target_always_accepts_first_sibling() -> None:
    target = torch.stack([EXAMPLE_Q, EXAMPLE_TARGET[1], EXAMPLE_TARGET[2]])
    for seed in range(50):
        result = verify_tree(
            EXAMPLE_TREE, target, EXAMPLE_DRAFT, torch.Generator().manual_seed(seed), greedy=False
        )
        assert result.nodes == (0,)


def test_deterministic_draft_rejected_tokens_never_come_back_as_bonus() -> None:
    # No DraftDistribution: the siblings 0 and 1 are point masses.  Once rejected, a point mass
    # token has zero residual mass, so the recovered token is always 2 or 3.
    tree = TokenTree(tokens=(0, 1), parents=(-1, -1))
    target = torch.tensor([[0.3, 0.3, 0.2, 0.2], [1, 0, 0, 0], [1, 0, 0, 0]])
    bonuses = set()
    for seed in range(200):
        result = verify_tree(tree, target, None, torch.Generator().manual_seed(seed), greedy=False)
        if not result.nodes:
            bonuses.add(result.bonus)
    assert bonuses == {2, 3}


def test_point_mass_target_on_chain_accepts_everything_and_adds_leaf_bonus() -> None:
    tree = TokenTree.chain([2, 0, 3])
    target = torch.stack([one_hot(2), one_hot(0), one_hot(3), one_hot(1)])
    draft = {1: DraftDistribution(node=1, tokens=(3, 1), probs=(0.5, 0.5))}
    for seed in range(20):
        result = verify_tree(tree, target, draft, torch.Generator().manual_seed(seed), greedy=False)
        assert result == Acceptance(nodes=(0, 1, 2), tokens=(2, 0, 3), bonus=1)


def test_zero_target_probability_is_never_accepted() -> None:
    tree = TokenTree.chain([1, 2])
    target = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.25] * 4, [0.25] * 4])
    draft = {-1: DraftDistribution(node=-1, tokens=(1,), probs=(1.0,))}
    bonuses = set()
    for seed in range(100):
        result = verify_tree(tree, target, draft, torch.Generator().manual_seed(seed), greedy=False)
        assert result.nodes == ()
        bonuses.add(result.bonus)
    assert bonuses == {0, 2}


def test_greedy_follows_argmax_through_branches() -> None:
    # 0:5 -> 1:7 -> 2:9
    #     `-> 3:2 -> 4:6
    tree = TokenTree(tokens=(5, 7, 9, 2, 6), parents=(-1, 0, 1, 0, 3))
    vocab = 10
    best = [5, 2, 1, 0, 6, 4]  # argmax of row r (after node r - 1)
    target = torch.rand(tree.size + 1, vocab, generator=torch.Generator().manual_seed(0)) * 0.5
    target[torch.arange(tree.size + 1), best] = 1.0
    result = verify_tree(tree, target, None, None, greedy=True)
    assert result == Acceptance(nodes=(0, 3, 4), tokens=(5, 2, 6), bonus=4)


def test_greedy_stops_at_first_mismatch() -> None:
    tree = TokenTree.chain([1, 2, 3])
    target = torch.stack([one_hot(1), one_hot(0), one_hot(3), one_hot(2)])
    assert verify_tree(tree, target, None, None, greedy=True) == Acceptance((0,), (1,), 0)
    target[0] = one_hot(3)
    assert verify_tree(tree, target, None, None, greedy=True) == Acceptance((), (), 3)


def test_greedy_ignores_draft_and_does_not_touch_the_generator() -> None:
    generator = torch.Generator().manual_seed(11)
    state = generator.get_state()
    result = verify_tree(EXAMPLE_TREE, EXAMPLE_TARGET, EXAMPLE_DRAFT, generator, greedy=True)
    assert result == Acceptance(nodes=(1,), tokens=(2,), bonus=0)
    assert torch.equal(generator.get_state(), state)


def test_empty_tree_gives_only_a_bonus() -> None:
    tree = TokenTree(tokens=(), parents=())
    target = one_hot(2)[None]
    assert verify_tree(tree, target, None, None, greedy=True) == Acceptance((), (), 2)
    generator = torch.Generator().manual_seed(0)
    assert verify_tree(tree, target, None, generator, greedy=False) == Acceptance((), (), 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens": (1, 2), "probs": (1.0,)}, r"draft\[3\]: tokens and probs must be"),
        ({"tokens": (), "probs": ()}, r"draft\[3\]: tokens and probs must be non-empty"),
        ({"tokens": (1, 1), "probs": (0.5, 0.5)}, r"draft\[3\]\.tokens: must be distinct"),
        ({"tokens": (-1,), "probs": (1.0,)}, r"draft\[3\]\.tokens: must be distinct and >= 0"),
        ({"tokens": (1, 2), "probs": (0.0, 1.0)}, r"draft\[3\]\.probs: each must be in \(0, 1\]"),
        ({"tokens": (1, 2), "probs": (1.5, 0.5)}, r"draft\[3\]\.probs: each must be in \(0, 1\]"),
        ({"tokens": (1, 2), "probs": (0.5, 0.49)}, r"draft\[3\]\.probs: must sum to 1 within"),
    ],
)
def test_draft_distribution_validation_names_the_node(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DraftDistribution(node=3, **kwargs)


def test_draft_distribution_tolerates_rounding() -> None:
    DraftDistribution(node=-1, tokens=(0, 1, 2), probs=(0.3333, 0.3333, 0.3333))


def draft_at(node: int, tokens: tuple[int, ...], probs: tuple[float, ...]) -> dict:
    return {node: DraftDistribution(node=node, tokens=tokens, probs=probs)}


@pytest.mark.parametrize(
    ("draft", "message"),
    [
        ({0: DraftDistribution(1, (2,), (1.0,))}, r"draft\[0\]\.node: must equal its key 0"),
        (draft_at(2, (1,), (1.0,)), r"draft\[2\]: node must be in \[-1, 2\), got 2"),
        (draft_at(-1, (1, 4), (0.5, 0.5)), r"draft\[-1\]\.tokens: must be in \[0, 4\), got 4"),
        (draft_at(-1, (0, 1), (0.5, 0.5)), r"draft\[-1\]: children tokens \[2\] are not in"),
        (draft_at(0, (3,), (1.0,)), r"draft\[0\]: children tokens \[0\] are not in the support"),
    ],
)
def test_verify_tree_rejects_draft_inconsistent_with_tree(draft: dict, message: str) -> None:
    tree = TokenTree(tokens=(1, 2), parents=(-1, -1)) if 0 not in draft else TokenTree.chain([1, 0])
    target = torch.full((3, 4), 0.25)
    generator = torch.Generator().manual_seed(0)
    for greedy in (True, False):
        with pytest.raises(ValueError, match=message):
            verify_tree(tree, target, draft, generator, greedy)


def test_verify_tree_rejects_duplicate_sampled_siblings() -> None:
    tree = TokenTree(tokens=(1, 1), parents=(-1, -1))
    with pytest.raises(ValueError, match=r"draft\[-1\]: children sampled without replacement"):
        verify_tree(tree, torch.full((3, 4), 0.25), draft_at(-1, (1, 2), (0.5, 0.5)), None, True)


def test_verify_tree_checks_shapes_tokens_and_generator() -> None:
    tree = TokenTree.chain([1, 2])
    with pytest.raises(ValueError, match=r"target_probs: must have shape \(tree.size \+ 1, vocab"):
        verify_tree(tree, torch.full((2, 4), 0.25), None, None, greedy=True)
    with pytest.raises(ValueError, match=r"tree.tokens\[1\]: must be in \[0, 2\), got 2"):
        verify_tree(tree, torch.full((3, 2), 0.5), None, None, greedy=True)
    with pytest.raises(ValueError, match="generator: required when greedy is False"):
        verify_tree(tree, torch.full((3, 4), 0.25), None, None, greedy=False)
