"""What crosses the edge's boundaries (gRPC service, Ray actor): frozen dataclasses."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, get_args

from lm.sampling import SamplingParams


class Mode(enum.Enum):
    LOSSLESS = "lossless"
    ADAPTIVE = "adaptive"
    EDGE_ONLY = "edge_only"
    CLOUD_ONLY = "cloud_only"

    @property
    def uses_cloud(self) -> bool:
        return self is not Mode.EDGE_ONLY

    @property
    def drafts(self) -> bool:
        return self in (Mode.LOSSLESS, Mode.ADAPTIVE)


# Who drafts lossless rounds: the edge's small LM, the recurrent draft head on the
# target's hidden state (ReDrafter), or a per-session choice between them
# (edge_node/drafter_choice.py).
DrafterSetting = Literal["slm", "head", "auto"]
# How the verifier sends hidden states for the head (lm/hidden_codec.py).
HiddenWire = Literal["float16", "int8"]


@dataclass(frozen=True)
class DraftOptions:
    tree: str = "beam"  # "beam", "topk" or "chain"
    width: int = 4
    depth: int = 6
    # Let the shape policy change width and depth per session (edge_node/policy.py).
    adapt: bool = True
    # Draft the next round while this one is verified, assuming it is accepted whole
    # (greedy only: a sampled bonus token cannot be predicted; SLM drafts only: the head
    # needs the reply's hidden state).
    pipeline: bool = True
    # Lossless mode only: edge_only, adaptive and offline continuation always use the SLM,
    # since no verifier state exists there.
    drafter: DrafterSetting = "slm"
    hidden_encoding: HiddenWire = "float16"

    def __post_init__(self) -> None:
        if self.drafter not in get_args(DrafterSetting):
            raise ValueError(
                f"drafter: must be one of {list(get_args(DrafterSetting))}, got {self.drafter!r}"
            )
        if self.hidden_encoding not in get_args(HiddenWire):
            raise ValueError(
                f"hidden_encoding: must be one of {list(get_args(HiddenWire))}, "
                f"got {self.hidden_encoding!r}"
            )


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    mode: Mode = Mode.LOSSLESS
    stop: tuple[str, ...] = ()
    draft: DraftOptions = DraftOptions()
    # Adaptive mode: keep the edge's own token when its probability is at least this.
    adaptive_threshold: float = 0.9
    # Seconds the whole generation may take; None = no deadline.
    timeout_s: float | None = None
    request_id: str = ""


@dataclass(frozen=True)
class Rollback:
    """Keep the first `keep_tokens` output tokens and `keep_chars` characters."""

    keep_tokens: int
    keep_chars: int


@dataclass(frozen=True)
class GenerationStats:
    rounds: int = 0
    tokens_per_round: float = 0.0
    cloud_forward_passes: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    bytes_to_cloud: int = 0
    bytes_from_cloud: int = 0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    degraded: bool = False
    failovers: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()
    rollbacks: int = 0
    # Tree nodes the prefix deduplication saved against sending every beam whole.
    dedup_saved_tokens: int = 0
    draft_ms: float = 0.0
    # Rounds whose draft was made while the previous round was verified, and used.
    pipelined_rounds: int = 0
    # Rounds drafted by the recurrent head rather than the SLM.
    head_rounds: int = 0


@dataclass(frozen=True)
class Chunk:
    tokens: tuple[int, ...] = ()
    text: str = ""
    verified: bool = True
    rollback: Rollback | None = None
    finish_reason: str | None = None  # "length" or "stop" on the final chunk
    stats: GenerationStats | None = None
