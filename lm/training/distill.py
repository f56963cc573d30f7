"""Knowledge distillation of a small draft model from its target (`edgecloud distill`).

Recipe from ReDrafter (Cheng et al. 2024, "Recurrent Drafter for Fast Speculative Decoding in
Large Language Models", arXiv 2403.09919, section on distillation): a draft is worth exactly as
much as its tokens are accepted, and acceptance depends on matching the *target's* distribution,
not the corpus's.  So the draft is trained

- on soft targets: the loss is the forward KL divergence KL(p_target || q_draft) of the next-token
  distributions at every position, not cross-entropy against the corpus token; and
- on target-generated data as well as the corpus: a pool of sequences the target wrote itself
  (corpus prompts continued by sampling from the target at `temperature`), which is the text the
  draft will be asked to predict at inference.  Each batch mixes the two.

The draft shares the target's tokenizer: the same tokenizer.json bytes are copied next to it,
or, for a `.gguf` target, the tokenizer the file holds is written there.  Corpus documents are
framed by `corpus.document_frame` of that tokenizer, whatever its special tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lm.checkpoint import load_model
from lm.errors import CheckpointError
from lm.model import Transformer
from lm.sampling import SamplingParams
from lm.tokenizer import Tokenizer
from lm.training import corpus
from lm.training.evaluate import evaluate_pair, generate
from lm.training.train import (
    ModelShape,
    Progress,
    TrainConfig,
    TrainResult,
    batch_generator,
    init_weights,
    load_split_streams,
    run_training,
    save_pretrained,
)

logger = logging.getLogger(__name__)

GENERATED_FILE = "checkpoint/generated.pt"
DRAFT_SHAPE = ModelShape(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=352)


@dataclass(frozen=True)
class DistillConfig:
    """What the draft learns from, besides the optimisation settings in TrainConfig.

    generated_fraction: share of each batch's rows drawn from the target-generated pool.
    pool_size: target-generated sequences, drawn once before training and reused.
    prompt_len: corpus tokens that start each generated sequence.
    temperature: the target's sampling temperature when generating; 1 = its own distribution.
    generate_batch: sequences generated per batched decoding run.
    """

    generated_fraction: float = 0.5
    pool_size: int = 512
    prompt_len: int = 32
    temperature: float = 1.0
    generate_batch: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.generated_fraction <= 1:
            raise ValueError(
                f"generated_fraction: must be in [0, 1], got {self.generated_fraction}"
            )
        for name in ("pool_size", "prompt_len", "generate_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")


def distill_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_target || q_draft), summed over the vocabulary, averaged over positions.

    draft_logits, target_logits: (batch, time, vocab).  Zero iff the distributions are equal;
    its gradient wrt the draft logits is q_draft - p_target.
    """
    log_q = F.log_softmax(draft_logits.float().flatten(0, 1), dim=-1)
    log_p = F.log_softmax(target_logits.float().flatten(0, 1), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def generate_pool(
    target: nn.Module,
    stream: torch.Tensor,
    length: int,
    config: DistillConfig,
    seed: int,
) -> torch.Tensor:
    """`config.pool_size` sequences of `length` tokens: a corpus prompt, then target samples.

    stream: (total,) corpus tokens the prompts are cut from.  Returns (pool_size, length).
    """
    if config.prompt_len >= length:
        raise ValueError(f"prompt_len: must be < the context {length}, got {config.prompt_len}")
    device = next(target.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = corpus.random_windows(
        stream, config.pool_size, config.prompt_len, torch.Generator().manual_seed(seed)
    )
    params = SamplingParams(temperature=config.temperature)
    pool = []
    for start in range(0, config.pool_size, config.generate_batch):
        batch = prompts[start : start + config.generate_batch]
        continuation = generate(
            target, batch, length - config.prompt_len, params=params, generator=generator
        )
        pool.append(torch.cat([batch, continuation], dim=1))
    return torch.cat(pool)


def load_or_generate_pool(
    target: nn.Module,
    train_stream: torch.Tensor,
    out_dir: Path,
    config: TrainConfig,
    distill: DistillConfig,
) -> torch.Tensor:
    """The target-generated pool (pool_size, context): OUT/checkpoint/generated.pt when present
    (a resumed run), otherwise generated by `generate_pool` and saved there."""
    pool_path = out_dir / GENERATED_FILE
    if pool_path.exists():
        return torch.load(pool_path, weights_only=True)
    began = time.perf_counter()
    pool = generate_pool(target, train_stream, config.context, distill, config.seed)
    pool_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pool, pool_path)
    logger.info("generated %d target sequences in %.1f s", len(pool), time.perf_counter() - began)
    return pool


def mixed_batches(
    pool: torch.Tensor,
    train_stream: torch.Tensor,
    config: TrainConfig,
    distill: DistillConfig,
    device: torch.device,
) -> Callable[[int], torch.Tensor]:
    """batch_fn(step) -> (batch_size, context) on `device`: generated_fraction of the rows from
    the pool, the rest random corpus windows, a pure function of (seed, step)."""
    n_generated = round(config.batch_size * distill.generated_fraction)

    def batch_fn(step: int) -> torch.Tensor:
        generator = batch_generator(config.seed, step)
        rows = torch.randint(0, pool.shape[0], (n_generated,), generator=generator)
        windows = corpus.random_windows(
            train_stream, config.batch_size - n_generated, config.context, generator
        )
        return torch.cat([pool[rows], windows]).to(device)

    return batch_fn


def run_summary(
    target_dir: Path,
    target: Transformer,
    config: TrainConfig,
    distill: DistillConfig,
    save_dtype: torch.dtype,
    split: corpus.CorpusSplit,
    result: TrainResult,
) -> dict:
    """What every distillation summary records besides the student itself: the teacher,
    the settings, the held-out split and how the run went."""
    return {
        "target_parameters": sum(p.numel() for p in target.parameters()),
        "target": str(target_dir),
        "train_config": dataclasses.asdict(config),
        "distill_config": dataclasses.asdict(distill),
        "save_dtype": str(save_dtype).removeprefix("torch."),
        "heldout_sha256": corpus.heldout_digest(split),
        "first_loss": result.losses[0],
        "final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "seconds_this_process": result.seconds,
        "tokens_per_s": result.tokens_per_s,
    }


def load_target(
    target_dir: str | Path, device: torch.device, context: int | None = None
) -> tuple[Transformer, Tokenizer]:
    """The target model (float32, eval mode, frozen) and its tokenizer: a model directory
    with its tokenizer.json (and optional tokenizer_config.json), or a `.gguf` file.

    Raises CheckpointError naming the file when the tokenizer is missing, and ValueError
    when training windows of `context` tokens would not fit the target.
    """
    target_dir = Path(target_dir)
    tokenizer_path = target_dir if target_dir.suffix == ".gguf" else target_dir / "tokenizer.json"
    if not target_dir.exists():
        raise CheckpointError(f"{target_dir}: target model does not exist")
    if not Tokenizer.found_in(target_dir):
        raise CheckpointError(
            f"{tokenizer_path}: missing (the model directory needs its tokenizer)"
        )
    tokenizer = Tokenizer.from_dir(target_dir)
    target = load_model(target_dir, device=device, dtype=torch.float32)
    target.requires_grad_(False)
    if tokenizer.vocab_size > target.config.vocab_size:
        raise CheckpointError(
            f"{tokenizer_path}: {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {target.config.vocab_size}"
        )
    if context is not None and context > target.config.max_seq_len:
        raise ValueError(
            f"context: must be <= the target's max_seq_len {target.config.max_seq_len}, "
            f"got {context}"
        )
    return target, tokenizer


def distill_draft(
    target_dir: str | Path,
    split: corpus.CorpusSplit,
    out_dir: str | Path,
    shape: ModelShape,
    config: TrainConfig,
    distill: DistillConfig,
    *,
    device: torch.device,
    save_dtype: torch.dtype = torch.float32,
    progress: Callable[[Progress], None] | None = None,
) -> dict:
    """The `edgecloud distill` recipe; returns the summary also written to OUT/distill.json.

    Resumes from OUT/checkpoint/ (state.pt and the generated pool) when present.
    """
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    target, tokenizer = load_target(target_dir, device, config.context)
    frame = corpus.document_frame(tokenizer, target_dir)
    train_stream, heldout_stream = load_split_streams(split, tokenizer, frame)
    pool = load_or_generate_pool(target, train_stream, out_dir, config, distill)
    # The draft stands in for the target: its config names the target's own bos/eos.
    model_config = dataclasses.replace(
        shape.model_config(
            target.config.vocab_size,
            config.context,
            target.config.bos_token_id,
            target.config.eos_token_id,
        ),
        max_seq_len=target.config.max_seq_len,
    )
    torch.manual_seed(config.seed)
    draft = Transformer(model_config)
    init_weights(draft, model_config.n_layers)
    draft.to(device)
    batch_fn = mixed_batches(pool, train_stream, config, distill, device)

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_logits = target(batch)
        return distill_loss(model(batch), target_logits)

    result = run_training(
        draft, loss_fn, batch_fn, config, out_dir / "checkpoint" / "state.pt", progress=progress
    )
    save_pretrained(draft, target_dir, out_dir, save_dtype)
    summary = {
        "parameters": sum(p.numel() for p in draft.parameters()),
        "model_config": dataclasses.asdict(model_config),
        **run_summary(target_dir, target, config, distill, save_dtype, split, result),
    }
    if heldout_stream is not None and heldout_stream.numel() > config.context:
        report = evaluate_pair(
            target,
            draft,
            heldout_stream,
            config.context,
            windows=64,
            prompt_len=min(64, config.context // 2),
        )
        summary.update(report.as_dict())
    (out_dir / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
