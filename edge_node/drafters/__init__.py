"""Where drafts come from: one interface, `DraftSource.draft(context, shape) -> Draft`.

Sources, chosen by name through `edge_node/drafters/sources.py`:
- `slm`: the edge's small LM grows a tree of the request's kind (`TreeDrafter`: beam,
  topk, chain) in its cache (`EdgeLM.forward_nodes`), so the accepted path's keys and
  values are kept after verification. Node ids given to `forward_nodes` are the tree
  drafter's own; `Draft.node_ids` maps tree indices to them.
- `head`: ReDrafter's recurrent head, from the target's hidden state (`head.py`).
- `ngram`: prompt lookup in the history (`ngram.py`).
The last two make `Draft`s with node ids that name no SLM cache entry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Protocol

import torch

from edge_node.slm import EdgeLM
from lm.acceptance import DraftDistribution
from lm.sampling import SamplingParams
from lm.tree import TokenTree

TreeKind = Literal["beam", "topk", "chain"]


@dataclass(frozen=True)
class DraftShape:
    width: int  # beams (beam), branching factor (topk); 1 for chain
    depth: int  # tokens along each beam / levels of the tree

    def __post_init__(self) -> None:
        if not 1 <= self.width <= 16:
            raise ValueError(f"width: must be in [1, 16], got {self.width}")
        if not 1 <= self.depth <= 32:
            raise ValueError(f"depth: must be in [1, 32], got {self.depth}")


@dataclass(frozen=True)
class Draft:
    tree: TokenTree
    # q per node whose children were sampled; empty for deterministic drafts.
    dists: dict[int, DraftDistribution]
    # Tree index -> the drafter's node id (what EdgeLM.accept wants).
    node_ids: tuple[int, ...]
    # Tree nodes before prefix deduplication (beam: width * depth), to report the saving.
    undeduplicated: int
    # Tree indices of the drafter's most likely path, root first.
    main_path: tuple[int, ...]
    # The name of the source that made it.
    drafter: str = "slm"

    def within_depth(self, levels: int) -> Draft:
        """This draft cut to its first `levels` levels (0: an empty tree), so that a
        round fits the verifier's context; itself when it already fits."""
        depths = self.tree.depths()
        if max(depths, default=-1) < levels:
            return self
        keep = [i for i, depth in enumerate(depths) if depth < levels]
        index = {old: new for new, old in enumerate(keep)}
        tree = TokenTree(
            tokens=tuple(self.tree.tokens[i] for i in keep),
            parents=tuple(index.get(self.tree.parents[i], -1) for i in keep),
        )
        renumber = {-1: -1, **index}
        parents = set(tree.parents)  # q only where children are left to test against it
        return Draft(
            tree=tree,
            dists={
                renumber[node]: replace(dist, node=renumber[node])
                for node, dist in self.dists.items()
                if renumber.get(node) in parents
            },
            node_ids=tuple(self.node_ids[i] for i in keep),
            undeduplicated=self.undeduplicated - (self.tree.size - len(keep)),
            main_path=tuple(index[i] for i in self.main_path if i in index),
            drafter=self.drafter,
        )


@dataclass
class DraftContext:
    """What a source may read to draft the round after the history."""

    lm: EdgeLM  # the SLM's view of the generation: `lm.tokens` is the history
    # The target's hidden state before the history's last token, from the last reply;
    # None when no reply carried one.
    hidden: torch.Tensor | None
    sampling: SamplingParams
    generator: torch.Generator | None


class DraftSource(Protocol):
    name: ClassVar[str]
    # Drafts from the history alone, in the SLM's cache: it may draft the next round
    # while this one is verified (pipelining), assuming this one is accepted whole.
    pipelines: ClassVar[bool]
    # Needs `DraftContext.hidden`; such a source also says how many elements it reads
    # (`hidden_size`), so that a hidden state of another size is refused.
    needs_hidden: ClassVar[bool]

    def draft(self, context: DraftContext, shape: DraftShape) -> Draft: ...


class TreeDrafter(Protocol):
    """A tree shape grown in the SLM's cache (beam, topk, chain)."""

    def draft(
        self,
        lm: EdgeLM,
        shape: DraftShape,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft: ...


def paths_to_draft(
    keep: list[int],
    tokens: dict[int, int],
    parents: dict[int, int],
    undeduplicated: int,
    best: int,
) -> Draft:
    """A deterministic Draft from node ids `keep` (parents before children); `best` is
    the node id ending the most likely path."""
    index = {node: i for i, node in enumerate(keep)}
    tree = TokenTree(
        tokens=tuple(tokens[n] for n in keep),
        parents=tuple(index[parents[n]] if parents[n] >= 0 else -1 for n in keep),
    )
    main = tuple(index[n] for n in [*ancestors(best, parents), best])
    return Draft(
        tree=tree,
        dists={},
        node_ids=tuple(keep),
        undeduplicated=undeduplicated,
        main_path=main,
    )


def ancestors(node: int, parents: dict[int, int]) -> list[int]:
    """Ids from the top of the tree down to `node`'s parent."""
    path = []
    node = parents[node]
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def get_drafter(kind: TreeKind) -> TreeDrafter:
    from edge_node.drafters.beam import BeamDrafter
    from edge_node.drafters.chain import ChainDrafter
    from edge_node.drafters.topk import TopKDrafter

    drafters: dict[str, TreeDrafter] = {
        "beam": BeamDrafter(),
        "topk": TopKDrafter(),
        "chain": ChainDrafter(),
    }
    if kind not in drafters:
        raise ValueError(f"draft.tree: must be one of {sorted(drafters)}, got {kind!r}")
    return drafters[kind]
