"""Verifier settings, validated once at start-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from cloud_node.scheduling import make_policy

# `--batch-invariant` on the command line: VerifierConfig.batch_invariant per choice.
BATCH_INVARIANT_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
# `--attention`: VerifierConfig.attention.
ATTENTION_KERNELS = ("sdpa", "flex")
# Sessions without `max_sessions` or `kv_cache_gb`, and the most either may give.
DEFAULT_SESSIONS = 32
MAX_SESSIONS = 4096


@dataclass(frozen=True)
class VerifierConfig:
    # Name clients must send in `open.model`; usually the model directory's name.
    model_name: str
    # Concurrent sessions; each owns one preallocated KV-cache row of max_context +
    # round_room positions. None: as many as `kv_cache_gb` holds, else DEFAULT_SESSIONS.
    max_sessions: int | None = None
    # Most committed tokens a session may hold (prompt plus generated). None: as many as
    # the model's max_seq_len leaves room for after one round's pending entries.
    max_context: int | None = None
    # KV-cache budget in GB (10^9 bytes). The context stays max_context and the budget
    # sets the sessions: floor(budget / bytes per session), at most MAX_SESSIONS, where a
    # session takes (max_context + round_room) x 2 x layers x KV heads x head dim x dtype
    # size (less where sliding-window layers keep a ring, `lm.kv_cache.row_bytes`).
    # Refused when not even one session fits, or fewer than max_sessions when both are
    # given. None: no budget; max_sessions alone decides.
    kv_cache_gb: float | None = None
    # Most draft nodes in one round; also caps `round.new_tokens`.
    max_tree_nodes: int = 64
    # A session idle this long is freed; its next round gets FAILED_PRECONDITION.
    session_ttl_s: float = 120.0
    # How long the first round of a batch waits for rounds of other live sessions.
    batch_window_ms: float = 3.0
    # Most sessions verified in one forward pass.
    max_batch: int = 16
    # Context tokens prefilled per forward pass when a session opens.
    prefill_chunk: int = 256
    # Compute every position the same way whatever the pass holds (Transformer.
    # batch_invariant), so greedy lossless equals greedy cloud_only token for token in
    # half precision on CPU. None: on for float16/bfloat16 models on CPU, else off (CUDA
    # GEMMs are not row-invariant, so attention alone would not make the promise true).
    batch_invariant: bool | None = None
    # How waiting rounds are ordered into passes (cloud_node/scheduling.py): "slack"
    # serves first the sessions closest to missing their tpot_slo_ms (with no targets
    # set, first come first served, aged); "fifo" in arrival order.
    schedule: str = "slack"
    # The attention kernel of tree passes (Transformer.flex_attention): "sdpa" with a
    # dense mask, or "flex", FlexAttention block masks (compiled on CUDA; lm/flex.py).
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        checks = {
            "max_sessions": (self.max_sessions, 1, MAX_SESSIONS),
            "kv_cache_gb": (self.kv_cache_gb, 1e-6, 1e6),
            "max_tree_nodes": (self.max_tree_nodes, 1, 4096),
            "session_ttl_s": (self.session_ttl_s, 0.01, 86400.0),
            "batch_window_ms": (self.batch_window_ms, 0.0, 1000.0),
            "max_batch": (self.max_batch, 1, 1024),
            "prefill_chunk": (self.prefill_chunk, 1, 1 << 16),
        }
        for name, (value, low, high) in checks.items():
            if value is not None and not low <= value <= high:
                raise ValueError(f"{name}: must be in [{low}, {high}], got {value}")
        if self.max_context is not None and not 2 <= self.max_context <= 1 << 20:
            raise ValueError(f"max_context: must be in [2, {1 << 20}], got {self.max_context}")
        if not self.model_name:
            raise ValueError("model_name: must be non-empty")
        make_policy(self.schedule)  # raises naming the field
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(
                f"attention: must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}"
            )

    @property
    def round_room(self) -> int:
        """Cache positions a round may need past the committed context: new tokens and
        tree nodes, padded to the batch's longest, plus the pending bonus token."""
        return 2 * self.max_tree_nodes + 2

    def for_model(self, max_seq_len: int, row_bytes: Callable[[int], int]) -> VerifierConfig:
        """This config with `max_context` resolved against the model's max_seq_len, then
        `max_sessions` against `kv_cache_gb`; `row_bytes(positions)`: what a session's
        cache row of that many positions takes (`lm.kv_cache.row_bytes` of the model and
        its dtype). Resolving a resolved config changes nothing."""
        resolved = replace(self, max_context=self._context(max_seq_len))
        return replace(resolved, max_sessions=resolved._sessions(row_bytes))

    def _context(self, max_seq_len: int) -> int:
        room = max_seq_len - self.round_room
        if self.max_context is None:
            if room < 2:
                raise ValueError(
                    f"max_tree_nodes: {self.max_tree_nodes} leaves no room for context in "
                    f"the model's {max_seq_len} positions"
                )
            return room
        if self.max_context > room:
            raise ValueError(
                f"max_context: at most {room} for this model (max_seq_len {max_seq_len} "
                f"minus {self.round_room} for one round), got {self.max_context}"
            )
        return self.max_context

    def _sessions(self, row_bytes: Callable[[int], int]) -> int:
        """Example: 256 bytes a position (2 layers, 2 KV heads x 8, float32) and a
        context of 382 plus 130 for a round: 131072 bytes a session; 0.001 GB holds 7."""
        if self.kv_cache_gb is None:
            return self.max_sessions or DEFAULT_SESSIONS
        positions = self.max_context + self.round_room
        per_session = row_bytes(positions)
        fits = min(round(self.kv_cache_gb * 1e9) // per_session, MAX_SESSIONS)
        need = f"a session takes {per_session / 1e9:.6g} GB ({positions} positions)"
        if fits < 1:
            raise ValueError(
                f"kv_cache_gb: {self.kv_cache_gb} GB holds no session; {need}: raise "
                "kv_cache_gb or lower max_context"
            )
        if self.max_sessions is not None and self.max_sessions > fits:
            raise ValueError(
                f"kv_cache_gb: {self.kv_cache_gb} GB holds {fits} sessions, max_sessions asks "
                f"for {self.max_sessions}; {need}"
            )
        return self.max_sessions or fits
