"""Knowledge distillation of a recurrent draft head from its target (`edgecloud distill --head`).

ReDrafter (Cheng et al. 2024, arXiv 2403.09919) trains its head to match the target's
distributions several tokens ahead, on the corpus and on text the target generated itself.  Per
batch (the same mix of corpus windows and target-generated sequences as `lm.training.distill`):

1. the frozen target reads each window once, giving its final-norm hidden state h_p and its
   next-token distribution at every position p;
2. from every start p (vectorised: all starts of all windows form one batch of the tiny head),
   the head reads h_p and is teacher-forced over the next `lookahead` tokens p+1 .. p+K;
3. the loss is the forward KL(p_target(. | x_<=p+k) || q_head,k), averaged over starts and k.

The head starts from the target where it can: its embedding is a copy of the target's and stays
frozen (the edge needs that copy, and keeping it equal to the target's keeps tokens the head
rarely sees during a short run where the target put them); its output matrix lm_head starts as
the target's output matrix (trained), and `out` starts by passing h through, so the untrained
head already speaks the target's output space.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lm.draft_head import DraftHead, DraftHeadConfig, save_head
from lm.model import Transformer
from lm.training import corpus
from lm.training.distill import (
    DistillConfig,
    distill_loss,
    load_or_generate_pool,
    load_target,
    mixed_batches,
    run_summary,
)
from lm.training.evaluate import evaluate_head
from lm.training.lookahead import lookahead_inputs, lookahead_targets
from lm.training.train import Progress, TrainConfig, load_split_streams, run_training

logger = logging.getLogger(__name__)

SUMMARY_FILE = "head_distill.json"


@dataclass(frozen=True)
class HeadShape:
    """The head's size; vocab_size and hidden_size come from the target.

    lookahead: tokens the head is teacher-forced over from each start (the K in the loss); it
        should cover the draft depth used at inference.
    start_stride: every start_stride-th position of a window is a start (offset by the row,
        see lm.training.lookahead.lookahead_starts).  The target is cheap next to the head's
        vocabulary projection over every start and step, so a batch of more windows with fewer
        starts each sees more varied contexts for the same work.
    """

    state_size: int = 256
    n_blocks: int = 2
    lookahead: int = 6
    start_stride: int = 4

    def __post_init__(self) -> None:
        for name in ("lookahead", "start_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    def head_config(self, target: Transformer) -> DraftHeadConfig:
        return DraftHeadConfig(
            vocab_size=target.config.vocab_size,
            hidden_size=target.config.dim,
            state_size=self.state_size,
            n_blocks=self.n_blocks,
        )


def init_from_target(head: DraftHead, target: Transformer) -> None:
    """Copy the target's embedding (then frozen) and output matrix into the head, and make `out`
    pass h through ([I | 0]), so that a fresh head's logits are the target's at position p."""
    hidden = head.config.hidden_size
    with torch.no_grad():
        head.embedding.weight.copy_(target.tok_embeddings.weight)
        head.lm_head.weight.copy_(target.output.weight)
        head.out.weight.zero_()
        head.out.weight[:, :hidden].copy_(torch.eye(hidden))
    head.embedding.weight.requires_grad_(False)


def head_loss(
    head: nn.Module, target: Transformer, batch: torch.Tensor, lookahead: int, stride: int = 1
) -> torch.Tensor:
    """Mean KL(target || head) over the start positions of `batch` and `lookahead` steps.

    batch: (B, T) token ids; the target runs once over it (no gradient), the head over the
    starts of lm.training.lookahead.lookahead_starts(B, T, lookahead, stride), `lookahead` tokens
    each.
    """
    with torch.no_grad():
        target_logits, hidden = target(batch, return_hidden=True)
    h, inputs = lookahead_inputs(hidden, batch, lookahead, stride)
    wanted = lookahead_targets(target_logits, lookahead, stride)
    return distill_loss(head(h, inputs), wanted)


def distill_head(
    target_dir: str | Path,
    split: corpus.CorpusSplit,
    out_dir: str | Path,
    shape: HeadShape,
    config: TrainConfig,
    distill: DistillConfig,
    *,
    device: torch.device,
    save_dtype: torch.dtype = torch.float32,
    progress: Callable[[Progress], None] | None = None,
) -> dict:
    """The `edgecloud distill --head` recipe; returns the summary also written to
    OUT/head_distill.json.  OUT gets head_config.json + head.safetensors.

    Resumes from OUT/checkpoint/ (state.pt and the generated pool) when present.
    """
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    target, tokenizer = load_target(target_dir, device, config.context)
    if shape.lookahead + shape.start_stride > config.context:
        raise ValueError(
            f"lookahead: lookahead {shape.lookahead} + start_stride {shape.start_stride} must "
            f"be <= context {config.context}"
        )
    frame = corpus.document_frame(tokenizer, target_dir)
    train_stream, heldout_stream = load_split_streams(split, tokenizer, frame)
    pool = load_or_generate_pool(target, train_stream, out_dir, config, distill)
    torch.manual_seed(config.seed)
    head = DraftHead(shape.head_config(target))
    init_from_target(head, target)
    head.to(device)
    batch_fn = mixed_batches(pool, train_stream, config, distill, device)

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return head_loss(model, target, batch, shape.lookahead, shape.start_stride)

    result = run_training(
        head, loss_fn, batch_fn, config, out_dir / "checkpoint" / "state.pt", progress=progress
    )
    save_head(head, out_dir, save_dtype)
    summary = {
        "parameters": sum(p.numel() for p in head.parameters()),
        "trained_parameters": sum(p.numel() for p in head.parameters() if p.requires_grad),
        "head_config": head.config.to_dict(),
        "head_shape": dataclasses.asdict(shape),
        **run_summary(target_dir, target, config, distill, save_dtype, split, result),
    }
    if heldout_stream is not None and heldout_stream.numel() > config.context:
        report = evaluate_head(
            target,
            head,
            heldout_stream,
            config.context,
            windows=16,
            chains=64,
            prompt_len=min(64, config.context // 2),
            depth=min(shape.lookahead, config.context // 2 - 1),
        )
        summary.update(report.as_dict())
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
