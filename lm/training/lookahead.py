"""Teacher-forced lookahead windows: what a draft head (`lm.draft_head`) reads and must match
when it is trained or measured on text the target has read.

From a start p the head reads the target's hidden state h = hidden[b, p] and is teacher-forced
over the next `depth` tokens; its step k must match the target's output at position p + k.
Vectorised: every start of every row forms one batch of the (tiny) head.
"""

from __future__ import annotations

import torch


def lookahead_starts(batch: int, time: int, depth: int, stride: int = 1) -> torch.Tensor:
    """Start positions (batch, n) of drafts of `depth` tokens in texts of `time` tokens: row b
    uses p = b % stride + stride * j for the n values of j that keep p + depth < time in
    every row.  With stride > 1 the rows of a batch cover every offset between them.

    Example: batch 2, time 8, depth 2, stride 2 -> [[0, 2, 4], [1, 3, 5]].
    """
    if not 1 <= depth < time:
        raise ValueError(f"depth: must be in [1, {time}), got {depth}")
    if not 1 <= stride <= time - depth:
        raise ValueError(f"stride: must be in [1, {time - depth}], got {stride}")
    n = (time - depth - stride) // stride + 1
    return torch.arange(batch)[:, None] % stride + stride * torch.arange(n)[None]


def lookahead_inputs(
    hidden: torch.Tensor, tokens: torch.Tensor, depth: int, stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head sees when drafting `depth` tokens from the `lookahead_starts` p of a text
    the target read: h = hidden[b, p] and the teacher-forced tokens[b, p + 1 .. p + depth].

    hidden: (B, T, hidden_size) the target's hidden states over tokens (B, T).
    Returns h (B * n, hidden_size) and inputs (B * n, depth), start-major within each row.
    Head logits k then predict tokens[b, p + k + 2], which is what the target's output at
    position p + k + 1 predicts (`lookahead_targets`).

    Example: tokens [[a, b, c, d]], depth 2 -> starts 0, 1 with inputs [b, c] and [c, d]; the
    head's logits for [b, c] are compared with the target's outputs at positions 1 and 2.
    """
    batch, time = tokens.shape
    starts = lookahead_starts(batch, time, depth, stride).to(tokens.device)
    rows = torch.arange(batch, device=tokens.device)[:, None]
    inputs = tokens[:, 1:].unfold(1, depth, 1)[rows, starts]  # (B, n, depth)
    return hidden[rows, starts].flatten(0, 1), inputs.flatten(0, 1)


def lookahead_targets(target_out: torch.Tensor, depth: int, stride: int = 1) -> torch.Tensor:
    """The target's outputs that `lookahead_inputs`' rows must match: for start p, those at
    positions p + 1 .. p + depth.  target_out: (B, T, ...) -> (B * n, depth, ...)."""
    batch, time = target_out.shape[:2]
    starts = lookahead_starts(batch, time, depth, stride).to(target_out.device)
    rows = torch.arange(batch, device=target_out.device)[:, None]
    windows = target_out[:, 1:].unfold(1, depth, 1)[rows, starts]  # (B, n, ..., depth)
    return windows.movedim(-1, 2).flatten(0, 1)
