"""Token trees: several draft continuations packed so shared prefixes are verified once.

A tree hangs below the last committed token. Node i holds tokens[i]; its parent is
parents[i] (-1 for a child of the last committed token) and always comes earlier
(parents[i] < i), so a single pass in index order sees parents before children.

Worked example (ReDrafter-style beams with a shared prefix)::

    tree = TokenTree.from_beams([[5, 7, 9], [5, 7, 2], [5, 3]])
    tree.tokens  == (5, 7, 9, 2, 3)       token (node):  5 (0) -> 7 (1) -> 9 (2)
    tree.parents == (-1, 0, 1, 1, 0)                          |         `-> 2 (3)
                                                              `-> 3 (4)
    tree.depths()      == [0, 1, 2, 2, 1]
    tree.positions(10) == [10, 11, 12, 12, 11]     (10 tokens already committed)
    tree.path(3)       == [0, 1, 3]
    tree.leaves()      == [2, 3, 4]
    tree.children(-1)  == [0];  tree.children(1) == [2, 3]
    tree.attention_mask() ==  1 0 0 0 0    (row i: node i and its ancestors)
                              1 1 0 0 0
                              1 1 1 0 0
                              1 1 0 1 0
                              1 0 0 0 1
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class TreeError(ValueError):
    """A token tree is malformed; the message names the field and the index."""


@dataclass(frozen=True)
class TokenTree:
    tokens: tuple[int, ...]  # (size,) token id of each node
    parents: tuple[int, ...]  # (size,) parent node index, -1 = child of the last committed token

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise TreeError(
                f"parents: must have one entry per token ({len(self.tokens)}), "
                f"got {len(self.parents)}"
            )
        for i, token in enumerate(self.tokens):
            if token < 0:
                raise TreeError(f"tokens[{i}]: must be >= 0, got {token}")
        for i, parent in enumerate(self.parents):
            if not -1 <= parent < i:
                raise TreeError(f"parents[{i}]: must be in [-1, {i}), got {parent}")

    @property
    def size(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of each node; children of the last committed token have depth 0."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(0 if parent == -1 else depths[parent] + 1)
        return depths

    def children(self, node: int) -> list[int]:
        """Children of `node` in index order; node -1 is the last committed token."""
        self._check_node(node, allow_root=True)
        return [i for i, parent in enumerate(self.parents) if parent == node]

    def path(self, node: int) -> list[int]:
        """Node indices from the top of the tree down to `node`, inclusive."""
        self._check_node(node, allow_root=False)
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def leaves(self) -> list[int]:
        """Nodes without children, in index order."""
        has_child = set(self.parents)
        return [i for i in range(self.size) if i not in has_child]

    def attention_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(size, size) bool: [i, j] is True iff j == i or j is an ancestor of i."""
        rows: list[list[bool]] = []
        for i, parent in enumerate(self.parents):
            row = list(rows[parent]) if parent != -1 else [False] * self.size
            row[i] = True
            rows.append(row)
        return torch.tensor(rows, dtype=torch.bool, device=device).reshape(self.size, self.size)

    def positions(self, start: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(size,) long: RoPE position of each node, start + depth (start = committed length)."""
        return torch.tensor(self.depths(), dtype=torch.long, device=device) + start

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> "TokenTree":
        """A tree without branches: tokens[i] follows tokens[i - 1]."""
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))

    @classmethod
    def from_beams(cls, beams: Sequence[Sequence[int]]) -> "TokenTree":
        """Merge beams (each a continuation of the committed text) into a prefix tree.

        Nodes are numbered in order of first appearance, beam by beam:
        [[a, b, c], [a, b, d]] -> tokens (a, b, c, d), parents (-1, 0, 1, 1).
        """
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for beam in beams:
            node = -1
            for token in beam:
                key = (node, int(token))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(token))
                    parents.append(node)
                node = index[key]
        return cls(tuple(tokens), tuple(parents))

    def _check_node(self, node: int, *, allow_root: bool) -> None:
        low = -1 if allow_root else 0
        if not low <= node < self.size:
            raise TreeError(f"node: must be in [{low}, {self.size}), got {node}")
