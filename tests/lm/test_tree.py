"""TokenTree: the docstring's worked example, replayed, plus validation."""

import pytest
import torch

from lm.tree import TokenTree, TreeError


def test_worked_example_from_docstring():
    tree = TokenTree.from_beams([[5, 7, 9], [5, 7, 2], [5, 3]])
    assert tree.tokens == (5, 7, 9, 2, 3)
    assert tree.parents == (-1, 0, 1, 1, 0)
    assert tree.size == 5
    assert tree.depths() == [0, 1, 2, 2, 1]
    assert tree.positions(10).tolist() == [10, 11, 12, 12, 11]
    assert tree.positions(10).dtype == torch.long
    assert tree.path(3) == [0, 1, 3]
    assert tree.leaves() == [2, 3, 4]
    assert tree.children(-1) == [0]
    assert tree.children(1) == [2, 3]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    mask = tree.attention_mask()
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_from_beams_interface_example():
    a, b, c, d = 11, 12, 13, 14
    tree = TokenTree.from_beams([[a, b, c], [a, b, d]])
    assert (tree.tokens, tree.parents) == ((a, b, c, d), (-1, 0, 1, 1))


def test_from_beams_keeps_repeated_tokens_on_different_branches():
    tree = TokenTree.from_beams([[4, 4, 4], [4, 5, 4], [6]])
    assert tree.tokens == (4, 4, 4, 5, 4, 6)
    assert tree.parents == (-1, 0, 1, 0, 3, -1)
    assert tree.children(-1) == [0, 5]
    assert [tree.path(leaf) for leaf in tree.leaves()] == [[0, 1, 2], [0, 3, 4], [5]]


def test_identical_beams_collapse_to_a_chain():
    assert TokenTree.from_beams([[1, 2], [1, 2]]) == TokenTree.chain([1, 2])


def test_chain():
    tree = TokenTree.chain([9, 8, 7])
    assert tree.parents == (-1, 0, 1)
    assert torch.equal(tree.attention_mask(), torch.ones(3, 3, dtype=torch.bool).tril())
    assert tree.positions(4).tolist() == [4, 5, 6]
    assert tree.leaves() == [2]


def test_empty_tree():
    tree = TokenTree.from_beams([])
    assert tree.size == 0 and tree.leaves() == [] and tree.children(-1) == []
    assert tree.attention_mask().shape == (0, 0)
    assert tree.positions(3).shape == (0,)


def test_mask_is_ancestor_relation_on_a_random_tree():
    gen = torch.Generator().manual_seed(0)
    parents = [-1]
    for i in range(1, 30):
        parents.append(int(torch.randint(-1, i, (1,), generator=gen)))
    tree = TokenTree(tuple(range(30)), tuple(parents))
    mask = tree.attention_mask()
    for i in range(30):
        assert mask[i].nonzero().flatten().tolist() == tree.path(i)
        assert tree.depths()[i] == len(tree.path(i)) - 1


@pytest.mark.parametrize(
    ("tokens", "parents", "message"),
    [
        ((1, 2), (-1,), "parents: must have one entry per token"),
        ((1, 2), (-1, 1), r"parents\[1\]: must be in \[-1, 1\), got 1"),
        ((1, 2), (-1, -2), r"parents\[1\]"),
        ((1,), (0,), r"parents\[0\]"),
        ((1, -3), (-1, 0), r"tokens\[1\]: must be >= 0, got -3"),
    ],
)
def test_invalid_trees_raise_naming_the_field(tokens, parents, message):
    with pytest.raises(TreeError, match=message):
        TokenTree(tokens, parents)


def test_node_out_of_range():
    tree = TokenTree.chain([1, 2])
    with pytest.raises(TreeError, match="node"):
        tree.path(2)
    with pytest.raises(TreeError, match="node"):
        tree.path(-1)
    with pytest.raises(TreeError, match="node"):
        tree.children(5)
