"""What every benchmark shares: the machine it ran on, a timer that syncs CUDA, percentiles,
and the one JSON object that ends each benchmark's output.

The benchmarks are scripts run as `python benchmarks/<name>.py`: Python puts this directory
on `sys.path`, so they import this module as `common`, before any project package, and
importing it puts the repository root on `sys.path` too, so the project's packages import
from this checkout whether or not (or however stale) an editable install is.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.loadtest.records import percentile

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))


def cpu_model() -> str:
    """platform.processor() is often empty on Linux; /proc/cpuinfo names the CPU."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(device: torch.device) -> dict[str, object]:
    """The facts a reader needs to compare two runs' figures."""
    info: dict[str, object] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device | None) -> None:
    """Waits for queued CUDA work, so a timer measures the work and not its launch."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    ms: float = 0.0


@contextmanager
def timed(device: torch.device | None = None) -> Iterator[Timing]:
    """Times the block in milliseconds, syncing CUDA on entry and exit.

    Works around `await` too: `with timed(device) as t: await work()`; read `t.ms` after.
    """
    timing = Timing()
    sync(device)
    start = time.perf_counter()
    try:
        yield timing
    finally:
        sync(device)
        timing.ms = (time.perf_counter() - start) * 1000


def summarize_ms(samples: Sequence[float]) -> dict[str, float]:
    """Median and p90 of millisecond samples, and how many there were."""
    return {
        "median_ms": statistics.median(samples),
        "p90_ms": percentile(samples, 90),
        "samples": len(samples),
    }


def model_summary(model: torch.nn.Module, source: str) -> dict[str, object]:
    """Where a model came from, its shape and its size, for the JSON line."""
    config = model.config
    return {
        "source": source,
        "params": sum(p.numel() for p in model.parameters()),  # float ones (norms if quantized)
        "weight_bytes": weight_bytes(model),
        "dim": config.dim,
        "layers": config.n_layers,
        "heads": config.n_heads,
        "kv_heads": config.n_kv_heads,
        "hidden": config.hidden_dim,
        "activation": config.activation,
        "vocab": config.vocab_size,
        "max_seq_len": config.max_seq_len,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights as it holds them: parameters and buffers (a quantized
    model's codes and scales), a tied tensor once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def device_flags(parser) -> None:
    """--device, --dtype and --threads, as the model benchmarks take them."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's, one per core); 1 avoids "
        "oversubscription when other jobs share the cores",
    )


def pair_flags(parser, demo_dir: Path) -> None:
    """--target and --draft (a model directory or a .gguf file; default the demo pair),
    --draft-quantize and --chat: how the benchmarks that run a target and a draft take
    them. `check_pair_paths` checks the paths after parsing."""
    parser.add_argument(
        "--target", type=Path, default=demo_dir / "target", help="target dir or .gguf file"
    )
    parser.add_argument(
        "--draft", type=Path, default=demo_dir / "draft", help="draft dir or .gguf file"
    )
    parser.add_argument(
        "--draft-quantize",
        choices=["int4", "int8"],
        help="the draft's weights as int4/int8 codes on the CPU (lm.quantized), as "
        "`edgecloud up --draft-quantize` runs them (default: not quantized)",
    )
    parser.add_argument(
        "--chat",
        type=int,
        help="prompt with this many chat questions (the target's chat template) instead of "
        "held-out code",
    )


def check_pair_paths(parser, args) -> None:
    """parser.error unless --target and --draft each hold a model."""
    for name in ("target", "draft"):
        path = getattr(args, name)
        if not ((path / "config.json").exists() or (path.suffix == ".gguf" and path.is_file())):
            parser.error(f"--{name}: no model at {path} (a model directory or a .gguf file)")


def print_json(summary: dict[str, object]) -> None:
    """The benchmark's last line: one JSON object, for scripts that collect results."""
    print(json.dumps(summary), flush=True)


@dataclass(frozen=True)
class Prompt:
    file: str  # relative to the corpus root
    tokens: tuple[int, ...]


def heldout_prompts(tokenizer, count: int, length: int) -> list[Prompt]:
    """The first `length` tokens (framed as in training: `corpus.document_frame`'s bos
    first, if the model has one) of the first `count` held-out files that are at least
    that long, in the split's sorted order. `tokenizer`: an `lm.tokenizer.Tokenizer`."""
    from lm.training import corpus

    split = corpus.discover()
    frame = corpus.document_frame(tokenizer, split.root)
    bos = [] if frame.bos is None else [frame.bos]
    prompts = []
    for rel, path in zip(split.heldout, split.paths("heldout"), strict=True):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        ids = bos + tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= length:
            prompts.append(Prompt(rel, tuple(ids[:length])))
        if len(prompts) == count:
            return prompts
    raise SystemExit(
        f"--prompts: only {len(prompts)} held-out files have {length} tokens, asked for {count}"
    )


# Chat prompts for real instruct models (`--chat N`), one user turn each.
CHAT_QUESTIONS = (
    "Explain in three sentences why the sky is blue.",
    "Write a short Python function that checks whether a string is a palindrome.",
    "What are three tips for writing a good cover letter?",
    "Summarize the plot of a heist movie in four sentences.",
    "How do I make a simple tomato sauce? List the steps.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a packing list for a two-day hiking trip.",
    "Describe how a bicycle gear system works.",
)


def chat_prompts(tokenizer, count: int) -> list[Prompt]:
    """The first `count` CHAT_QUESTIONS as one user turn each, rendered with the model's
    chat template (`lm.chat`) and an open assistant turn. `tokenizer`: an
    `lm.tokenizer.Tokenizer`."""
    if count > len(CHAT_QUESTIONS):
        raise SystemExit(f"--chat: at most {len(CHAT_QUESTIONS)}, got {count}")
    return [
        Prompt(f"chat-{i}", tuple(tokenizer.chat_prompt_ids([{"role": "user", "content": q}])))
        for i, q in enumerate(CHAT_QUESTIONS[:count])
    ]
