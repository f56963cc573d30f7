"""Prompt-lookup drafting (Saxena, 2023): the continuations that followed earlier
occurrences of the history's last n tokens, merged into a tree. No model runs, so a
draft costs microseconds; it pays on text that repeats what came before (code edits,
extraction, answers quoting the prompt) and proposes nothing elsewhere.

Example: history `a b c d a b` with n = 2 finds `a b` at 0, followed by `c d a`: a
depth-3 chain `c d a`. With width 2 a second, different continuation (from another
occurrence) becomes a second branch; shared prefixes are merged.

Like the head's, its node ids name no SLM cache entry (`EdgeLM.accept` leaves the
accepted tokens pending for the SLM), and it sends no distributions: each child is a
point mass to the verifier, which keeps sampled verification exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_node.drafters import Draft, DraftContext, DraftShape
from lm.tree import TokenTree


class NgramSource:
    name = "ngram"
    pipelines = False
    needs_hidden = False

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"min_n: must be in [1, max_n={max_n}], got {min_n}")
        self.max_n, self.min_n = max_n, min_n

    def draft(self, context: DraftContext, shape: DraftShape) -> Draft:
        return continuations_to_draft(
            lookup(context.lm.tokens, shape.width, shape.depth, self.max_n, self.min_n)
        )


def lookup(
    tokens: Sequence[int], width: int, depth: int, max_n: int, min_n: int
) -> list[tuple[int, ...]]:
    """Up to `width` distinct continuations (of up to `depth` tokens, most recent
    occurrence first) of the longest suffix of `tokens`, of length max_n down to
    min_n, that occurred before."""
    tokens = list(tokens)
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        found: list[tuple[int, ...]] = []
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                following = tuple(tokens[start + n : start + n + depth])
                if following not in found:
                    found.append(following)
                if len(found) == width:
                    break
        if found:
            return found
    return []


def continuations_to_draft(continuations: Sequence[tuple[int, ...]]) -> Draft:
    """A tree merging the continuations' shared prefixes; the first is the main path."""
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}  # (parent index, token) -> index
    main: list[int] = []
    for k, continuation in enumerate(continuations):
        parent = -1
        for token in continuation:
            node = children.get((parent, token))
            if node is None:
                node = children[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
            if k == 0:
                main.append(node)
            parent = node
    return Draft(
        tree=TokenTree(tokens=tuple(tokens), parents=tuple(parents)),
        dists={},
        node_ids=tuple(-1 - i for i in range(len(tokens))),
        undeduplicated=sum(len(c) for c in continuations),
        main_path=tuple(main),
        drafter=NgramSource.name,
    )
