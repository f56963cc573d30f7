"""The draft sources an edge offers, by name: what `--drafter` and a request's
`draft.drafter` are checked against (the SDK forwards the name; only the edge knows
which exist), and the ones a session uses.

`auto` is not a source but a choice, per session, between those in `AUTO`, by
measured tokens per millisecond (`edge_node/drafter_choice.py`). Every session also
has the SLM: it drafts in modes other than lossless, and when a source cannot draft
(the head without a hidden state from the verifier).
"""

from __future__ import annotations

from collections.abc import Callable

from edge_node.drafters import (
    Draft,
    DraftContext,
    DraftShape,
    DraftSource,
    TreeKind,
    get_drafter,
)
from edge_node.drafters.head import HeadSource
from edge_node.drafters.ngram import NgramSource
from lm.draft_head import DraftHead


class SlmSource:
    name = "slm"
    pipelines = True
    needs_hidden = False

    def __init__(self, tree: TreeKind) -> None:
        self.tree = get_drafter(tree)

    def draft(self, context: DraftContext, shape: DraftShape) -> Draft:
        return self.tree.draft(context.lm, shape, context.sampling, context.generator)


class SourceUnavailable(ValueError):
    """This edge lacks what the source needs; the message says what."""


def _head(tree: TreeKind, head: DraftHead | None) -> HeadSource:
    if head is None:
        raise SourceUnavailable("needs a draft head on this edge (--head DIR)")
    return HeadSource(head)


# name -> how an edge with a tree kind and maybe a draft head builds the source.
SOURCES: dict[str, Callable[[TreeKind, DraftHead | None], DraftSource]] = {
    SlmSource.name: lambda tree, head: SlmSource(tree),
    HeadSource.name: _head,
    NgramSource.name: lambda tree, head: NgramSource(),
}
AUTO = (HeadSource.name, SlmSource.name)
SETTINGS = (*SOURCES, "auto")
FALLBACK = SlmSource.name


def check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"draft.drafter: must be one of {list(SETTINGS)}, got {setting!r}")


def needs_head(setting: str) -> bool:
    """Whether a session with `setting` may draft with the recurrent head."""
    return HeadSource.name in (AUTO if setting == "auto" else (setting,))


def make_sources(setting: str, *, tree: TreeKind, head: DraftHead | None) -> dict[str, DraftSource]:
    """The sources a session with `setting` may use, the SLM first and always among
    them; ValueError naming the field when this edge cannot offer one."""
    check_setting(setting)
    names = AUTO if setting == "auto" else (setting,)
    try:
        return {name: SOURCES[name](tree, head) for name in dict.fromkeys((FALLBACK, *names))}
    except SourceUnavailable as error:
        raise ValueError(f"draft.drafter: {setting!r} {error}") from None
