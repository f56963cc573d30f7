"""Drafts of every shape at every point of a recorded greedy generation, made once, so that
emulated edges can draft the shape their policy picks each round without running a model.

A recording (recording.py) holds the trees one real edge drafted where its own rounds
began. An edge whose shape policy follows the verifier's load begins its rounds elsewhere
and asks for other shapes. Under greedy verification the output does not depend on the
trees (lossless), so any edge's round begins at some position j of one token sequence,
the recorded output: the history is the prompt and output[:j]. The book runs the real
SLM's beam search (`BeamDrafter.grow`) at every such position, for every width up to
`max_width`, as deep as the policy may go at that width (`depth_for`), and keeps every
level, since the search cut after d levels is the depth-d search. Replayed against a
verifier, a booked tree gets exactly the acceptance the real drafter's tree would get.
It also keeps the SLM's median drafting time per level at each width, which an emulated
edge waits instead of drafting.

Sampled generations cannot be booked: their output, and so every later history, depends on
the trees.

A book file is JSON: {"format": FORMAT, "source", "max_width", "max_depth", "max_nodes",
"level_ms": {width: ms}, "requests": [{"prompt_index", "output", "output_tokens",
"positions": [[[tokens, parents, levels, greedy] per width] per position]}]}, each
growth's four lists as `BeamGrowth` names them.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_node.drafters import Draft, DraftShape
from edge_node.drafters.beam import BeamDrafter, BeamGrowth
from edge_node.slm import EdgeLM, cache_len
from lm.model import Transformer
from lm.tree import TokenTree
from orchestrator.loadtest.recording import RecordedRequest, Recording, read_document

FORMAT = "edgecloud-draft-book/1"


@dataclass(frozen=True)
class BookedRequest:
    prompt_index: int
    output: tuple[int, ...]  # the recorded generation's tokens (its last round's included)
    output_tokens: int  # of which the generation kept this many
    # positions[j][w - 1]: the width-w beam search after the prompt and output[:j].
    positions: tuple[tuple[BeamGrowth, ...], ...]


@dataclass(frozen=True)
class DraftBook:
    requests: tuple[BookedRequest, ...]  # one per recorded request, in its order
    max_width: int
    max_depth: int
    max_nodes: int  # width * depth never exceeds it (the verifier's max_tree_nodes)
    level_ms: dict[int, float]  # width -> the SLM's median drafting ms per level
    source: str = ""

    def depth_for(self, width: int) -> int:
        """The deepest level booked at `width`."""
        return min(self.max_depth, self.max_nodes // width)

    def check(self, shape: DraftShape) -> None:
        """ValueError, naming the field and what the book holds, unless it holds `shape`."""
        if not 1 <= shape.width <= self.max_width:
            raise ValueError(f"width: the book holds 1..{self.max_width}, got {shape.width}")
        if shape.depth > self.depth_for(shape.width):
            raise ValueError(
                f"depth: the book holds 1..{self.depth_for(shape.width)} at width "
                f"{shape.width}, got {shape.depth}"
            )

    def draft(self, request: int, position: int, shape: DraftShape) -> Draft:
        """What the SLM drafts in `shape` after request `request`'s prompt and the first
        `position` tokens of its output."""
        self.check(shape)
        return self.requests[request].positions[position][shape.width - 1].draft(shape.depth)

    def fits(self, recording: Recording) -> bool:
        """Whether this book was made from `recording`'s generations."""
        return [(r.prompt_index, r.output_tokens) for r in self.requests] == [
            (r.prompt_index, r.output_tokens) for r in recording.requests
        ] and all(
            b.output == tuple(_output(r))
            for b, r in zip(self.requests, recording.requests, strict=True)
        )

    def draft_ms(self, shape: DraftShape | None) -> float:
        """The SLM's drafting time for `shape`; 0 for a plain round (no draft)."""
        return 0.0 if shape is None else self.level_ms[shape.width] * shape.depth


def expected_round(tree: TokenTree, output: Sequence[int], position: int) -> tuple[int, ...] | None:
    """The tree indices a greedy verifier accepts from `tree` drafted after `position`
    tokens of `output` (the longest root path matching output[position:]), followed by
    the bonus token; None when the path reaches past `output`, which then cannot tell."""
    path, node = [], -1
    while True:
        at = position + len(path)
        if at >= len(output):
            return None
        child = next(
            (c for c in tree.children(node) if tree.tokens[c] == output[at]),
            None,
        )
        if child is None:
            return (*path, output[at])
        path.append(child)
        node = child


def make_book(
    draft: Transformer,
    recording: Recording,
    *,
    max_width: int = 8,
    max_depth: int = 12,
    max_nodes: int = 64,
    source: str = "",
) -> DraftBook:
    """Books `draft` (the SLM the recording's edge ran) at every position of every recorded
    greedy generation. Defaults are the edge's shape policy's limits and the verifier's
    default max_tree_nodes. Costs sum over widths of depth_for(width) one-level SLM passes
    per position."""
    if recording.key.temperature != 0:
        raise ValueError(
            "recording: a draft book needs a greedy recording; a sampled output depends on "
            f"the trees drafted (got temperature {recording.key.temperature:g})"
        )
    if not 1 <= max_width <= 16 or not 1 <= max_depth <= 32 or max_nodes < max_width:
        raise ValueError(
            f"max_width, max_depth, max_nodes: need 1..16, 1..32 and >= max_width, "
            f"got {max_width}, {max_depth}, {max_nodes}"
        )
    drafter, per_level = BeamDrafter(), {w: [] for w in range(1, max_width + 1)}
    requests = []
    for recorded in recording.requests:
        requests.append(
            _book_request(drafter, draft, recorded, max_width, max_depth, max_nodes, per_level)
        )
    return DraftBook(
        requests=tuple(requests),
        max_width=max_width,
        max_depth=max_depth,
        max_nodes=max_nodes,
        level_ms={w: statistics.median(ms) for w, ms in per_level.items()},
        source=source,
    )


def _book_request(
    drafter: BeamDrafter,
    draft: Transformer,
    recorded: RecordedRequest,
    max_width: int,
    max_depth: int,
    max_nodes: int,
    per_level: dict[int, list[float]],
) -> BookedRequest:
    """One generation booked; each growth's ms per level is added to `per_level`."""
    prompt = list(recorded.open.open.context)
    output = _output(recorded)
    lm = EdgeLM(
        draft,
        cache_len(len(prompt), len(output), max_nodes, draft.config.max_seq_len),
    )
    lm.reset(prompt)
    positions = []
    for j in range(recorded.output_tokens):
        growths = []
        for width in range(1, max_width + 1):
            depth = min(max_depth, max_nodes // width)
            start = time.perf_counter()
            growths.append(drafter.grow(lm, DraftShape(width, depth)))
            per_level[width].append((time.perf_counter() - start) * 1000 / depth)
        positions.append(tuple(growths))
        lm.append([output[j]])
    return BookedRequest(
        prompt_index=recorded.prompt_index,
        output=tuple(output),
        output_tokens=recorded.output_tokens,
        positions=tuple(positions),
    )


def _output(recorded: RecordedRequest) -> list[int]:
    return [t for r in recorded.rounds for t in (*r.result.accepted_tokens, r.result.bonus_token)]


# ---- the file --------------------------------------------------------------------


def save_book(path: Path, book: DraftBook) -> None:
    document = {
        "format": FORMAT,
        "source": book.source,
        "max_width": book.max_width,
        "max_depth": book.max_depth,
        "max_nodes": book.max_nodes,
        "level_ms": {str(w): ms for w, ms in book.level_ms.items()},
        "requests": [
            {
                "prompt_index": r.prompt_index,
                "output": list(r.output),
                "output_tokens": r.output_tokens,
                "positions": [
                    [[g.tokens, g.parents, g.levels, g.greedy] for g in growths]
                    for growths in r.positions
                ],
            }
            for r in book.requests
        ],
    }
    Path(path).write_text(json.dumps(document, separators=(",", ":")) + "\n")


def load_book(path: Path) -> DraftBook | None:
    """The book in `path`; None when there is none. ValueError when it is not a book."""
    document = read_document(path, FORMAT, "a draft book")
    if document is None:
        return None
    try:
        return _book_from_json(document)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{Path(path).name}: not a draft book ({exc!r})") from None


def _book_from_json(document: dict) -> DraftBook:
    return DraftBook(
        requests=tuple(
            BookedRequest(
                prompt_index=r["prompt_index"],
                output=tuple(r["output"]),
                output_tokens=r["output_tokens"],
                positions=tuple(
                    tuple(BeamGrowth(*(tuple(part) for part in g)) for g in growths)
                    for growths in r["positions"]
                ),
            )
            for r in document["requests"]
        ),
        max_width=document["max_width"],
        max_depth=document["max_depth"],
        max_nodes=document["max_nodes"],
        level_ms={int(w): ms for w, ms in document["level_ms"].items()},
        source=document["source"],
    )
