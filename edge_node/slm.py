"""The edge's small model: its full token history, and a one-row KV cache that
drafts grow into and that acceptance compacts, so nothing is computed twice.

Cache layout while drafting (one row)::

    | history: tokens[0 : base] | draft nodes, level by level |
      committed context           committed too, but each node sees only the history
                                  and its own ancestors (a full attention mask)

After the verifier answers, `accept` keeps the entries of the accepted nodes (moved
to `base`, `base + 1`, ...) and drops the rest; the bonus token and any accepted node
that was never forwarded (the deepest level is proposed from its parent's logits,
not forwarded) are simply pending: `tokens[cached:]`.

The cache holds what one generation can use (`cache_len`): its prompt, its output and
the draft reserve, not the model's whole context, and it is allocated at the first
forward pass, so a generation that never runs the SLM (cloud_only) allocates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm.kv_cache import KVCache
from lm.model import Transformer


def draft_reserve(max_tree_nodes: int) -> int:
    """Cache positions drafting needs past the history: one round's tree, and the next
    one's, drafted in the spare row while the first is verified (pipelining). The
    verifier reserves as much (`VerifierConfig.round_room`)."""
    return 2 * (max_tree_nodes + 1)


def cache_len(prompt: int, max_tokens: int, max_tree_nodes: int, max_seq_len: int) -> int:
    """Cache positions a generation can use: `prompt` tokens, `max_tokens` more, and the
    draft reserve past them; never more than the model's `max_seq_len`.

    While the output is not done the history holds at most prompt + max_tokens - 1
    tokens; a pipelined draft adds the assumed path, the assumed bonus token and the next
    tree (at most 2 * max_tree_nodes + 1 entries), so the reserve covers it.
    Example: a 20-token prompt, max_tokens 100 and 64-node trees need 20 + 100 + 130 =
    250 positions; the model's 8192 would take 33x the memory.
    """
    return min(prompt + max_tokens + draft_reserve(max_tree_nodes), max_seq_len)


class EdgeLM:
    """One generation's view of the SLM. Not thread-safe: one generation at a time.

    `spare()` gives a second view on another row of the same cache, into which `fork`
    copies this one's state plus an assumed continuation: the edge drafts the next
    round there while the current round is being verified.
    """

    def __init__(
        self,
        model: Transformer,
        max_len: int | None = None,
        *,
        cache: KVCache | None = None,
        row: int = 0,
    ) -> None:
        """max_len: cache positions (`cache_len`), in [1, max_seq_len]; default the
        model's max_seq_len. `cache`, `row`: another view's, for `spare`."""
        limit = model.config.max_seq_len
        if max_len is not None and not 1 <= max_len <= limit:
            raise ValueError(f"max_len: must be in [1, {limit}], got {max_len}")
        self.model = model
        self.device = next(model.parameters()).device
        self.max_len = limit if max_len is None else max_len
        self._cache = cache  # allocated by the first use of `cache`
        self.row = row
        self.tokens: list[int] = []
        # Cache entries [0, base) hold tokens[:base]; draft entries follow.
        self._base = 0
        # node id -> cache position of draft nodes forwarded since the last accept/reset.
        self._draft_positions: dict[int, int] = {}

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def cache(self) -> KVCache:
        """Both views' K/V, (n_layers, 2, n_kv_heads, max_len, head_dim) each; allocated
        here on first use (in the worker thread that first forwards, for a generation)."""
        if self._cache is None:
            # First use is often inside a forward's inference mode; made there, the buffers
            # would refuse the in-place moves `accept` and `truncate` make outside it.
            with torch.inference_mode(False):
                # window_slack = max_len: no ring on sliding-window layers. The edge
                # rolls back as far as adaptive mode's catch-up needs, past any slack.
                self._cache = self.model.new_cache(2, self.max_len, window_slack=self.max_len)
        return self._cache

    def spare(self) -> EdgeLM:
        """A view on the other cache row, for `fork`."""
        return EdgeLM(self.model, self.max_len, cache=self.cache, row=1 - self.row)

    def fork(self, into: EdgeLM, tokens: Sequence[int], nodes: Sequence[int]) -> None:
        """Makes `into` this history plus `tokens`, as if `accept(tokens, nodes)` had
        happened here, without changing this view."""
        kept = []
        for node in nodes:
            if node not in self._draft_positions:
                break
            kept.append(self._draft_positions[node])
        self.cache.copy_row(self.row, into.row, [*range(self._base), *kept])
        into.tokens = [*self.tokens, *tokens]
        into._base = self._base + len(kept)
        into._draft_positions = {}

    def reset(self, tokens: Sequence[int]) -> None:
        if not tokens:
            raise ValueError("tokens: must hold at least one token")
        if len(tokens) >= self.max_len:
            raise ValueError(f"tokens: at most {self.max_len - 1} tokens, got {len(tokens)}")
        if self._cache is not None:
            self._cache.reset(self.row)
        self.tokens = list(tokens)
        self._draft_positions = {}
        self._base = 0

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """Logits (vocab,) for the token after the history; forwards what is pending.

        Drops any draft entries first, then caches the whole history.
        """
        self._drop_drafts()
        if self._base == len(self.tokens):  # all cached: recompute the last token's logits
            self._base -= 1
            self.cache.rollback(self.row, self._base)
        pending = self.tokens[self._base :]
        ids = torch.tensor([pending], device=self.device)
        logits = self.model(ids, cache=self.cache, rows=[self.row])
        self.cache.commit(self.row, range(len(pending)))
        self._base = self.cache.lengths[self.row]
        return logits[0, -1]

    @torch.inference_mode()
    def forward_nodes(
        self, nodes: Sequence[int], tokens: Sequence[int], ancestors: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Forwards draft nodes below the history; returns their logits (len(nodes), vocab).

        nodes: ids the caller gives these nodes; tokens: their tokens; ancestors[i]: the
        ids of node i's ancestors (already forwarded), root first. Node i sits at position
        base + len(ancestors[i]) and attends to the history, its ancestors and itself.
        """
        if self._base != len(self.tokens):
            raise RuntimeError("forward_nodes: call next_logits() first")
        start = self.cache.lengths[self.row]
        n = len(nodes)
        if start + n > self.max_len:
            raise ValueError(f"nodes: {n} more draft nodes exceed the cache ({self.max_len})")
        mask = torch.zeros(1, n, start + n, dtype=torch.bool)
        mask[0, :, : self._base] = True
        for i, path in enumerate(ancestors):
            mask[0, i, [self._draft_positions[a] for a in path]] = True
            mask[0, i, start + i] = True
        positions = torch.tensor([[self._base + len(path) for path in ancestors]])
        logits = self.model(
            torch.tensor([list(tokens)], device=self.device),
            cache=self.cache,
            rows=[self.row],
            positions=positions.to(self.device),
            cache_mask=mask.to(self.device),
        )
        self.cache.commit(self.row, range(n))
        for i, node in enumerate(nodes):
            self._draft_positions[node] = start + i
        return logits[0]

    def accept(self, tokens: Sequence[int], nodes: Sequence[int]) -> None:
        """Appends verified tokens. `nodes` are the draft node ids of the accepted path
        (a prefix of `tokens`); the cached ones keep their keys and values."""
        kept = []
        for node in nodes:
            if node not in self._draft_positions:
                break
            kept.append(self._draft_positions[node])
        if self._cache is not None:  # else no drafts to drop: other sources drafted
            self._cache.keep(self.row, self._base, kept)
        self._base += len(kept)
        self._draft_positions = {}
        self.tokens.extend(tokens)

    def append(self, tokens: Sequence[int]) -> None:
        """Appends tokens with no draft state to reuse (cloud-only steps, edge samples)."""
        self._drop_drafts()
        self.tokens.extend(tokens)

    def truncate(self, length: int) -> None:
        """Forgets every token after the first `length` (a rollback of unverified output)."""
        if not 1 <= length <= len(self.tokens):
            raise ValueError(f"length: must be in [1, {len(self.tokens)}], got {length}")
        self._drop_drafts()
        self.tokens = self.tokens[:length]
        if self._cache is not None:  # nothing is cached before the first forward
            self._cache.rollback(self.row, min(self._cache.lengths[self.row], length))
            self._base = self._cache.lengths[self.row]

    def _drop_drafts(self) -> None:
        if self._draft_positions:
            self.cache.rollback(self.row, self._base)
            self._draft_positions = {}
