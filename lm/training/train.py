"""Training loop shared by `edgecloud train` (next-token loss) and `edgecloud distill` (KL loss).

One loop, two losses: `run_training` knows nothing about where batches come from or what the loss
is; it owns AdamW, the cosine schedule, gradient clipping, progress reports and checkpoint/resume.
Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would have.

`train_language_model` is the whole `edgecloud train` recipe on top of it: byte-level BPE, a
Llama-family model with a ReLU MLP (the flash store relies on its activation sparsity), and an
HF-format directory (config.json, model.safetensors, tokenizer.json) that transformers also loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lm.checkpoint import save_model
from lm.config import ModelConfig
from lm.device import default_device
from lm.errors import CheckpointError
from lm.model import Transformer
from lm.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer
from lm.training import bpe, corpus
from lm.training.evaluate import perplexity

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint/state.pt"
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for one run.

    steps: optimizer steps; each sees batch_size windows of `context` tokens.
    lr: peak learning rate, reached after `warmup_steps` linear steps, then cosine down to
        lr * min_lr_ratio at the last step.
    checkpoint_every: steps between checkpoints (the last step always checkpoints).
    """

    steps: int
    batch_size: int
    context: int
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "context", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be > 0, got {self.grad_clip}")


@dataclass(frozen=True)
class Progress:
    """One progress report; `loss` is the mean over the steps since the previous report.

    first_step: where this process started (0, or the step it resumed at); elapsed_s counts
    from then, so the ETA extrapolates this process's own pace.
    """

    step: int
    steps: int
    first_step: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float

    @property
    def eta_s(self) -> float:
        done = self.step - self.first_step
        return self.elapsed_s / done * (self.steps - self.step) if done else 0.0

    def line(self) -> str:
        return (
            f"step {self.step}/{self.steps} loss {self.loss:.4f} lr {self.lr:.2e} "
            f"{self.tokens_per_s:,.0f} tok/s elapsed {format_seconds(self.elapsed_s)} "
            f"eta {format_seconds(self.eta_s)}"
        )


@dataclass(frozen=True)
class TrainResult:
    """What a run did: the loss after each step (all steps, resumed ones included) and the time
    spent in this process (a resumed run counts only its own part)."""

    losses: tuple[float, ...]
    seconds: float
    tokens_per_s: float


def format_seconds(seconds: float) -> str:
    """Example: format_seconds(3725.4) -> "1:02:05"."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def cosine_lr(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay.

    Example: lr=1e-3, warmup_steps=10, steps=111, min_lr_ratio=0.1 gives 1e-4 at step 0,
    1e-3 at steps 9 and 10, 5.5e-4 halfway through the decay (step 60), 1e-4 at step 110.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def init_weights(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init: normal(0, std) for every matrix, with the projections that write into the
    residual stream (attention output, MLP down) scaled by 1/sqrt(2 * n_layers) so the residual
    variance does not grow with depth.  Norm weights and biases keep their defaults."""
    residual_std = std / math.sqrt(2 * n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue
            is_residual = name.endswith(("wo.weight", "down.weight"))
            param.normal_(0.0, residual_std if is_residual else std)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The RNG that draws the batch of `step`: a pure function of (seed, step), so resuming
    reproduces the batches exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1].

    batch: (batch, time + 1) token ids.
    """
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def run_training(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batch_fn: Callable[[int], torch.Tensor],
    config: TrainConfig,
    checkpoint_path: Path,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> TrainResult:
    """Train `model` in place for `config.steps` steps, resuming from `checkpoint_path` if present.

    batch_fn(step) -> (batch, time) token ids (on the model's device) for that step.
    loss_fn(model, batch) -> scalar loss.
    The checkpoint holds the model and optimizer state, the step and the loss history; it is
    written to a temporary file and renamed, so a kill mid-write leaves the previous one intact.
    """
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    losses: list[float] = []
    start = 0
    if checkpoint_path.exists():
        start, losses = _load_checkpoint(checkpoint_path, model, optimizer)
        logger.info("resuming from %s at step %d", checkpoint_path, start)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    began = last_report = time.perf_counter()
    tokens = tokens_since_report = 0
    for step in range(start, config.steps):
        lr = cosine_lr(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_fn(step)
        with autocast:
            loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        tokens_since_report += batch.numel()
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_checkpoint(checkpoint_path, model, optimizer, done, losses)
        if progress is not None and (done % config.log_every == 0 or done == config.steps):
            now = time.perf_counter()
            recent = losses[-(done - max(start, done - config.log_every)) :]
            progress(
                Progress(
                    step=done,
                    steps=config.steps,
                    first_step=start,
                    loss=sum(recent) / len(recent),
                    lr=lr,
                    tokens_per_s=tokens_since_report / max(now - last_report, 1e-9),
                    elapsed_s=now - began,
                )
            )
            tokens += tokens_since_report
            tokens_since_report, last_report = 0, now
    model.eval()
    seconds = time.perf_counter() - began
    tokens += tokens_since_report
    return TrainResult(tuple(losses), seconds, tokens / seconds if seconds > 0 else 0.0)


def _save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, losses: list[float]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "losses": losses,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, list[float]]:
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: saved model does not match the requested one (delete it to start over): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["losses"])


@dataclass(frozen=True)
class ModelShape:
    """The size of a model to train; vocab_size comes from the tokenizer.

    dim: residual width; hidden_dim: MLP width (ReLU, gated); n_kv_heads < n_heads is GQA.
    """

    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    hidden_dim: int = 768
    tie_embeddings: bool = True

    def model_config(
        self, vocab_size: int, context: int, bos: int | None, eos: int | None
    ) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            hidden_dim=self.hidden_dim,
            max_seq_len=context,
            tie_embeddings=self.tie_embeddings,
            activation="relu",
            bos_token_id=bos,
            eos_token_id=eos,
        )


def load_split_streams(
    split: corpus.CorpusSplit, tokenizer: Tokenizer, frame: corpus.DocumentFrame
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokenize and pack the training and held-out files: ((n_train,), (n_heldout,) or None).

    Documents are encoded without the tokenizer's post-processor (a Llama-style one adds a
    BOS): `frame` alone puts the special tokens around them.
    """
    streams = []
    for part in ("train", "heldout"):
        paths = split.paths(part)
        if not paths:
            streams.append(None)
            continue
        documents = tokenizer.encode_batch(corpus.read_texts(paths), add_special_tokens=False)
        streams.append(corpus.pack(documents, frame.bos, frame.eos))
    return streams[0], streams[1]


def save_pretrained(
    model: Transformer, tokenizer_source: Path, out_dir: Path, save_dtype: torch.dtype
) -> None:
    """HF directory: config.json + model.safetensors in `save_dtype`, and the tokenizer of
    `tokenizer_source`: a model directory's tokenizer files copied byte for byte (so a draft
    and its target share one file), or a `.gguf` file's tokenizer written out by
    `Tokenizer.save`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(copy.deepcopy(model).to(dtype=save_dtype, device="cpu"), out_dir)
    if tokenizer_source.suffix == ".gguf" and tokenizer_source.is_file():
        Tokenizer.from_gguf(tokenizer_source).save(out_dir)
    elif tokenizer_source.resolve() != out_dir.resolve():
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            if (tokenizer_source / name).is_file():
                (out_dir / name).write_bytes((tokenizer_source / name).read_bytes())


def train_language_model(
    split: corpus.CorpusSplit,
    out_dir: str | Path,
    shape: ModelShape,
    config: TrainConfig,
    *,
    vocab_size: int = 4096,
    device: torch.device | None = None,
    save_dtype: torch.dtype = torch.float32,
    progress: Callable[[Progress], None] | None = None,
) -> dict:
    """The `edgecloud train` recipe; returns the summary also written to OUT/training.json.

    A run that finds OUT/checkpoint/state.pt (and OUT/tokenizer.json) resumes from it.
    """
    out_dir = Path(out_dir)
    device = default_device() if device is None else device
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if not (checkpoint_path.exists() and Tokenizer.found_in(out_dir)):
        began = time.perf_counter()
        trained = bpe.train_bpe(corpus.read_texts(split.paths("train")), vocab_size)
        bpe.save_tokenizer(trained, out_dir, max_length=config.context)
        logger.info("trained tokenizer in %.1f s", time.perf_counter() - began)
    tokenizer = Tokenizer.from_dir(out_dir)
    frame = corpus.document_frame(tokenizer, out_dir)
    train_stream, heldout_stream = load_split_streams(split, tokenizer, frame)
    model_config = shape.model_config(tokenizer.vocab_size, config.context, frame.bos, frame.eos)
    torch.manual_seed(config.seed)
    model = Transformer(model_config)
    init_weights(model, model_config.n_layers)
    model.to(device)

    def batch_fn(step: int) -> torch.Tensor:
        generator = batch_generator(config.seed, step)
        windows = corpus.random_windows(
            train_stream, config.batch_size, config.context + 1, generator
        )
        return windows.to(device)

    result = run_training(
        model, next_token_loss, batch_fn, config, checkpoint_path, progress=progress
    )
    save_pretrained(model, out_dir, out_dir, save_dtype)
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(config),
        "save_dtype": str(save_dtype).removeprefix("torch."),
        "corpus_root": str(split.root),
        "train_files": len(split.train),
        "heldout_files": len(split.heldout),
        "heldout_sha256": corpus.heldout_digest(split),
        "train_tokens": train_stream.numel(),
        "first_loss": result.losses[0],
        "final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "seconds_this_process": result.seconds,
        "tokens_per_s": result.tokens_per_s,
    }
    if heldout_stream is not None and heldout_stream.numel() > config.context:
        windows = corpus.sequential_windows(heldout_stream, config.context, limit=256)
        summary["heldout_perplexity"] = perplexity(model, windows).perplexity
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
