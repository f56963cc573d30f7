"""Turns verification protos into checked, typed requests.

Every check names the field that failed and the allowed range, and raises
`InvalidRequest`; the service maps that to INVALID_ARGUMENT. Nothing here touches
the model or a session, so a bad message can never disturb another session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cloud_node.config import VerifierConfig
from lm.acceptance import DraftDistribution, check_draft
from lm.hidden_codec import HiddenEncoding
from lm.sampling import SamplingParams
from lm.tree import TokenTree, TreeError
from protocol.errors import InvalidRequest
from protocol.types import Schedule
from protocol.v1 import verification_pb2 as pb
from protocol.validation import check_sampling, check_schedule


@dataclass(frozen=True)
class OpenRequest:
    session_id: str
    context: tuple[int, ...]
    sampling: SamplingParams
    # Encoding of the hidden state each reply carries; NONE: no hidden state.
    return_hidden: HiddenEncoding = HiddenEncoding.NONE
    schedule: Schedule = Schedule()


@dataclass(frozen=True)
class RoundRequest:
    new_tokens: tuple[int, ...]
    tree: TokenTree
    # Keyed by the node whose children were drawn from it (-1: the last context token).
    draft: dict[int, DraftDistribution]
    round_id: int
    # Tokens the verifier decodes on its own after this round (Round.decode_tokens).
    decode_tokens: int = 0
    # One of those tokens: made by the engine's `decode`, not sent by the client.
    decode_step: bool = False


def check_tokens(field: str, tokens: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    for i, token in enumerate(tokens):
        if not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"{field}[{i}]: token id must be in [0, {vocab_size}), got {token}"
            )
    return tuple(tokens)


def parse_sampling(field: str, msg: pb.SamplingParams, vocab_size: int) -> SamplingParams:
    seed = msg.seed if msg.HasField("seed") else None
    check_sampling(
        msg.temperature, msg.top_k, msg.top_p, seed, vocab_size=vocab_size, prefix=f"{field}."
    )
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.top_p > 0 else 1.0,
        seed=seed,
    )


def parse_open(msg: pb.OpenSession, config: VerifierConfig, vocab_size: int) -> OpenRequest:
    if msg.model != config.model_name:
        raise InvalidRequest(
            f"open.model: this verifier serves {config.model_name!r}, got {msg.model!r}"
        )
    if not msg.context:
        raise InvalidRequest("open.context: must hold at least one token")
    if len(msg.context) >= config.max_context:  # no room left for a single token
        raise InvalidRequest(
            f"open.context: at most {config.max_context - 1} tokens (--max-context "
            f"{config.max_context}, one left for the next token), got {len(msg.context)}"
        )
    if len(msg.session_id) > 128:
        raise InvalidRequest(f"open.session_id: at most 128 characters, got {len(msg.session_id)}")
    if msg.return_hidden not in set(HiddenEncoding):
        raise InvalidRequest(
            f"open.return_hidden: must be one of {[int(e) for e in HiddenEncoding]} "
            f"(HiddenEncoding), got {msg.return_hidden}"
        )
    return OpenRequest(
        session_id=msg.session_id,
        context=check_tokens("open.context", msg.context, vocab_size),
        sampling=parse_sampling("open.sampling", msg.sampling, vocab_size),
        return_hidden=HiddenEncoding(msg.return_hidden),
        schedule=parse_schedule(msg),
    )


def parse_schedule(msg: pb.OpenSession) -> Schedule:
    check_schedule(msg.priority, msg.tpot_slo_ms, prefix="open.")
    return Schedule(msg.priority, msg.tpot_slo_ms)


def parse_round(msg: pb.Round, config: VerifierConfig, vocab_size: int) -> RoundRequest:
    limit = config.max_tree_nodes
    if len(msg.new_tokens) > limit:
        raise InvalidRequest(
            f"round.new_tokens: at most {limit} tokens (--max-tree-nodes), "
            f"got {len(msg.new_tokens)}"
        )
    if len(msg.tree.tokens) > limit:
        raise InvalidRequest(
            f"round.tree.tokens: at most {limit} nodes (--max-tree-nodes), "
            f"got {len(msg.tree.tokens)}"
        )
    if not 0 <= msg.decode_tokens <= config.max_context:
        raise InvalidRequest(
            f"round.decode_tokens: must be in [0, {config.max_context}] (--max-context), "
            f"got {msg.decode_tokens}"
        )
    tokens = check_tokens("round.tree.tokens", msg.tree.tokens, vocab_size)
    try:
        tree = TokenTree(tokens=tokens, parents=tuple(msg.tree.parents))
    except TreeError as exc:
        raise InvalidRequest(f"round.tree.{exc}") from exc
    return RoundRequest(
        new_tokens=check_tokens("round.new_tokens", msg.new_tokens, vocab_size),
        tree=tree,
        draft=parse_draft(msg.draft_dists, tree, vocab_size),
        round_id=msg.round_id,
        decode_tokens=msg.decode_tokens,
    )


def parse_draft(
    dists: Sequence[pb.DraftDistribution], tree: TokenTree, vocab_size: int
) -> dict[int, DraftDistribution]:
    draft: dict[int, DraftDistribution] = {}
    for i, msg in enumerate(dists):
        field = f"round.draft_dists[{i}]"
        if not -1 <= msg.node < tree.size:
            raise InvalidRequest(f"{field}.node: must be in [-1, {tree.size}), got {msg.node}")
        if msg.node in draft:
            raise InvalidRequest(f"{field}.node: node {msg.node} has two distributions")
        if len(msg.tokens) != len(msg.probs) or not msg.tokens:
            raise InvalidRequest(
                f"{field}: tokens and probs must be non-empty and of equal length, "
                f"got {len(msg.tokens)} and {len(msg.probs)}"
            )
        if len(msg.tokens) > vocab_size:
            raise InvalidRequest(f"{field}.tokens: at most {vocab_size} entries")
        try:
            draft[msg.node] = DraftDistribution(
                node=msg.node,
                tokens=check_tokens(f"{field}.tokens", msg.tokens, vocab_size),
                probs=tuple(msg.probs),
            )
            check_draft(tree, {msg.node: draft[msg.node]}, vocab_size)
        except ValueError as exc:
            raise InvalidRequest(f"{field}: {exc}") from exc
    return draft
