"""The edge runtime's own request type and drafting configuration. What it streams
back (`Chunk`, `GenerationStats`) and `Mode` are the protocol's (`protocol.types`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from edge_node.drafters.sources import check_setting
from lm.sampling import SamplingParams
from protocol.types import Mode, Schedule

# How the verifier sends hidden states for the head (lm/hidden_codec.py).
HiddenWire = Literal["float16", "int8"]


@dataclass(frozen=True)
class DraftConfig:
    """How this edge drafts: its defaults, which a request's `DraftOptions` (tree, width,
    depth) override."""

    tree: str = "beam"  # "beam", "topk" or "chain"
    width: int = 4
    depth: int = 6
    # Let the shape policy change width and depth per session (edge_node/policy.py).
    adapt: bool = True
    # Draft the next round while this one is verified, assuming it is accepted whole
    # (greedy only: a sampled bonus token cannot be predicted; SLM drafts only: the head
    # needs the reply's hidden state).
    pipeline: bool = True
    # Who drafts lossless rounds: a draft source's name (edge_node/drafters/sources.py:
    # the SLM, the recurrent head on the target's hidden state, n-gram lookup) or "auto",
    # a per-session choice (edge_node/drafter_choice.py). Lossless mode only: edge_only,
    # adaptive and offline continuation always use the SLM.
    drafter: str = "slm"
    hidden_encoding: HiddenWire = "float16"

    def __post_init__(self) -> None:
        check_setting(self.drafter)
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
    # Generate past the model's end-of-sequence tokens (GenerateOptions.ignore_eos).
    ignore_eos: bool = False
    draft: DraftConfig = DraftConfig()
    # Adaptive mode: keep the edge's own token when its probability is at least this.
    adaptive_threshold: float = 0.9
    # Seconds the whole generation may take; None = no deadline.
    timeout_s: float | None = None
    request_id: str = ""
    schedule: Schedule = Schedule()
