"""Held-out quality of a model, and of a draft against its target.

- perplexity: exp of the mean next-token cross-entropy over held-out windows.
- greedy agreement: the fraction of positions where the draft's argmax equals the target's,
  both reading the same (teacher-forced) text.
- chain acceptance: what greedy speculative decoding with a draft chain actually gets.  From a
  prompt, the draft proposes L tokens greedily and the target accepts the longest prefix that
  matches its own greedy choices.  While a chain is being accepted its tokens *are* the target's
  greedy continuation g_1..g_L, so the draft's token j is accepted, given tokens 1..j-1 were,
  iff argmax draft(prompt, g_1..g_{j-1}) == g_j: one target generation of L tokens and one
  teacher-forced draft forward per prompt measure every chain length at once.
  a_j = P(token j accepted | tokens 1..j-1 accepted), and the expected tokens per target
  forward pass with chains of length L is tau(L) = 1 + sum_{k=1..L} prod_{j<=k} a_j (the 1 is
  the target's bonus token).
- draft head (lm.draft_head): the same measures, shifted by one.  The head reads the target's
  hidden state at the last accepted position p and the bonus token b = g_1 the target chose
  there, so its token j proposes g_{j+1}.  Its lookahead agreement at step k is the fraction of
  positions p of held-out text where, teacher-forced on the true tokens p+1 .. p+k, the head's
  k-th argmax equals the target's argmax at p+k.  With beams (`HeadDraft` trees), a prompt
  accepts the longest tree path that matches the target's greedy continuation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lm.draft_head import DraftHead, extend_beams
from lm.errors import CheckpointError
from lm.model import Transformer
from lm.sampling import SamplingParams, probs_from_logits, sample
from lm.training.corpus import sequential_windows
from lm.training.lookahead import lookahead_inputs, lookahead_targets
from lm.tree import TokenTree

GREEDY = SamplingParams()


@dataclass(frozen=True)
class Perplexity:
    """perplexity = exp(nll); nll in nats per token over `tokens` predicted tokens."""

    perplexity: float
    nll: float
    tokens: int
    tokens_per_s: float


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> Perplexity:
    """Perplexity of `model` predicting windows[:, 1:] from windows[:, :-1].

    windows: (n, time) token ids.  tokens_per_s counts the tokens fed through the forward pass.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_nll, count, fed = 0.0, 0, 0
    began = time.perf_counter()
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch[:, :-1]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
        fed += batch[:, :-1].numel()
    seconds = time.perf_counter() - began
    model.train(was_training)
    nll = total_nll / count
    return Perplexity(math.exp(nll), nll, count, fed / seconds if seconds > 0 else 0.0)


@torch.no_grad()
def greedy_agreement(
    target: nn.Module, draft: nn.Module, windows: torch.Tensor, batch_size: int = 16
) -> float:
    """Fraction of positions where argmax draft == argmax target on the same text.

    windows: (n, time) token ids; every one of the n * time positions counts.
    """
    matches, count = 0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        target_top = target(batch.to(_device_of(target))).argmax(-1).cpu()
        draft_top = draft(batch.to(_device_of(draft))).argmax(-1).cpu()
        matches += int((target_top == draft_top).sum())
        count += batch.numel()
    return matches / count


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: torch.Tensor,
    new_tokens: int,
    *,
    params: SamplingParams = GREEDY,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each prompt by `new_tokens` tokens, drawn as `params` says (default greedy).

    prompts: (n, prompt_len) token ids, all the same length.  Returns (n, new_tokens).
    Uses a KV cache, so each step runs the model on one token per row.  `generator` (on the
    model's device) makes sampling reproducible.
    """
    model.eval()
    rows = list(range(prompts.shape[0]))
    cache = model.new_cache(len(rows), prompts.shape[1] + new_tokens)
    inputs = prompts.to(_device_of(model))
    out = []
    for _ in range(new_tokens):
        logits = model(inputs, cache=cache, rows=rows)[:, -1].float()
        for row in rows:
            cache.commit(row, range(inputs.shape[1]))
        if params.greedy:
            inputs = logits.argmax(-1, keepdim=True)
        else:
            inputs = sample(probs_from_logits(logits, params), generator)[:, None]
        out.append(inputs)
    return torch.cat(out, dim=1).cpu()


@torch.no_grad()
def chain_matches(
    target: nn.Module, draft: nn.Module, prompts: torch.Tensor, max_len: int = 8
) -> torch.Tensor:
    """Whether the draft's greedy token j equals the target's, along the target's greedy
    continuation of each prompt (see the module docstring).

    prompts: (n, prompt_len).  Returns matches: (n, max_len) bool.
    """
    return draft_chain_matches(draft, prompts, generate(target, prompts, max_len))


@torch.no_grad()
def draft_chain_matches(
    draft: nn.Module, prompts: torch.Tensor, continuation: torch.Tensor
) -> torch.Tensor:
    """chain_matches for a given greedy continuation (n, L) of prompts (n, prompt_len): one
    teacher-forced draft forward.  Returns (n, L) bool."""
    text = torch.cat([prompts, continuation], dim=1)[:, :-1]
    draft_top = draft(text.to(_device_of(draft))).argmax(-1).cpu()
    return draft_top[:, prompts.shape[1] - 1 :] == continuation


def acceptance_rates(matches: torch.Tensor) -> list[float]:
    """Per-position acceptance a_1..a_L of greedy chains from `chain_matches` flags (n, L).

    a_j is the number of prompts whose first j draft tokens all match over the number whose
    first j - 1 do (nan when that is zero): a chain stops at its first mismatch.

    Example: three prompts matching as [1, 1, 0], [1, 0, 1] and [0, 1, 1] accept prefixes of
    2, 1 and 0 tokens: a_1 = 2/3, a_2 = 1/2, a_3 = 0/1.
    """
    accepted_prefix = matches.long().cumprod(dim=1).sum(dim=0).tolist()  # prompts accepting >= j
    reached = [matches.shape[0], *accepted_prefix[:-1]]
    return [a / r if r else math.nan for a, r in zip(accepted_prefix, reached, strict=True)]


def expected_tau(acceptance: Sequence[float]) -> list[float]:
    """tau(L) for L = 1..len(acceptance): expected tokens per target pass with chains of length L.

    Example: acceptance [0.8, 0.5] -> [1.8, 2.2] (1 + 0.8, then + 0.8 * 0.5).
    """
    taus, survive, tau = [], 1.0, 1.0
    for rate in acceptance:
        survive *= 0.0 if math.isnan(rate) else rate
        tau += survive
        taus.append(tau)
    return taus


@torch.no_grad()
def decode_tokens_per_s(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3
) -> float:
    """Greedy decoding speed of one sequence (batch 1, KV cache): what an edge device sees.

    prompt: (1, prompt_len).  Decodes fewer tokens if the model's max_seq_len is shorter.
    The best of `repeats` runs, so that a busy shared machine disturbs the figure less.
    """
    new_tokens = min(new_tokens, model.config.max_seq_len - prompt.shape[1])
    generate(model, prompt, 2)  # warm-up: first-call allocations
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        generate(model, prompt, new_tokens)
        best = min(best, time.perf_counter() - began)
    return new_tokens / best


def check_pair(target_dir: str | Path, draft_dir: str | Path, target_vocab: int, draft_vocab: int):
    """Raise CheckpointError (one line, naming the path and field) if a draft cannot serve a
    target: different vocab_size or a different tokenizer.json."""
    if draft_vocab != target_vocab:
        raise CheckpointError(
            f"{Path(draft_dir) / 'config.json'}: vocab_size {draft_vocab} differs from the "
            f"target's {target_vocab} ({Path(target_dir) / 'config.json'})"
        )
    target_tok, draft_tok = Path(target_dir) / "tokenizer.json", Path(draft_dir) / "tokenizer.json"
    if (
        draft_tok.exists()
        and target_tok.exists()
        and draft_tok.read_bytes() != target_tok.read_bytes()
    ):
        raise CheckpointError(f"{draft_tok}: tokenizer differs from the target's {target_tok}")


@dataclass(frozen=True)
class PairReport:
    """Held-out figures of a target/draft pair.

    acceptance: a_1..a_L of greedy chains; tau: tau(1)..tau(L) computed from it.
    """

    target: Perplexity
    draft: Perplexity
    agreement: float
    acceptance: tuple[float, ...]
    tau: tuple[float, ...]
    chains: int

    def as_dict(self) -> dict:
        return {
            "target_perplexity": self.target.perplexity,
            "draft_perplexity": self.draft.perplexity,
            "greedy_agreement": self.agreement,
            "chain_acceptance": list(self.acceptance),
            "expected_tau": list(self.tau),
            "chains": self.chains,
        }


def spaced_prompts(stream: torch.Tensor, count: int, prompt_len: int) -> torch.Tensor:
    """`count` prompts of `prompt_len` tokens at evenly spaced offsets of `stream`, leaving room
    for a continuation after each.  Returns (count, prompt_len)."""
    last = stream.numel() - prompt_len - 1
    if last < 0:
        raise ValueError(f"prompt_len: {prompt_len} is longer than the {stream.numel()} tokens")
    starts = torch.linspace(0, last, count).long().tolist()
    return torch.stack([stream[s : s + prompt_len] for s in starts])


def evaluate_pair(
    target: nn.Module,
    draft: nn.Module,
    stream: torch.Tensor,
    context: int,
    *,
    windows: int | None = None,
    chains: int = 256,
    prompt_len: int = 64,
    max_len: int = 8,
    batch_size: int = 16,
) -> PairReport:
    """Perplexities, greedy agreement and chain acceptance on a held-out token stream.

    stream: (total,) held-out tokens; perplexity and agreement use up to `windows` windows of
    `context` tokens; acceptance uses `chains` prompts of `prompt_len` tokens.
    """
    limit = target.config.max_seq_len
    if prompt_len + max_len > limit:
        raise ValueError(
            f"prompt_len: {prompt_len} + max_len {max_len} exceeds the model's max_seq_len {limit}"
        )
    text = sequential_windows(stream, context, limit=windows)
    prompts = spaced_prompts(stream, chains, prompt_len)
    matches = [chain_matches(target, draft, batch, max_len) for batch in prompts.split(64)]
    acceptance = acceptance_rates(torch.cat(matches))
    return PairReport(
        target=perplexity(target, text, batch_size),
        draft=perplexity(draft, text, batch_size),
        agreement=greedy_agreement(target, draft, text, batch_size),
        acceptance=tuple(acceptance),
        tau=tuple(expected_tau(acceptance)),
        chains=chains,
    )


@torch.no_grad()
def head_lookahead_agreement(
    target: nn.Module, head: DraftHead, windows: torch.Tensor, depth: int, batch_size: int = 2
) -> list[float]:
    """Teacher-forced agreement of the head's k-th token with the target's argmax, k = 1..depth.

    windows: (n, time) held-out text; every start p with p + depth < time counts.
    """
    matches, count = torch.zeros(depth), 0
    for batch in windows.split(batch_size):
        batch = batch.to(_device_of(target))
        logits, hidden = target(batch, return_hidden=True)
        h, inputs = lookahead_inputs(hidden, batch, depth)
        wanted = lookahead_targets(logits.argmax(-1), depth)  # (starts, depth)
        head_top = head(h.to(_device_of(head)), inputs.to(_device_of(head))).argmax(-1)
        matches += (head_top.cpu() == wanted.cpu()).sum(0)
        count += len(inputs)
    return (matches / count).tolist()


@torch.no_grad()
def head_prompt_state(
    target: nn.Module, prompts: torch.Tensor, depth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's hidden state after each prompt, and its greedy continuation g_1..g_{depth+1}
    (g_1 is the bonus token the head starts from): ((n, dim), (n, depth + 1))."""
    _, hidden = target(prompts.to(_device_of(target)), return_hidden=True)
    return hidden[:, -1].cpu(), generate(target, prompts, depth + 1)


@torch.no_grad()
def head_chain_matches(
    head: DraftHead, hidden: torch.Tensor, continuation: torch.Tensor
) -> torch.Tensor:
    """Whether the head's greedy token j equals g_{j+1}, along the target's greedy
    continuation.  hidden: (n, dim); continuation: (n, depth + 1).  Returns (n, depth) bool."""
    device = _device_of(head)
    head_top = head(hidden.to(device), continuation[:, :-1].to(device)).argmax(-1).cpu()
    return head_top == continuation[:, 1:]


def accepted_length(tree: TokenTree, wanted: list[int]) -> int:
    """How many of `wanted` (the target's greedy continuation) a greedy verifier accepts from
    `tree`: the length of the longest root path whose tokens are a prefix of `wanted`.

    Example: tree from beams [[5, 7, 9], [5, 2]] accepts 2 of [5, 7, 1] and 0 of [2].
    """
    node, length = -1, 0
    for token in wanted:
        node = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
        if node is None:
            break
        length += 1
    return length


def head_tree_matches(
    head: DraftHead, hidden: torch.Tensor, continuation: torch.Tensor, width: int
) -> torch.Tensor:
    """Like head_chain_matches, for beam-search trees of `width` beams: row i holds True for
    the first `accepted` positions, where `accepted` is the longest tree path matching
    g_2, g_3, ... (what a greedy verifier accepts).  Returns (n, depth) bool."""
    depth = continuation.shape[1] - 1
    accepted = [
        accepted_length(head.beam_search(h, wanted[0], width=width, depth=depth).tree, wanted[1:])
        for h, wanted in zip(hidden, continuation.tolist(), strict=True)
    ]
    return torch.arange(depth)[None] < torch.tensor(accepted)[:, None]


@torch.no_grad()
def draft_tree_matches(
    draft: nn.Module, prompts: torch.Tensor, continuation: torch.Tensor, width: int
) -> torch.Tensor:
    """The SLM draft's counterpart of head_tree_matches: beam search over the draft (full
    forwards, no cache; the same greedy-keeping beams as the edge's beam drafter) from each
    prompt, matched against g_1..g_depth.  prompts: (n, prompt_len); continuation: (n, depth).
    Returns (n, depth) bool."""
    depth = continuation.shape[1]
    device = _device_of(draft)
    accepted = []
    for prompt, wanted in zip(prompts.to(device), continuation.tolist(), strict=True):
        beams = torch.zeros(1, 0, dtype=torch.long, device=device)
        scores, greedy = torch.zeros(1, device=device), 0
        for _ in range(depth):
            text = torch.cat([prompt.expand(len(beams), -1), beams], dim=1)
            logprobs = F.log_softmax(draft(text)[:, -1].float(), dim=-1)
            _, beams, scores, greedy = extend_beams(beams, scores, greedy, logprobs, width)
        accepted.append(accepted_length(TokenTree.from_beams(beams.tolist()), wanted))
    return torch.arange(depth)[None] < torch.tensor(accepted)[:, None]


@dataclass(frozen=True)
class HeadReport:
    """Held-out figures of a draft head against its target, and of the SLM draft on the same
    prompts when one was given (its fields empty otherwise).

    lookahead_agreement: teacher-forced agreement at k = 1..depth; chain_acceptance / chain_tau:
    greedy chains; tree_acceptance / tree_tau: beam trees of `width` beams.
    """

    lookahead_agreement: tuple[float, ...]
    chain_acceptance: tuple[float, ...]
    chain_tau: tuple[float, ...]
    tree_acceptance: tuple[float, ...]
    tree_tau: tuple[float, ...]
    width: int
    chains: int
    draft_chain_acceptance: tuple[float, ...] = ()
    draft_chain_tau: tuple[float, ...] = ()
    draft_tree_acceptance: tuple[float, ...] = ()
    draft_tree_tau: tuple[float, ...] = ()

    def as_dict(self) -> dict:
        figures = {
            "head_lookahead_agreement": list(self.lookahead_agreement),
            "head_chain_acceptance": list(self.chain_acceptance),
            "head_chain_tau": list(self.chain_tau),
            "head_tree_acceptance": list(self.tree_acceptance),
            "head_tree_tau": list(self.tree_tau),
            "head_width": self.width,
            "head_chains": self.chains,
        }
        if self.draft_chain_acceptance:
            figures.update(
                slm_chain_acceptance=list(self.draft_chain_acceptance),
                slm_chain_tau=list(self.draft_chain_tau),
                slm_tree_acceptance=list(self.draft_tree_acceptance),
                slm_tree_tau=list(self.draft_tree_tau),
            )
        return figures


def evaluate_head(
    target: nn.Module,
    head: DraftHead,
    stream: torch.Tensor,
    context: int,
    *,
    draft: nn.Module | None = None,
    windows: int | None = None,
    chains: int = 256,
    prompt_len: int = 64,
    depth: int = 6,
    width: int = 4,
) -> HeadReport:
    """Lookahead agreement, chain and tree acceptance of a head on a held-out token stream, and
    the SLM `draft`'s chain and tree acceptance on the same prompts when given.

    stream: (total,) held-out tokens; agreement uses up to `windows` windows of `context` tokens;
    acceptance uses `chains` prompts of `prompt_len` tokens and drafts of `depth` tokens.
    """
    limit = target.config.max_seq_len
    if prompt_len + depth + 1 > limit:
        raise ValueError(
            f"prompt_len: {prompt_len} + depth {depth} + 1 exceeds the model's max_seq_len {limit}"
        )
    text = sequential_windows(stream, context, limit=windows)
    prompts = spaced_prompts(stream, chains, prompt_len)
    found: dict[str, list[torch.Tensor]] = {"chain": [], "tree": [], "slm": [], "slm_tree": []}
    for batch in prompts.split(64):
        hidden, continuation = head_prompt_state(target, batch, depth)
        found["chain"].append(head_chain_matches(head, hidden, continuation))
        found["tree"].append(head_tree_matches(head, hidden, continuation, width))
        if draft is not None:
            wanted = continuation[:, :-1]  # the SLM drafts g_1..g_depth
            found["slm"].append(draft_chain_matches(draft, batch, wanted))
            found["slm_tree"].append(draft_tree_matches(draft, batch, wanted, width))
    rates = {name: acceptance_rates(torch.cat(m)) if m else [] for name, m in found.items()}
    return HeadReport(
        lookahead_agreement=tuple(head_lookahead_agreement(target, head, text, depth)),
        chain_acceptance=tuple(rates["chain"]),
        chain_tau=tuple(expected_tau(rates["chain"])),
        tree_acceptance=tuple(rates["tree"]),
        tree_tau=tuple(expected_tau(rates["tree"])),
        width=width,
        chains=chains,
        draft_chain_acceptance=tuple(rates["slm"]),
        draft_chain_tau=tuple(expected_tau(rates["slm"])),
        draft_tree_acceptance=tuple(rates["slm_tree"]),
        draft_tree_tau=tuple(expected_tau(rates["slm_tree"])),
    )
