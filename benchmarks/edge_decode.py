"""The edge SLM against llama.cpp on the same GGUF file, the same threads, in one run.

What an edge user would otherwise run is llama.cpp on the GGUF file. This runs it
(`llama-cpp-python`, which this benchmark alone needs: `--install-llama-cpp` builds it,
about 10 minutes on 2 cores) beside the lm core in float32, bfloat16, int8 and int4
(`lm.quantized`; int4 keeps the file's own Q4_0/Q4_1 blocks), round-robin, `--repeats`
times each, and reports medians of:

- prefill: a `--prompt-tokens` prompt, from an empty cache;
- decode: `--tokens` greedy tokens after it, one at a time (batch 1), tokens/s;
- draft: a beam tree of `--beam` (width x depth, 4x6: 24 nodes) drafted after the prompt
  by the edge's own drafter (`edge_node.drafters.beam`). llama.cpp's high-level API
  decodes one sequence, so its figure is derived: width x depth single-token decodes,
  named as such;
- accuracy, teacher-forced over `--eval-tokens` tokens of held-out English text (this
  repository's README, which no model here was trained on): top-1 agreement with the
  float32 model (the file's weights dequantized) and perplexity. llama.cpp's own
  figures come from its logits for the same tokens.

Usage:
    python benchmarks/edge_decode.py --gguf ~/.cache/edgecloud/SmolLM2-135M-Instruct.Q4_1.gguf
    (default: `edgecloud fetch smollm2`'s file, fetched if absent)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import torch

from edge_node.drafters import DraftShape
from edge_node.drafters.beam import BeamDrafter
from edge_node.slm import EdgeLM
from lm.checkpoint import load_model
from lm.gguf import read_gguf_tokenizer
from lm.model import Transformer
from lm.quantized import QuantScheme, load_quantized
from lm.sampling import SamplingParams

LLAMA_CPP = "llama-cpp-python==0.3.36"
OURS = ("float32", "bfloat16", "int8", "int4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="a llama/qwen2 GGUF file (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=2, help="for every engine (default: 2)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="(default: 128)")
    parser.add_argument("--tokens", type=int, default=128, help="decoded per run (default: 128)")
    parser.add_argument("--eval-tokens", type=int, default=512, help="(default: 512)")
    parser.add_argument("--repeats", type=int, default=3, help="(default: 3)")
    parser.add_argument("--beam", default="4x6", help="width x depth (default: 4x6)")
    parser.add_argument(
        "--engines",
        default="llama.cpp," + ",".join(OURS),
        help="comma-separated (default: llama.cpp,float32,bfloat16,int8,int4)",
    )
    parser.add_argument(
        "--install-llama-cpp",
        action="store_true",
        help=f"pip install {LLAMA_CPP} into this interpreter first if it is missing",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    unknown = set(engines) - {"llama.cpp", *OURS}
    if unknown:
        parser.error(f"--engines: unknown {sorted(unknown)}; known: llama.cpp, {', '.join(OURS)}")
    width, depth = (int(part) for part in args.beam.split("x"))
    gguf = args.gguf or _default_gguf()
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        if not args.install_llama_cpp:
            raise SystemExit(
                f"llama.cpp: `pip install {LLAMA_CPP}` (or pass --install-llama-cpp), "
                "or leave it out of --engines"
            )
        subprocess.run([sys.executable, "-m", "pip", "install", LLAMA_CPP], check=True)

    tokenizer = read_gguf_tokenizer(gguf).inner
    text = (common.REPO_ROOT / "README.md").read_text()
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    needed = max(args.prompt_tokens, args.eval_tokens)
    if len(ids) < needed:
        raise SystemExit(f"README.md has {len(ids)} tokens; asked for {needed}")
    prompt, heldout = ids[: args.prompt_tokens], ids[: args.eval_tokens]

    runners = {}
    for name in engines:
        runners[name] = LlamaCpp(gguf, args.threads) if name == "llama.cpp" else Ours(gguf, name)
    reference = runners["float32"] if "float32" in runners else Ours(gguf, "float32")
    ref_logits = reference.teacher_forced(heldout)

    results: dict[str, dict[str, list[float]]] = {n: {} for n in engines}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            prefill_ms, decode_tps, tokens = runner.generate(prompt, args.tokens)
            outputs[name] = tokens
            record = results[name]
            record.setdefault("prefill_ms", []).append(prefill_ms)
            record.setdefault("decode_tokens_per_s", []).append(decode_tps)
            if isinstance(runner, Ours):
                record.setdefault("draft_ms", []).append(runner.draft(prompt, width, depth))
            else:
                record.setdefault("draft_ms", []).append(width * depth * 1000 / decode_tps)

    summary: dict[str, object] = {
        "machine": common.machine(torch.device("cpu")),
        "gguf": str(gguf),
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.tokens,
        "beam": args.beam,
        "engines": {},
    }
    baseline = None
    if "llama.cpp" in results:
        baseline = statistics.median(results["llama.cpp"]["decode_tokens_per_s"])
    print(
        f"{'engine':<10} {'weights MB':>10} {'prefill ms':>10} {'decode tok/s':>12} "
        f"{'vs llama.cpp':>12} {'draft ms':>9} {'top-1':>6} {'ppl':>7} {'same greedy':>11}"
    )
    for name, runner in runners.items():
        logits = runner.teacher_forced(heldout)
        figures = {key: statistics.median(values) for key, values in results[name].items()}
        figures["weights_mb"] = runner.weight_bytes() / 1e6
        figures["top1_vs_float32"] = _agreement(logits, ref_logits)
        figures["perplexity"] = _perplexity(logits, heldout)
        first = outputs.get("float32", outputs[name])
        figures["greedy_tokens_equal_float32"] = _common_prefix(outputs[name], first)
        ratio = None if baseline is None else figures["decode_tokens_per_s"] / baseline
        figures["decode_vs_llama_cpp"] = ratio
        summary["engines"][name] = figures
        draft = f"{figures['draft_ms']:.1f}" + ("*" if name == "llama.cpp" else "")
        print(
            f"{name:<10} {figures['weights_mb']:>10.0f} {figures['prefill_ms']:>10.1f} "
            f"{figures['decode_tokens_per_s']:>12.1f} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>12} {draft:>9} "
            f"{figures['top1_vs_float32']:>6.3f} {figures['perplexity']:>7.2f} "
            f"{figures['greedy_tokens_equal_float32']:>11}"
        )
    print(f"* llama.cpp: {width} x {depth} single-token decodes (its API drafts no tree)")
    print(f"machine: {common.cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    common.print_json(summary)


class Ours:
    """The lm core on the CPU as the edge runs it: EdgeLM's cache and drafter."""

    def __init__(self, gguf: Path, name: str) -> None:
        self.name = name
        if name in ("int8", "int4"):
            self.model: Transformer = load_quantized(gguf, QuantScheme.named(name))
        else:
            self.model = load_model(gguf, device="cpu", dtype=getattr(torch, name))

    def weight_bytes(self) -> int:
        return common.weight_bytes(self.model)

    @torch.inference_mode()
    def generate(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        cache = self.model.new_cache(1, len(prompt) + n + 1)
        start = time.perf_counter()
        logits = self.model(torch.tensor([prompt]), cache=cache)
        cache.commit(0, range(len(prompt)))
        token = int(logits[0, -1].argmax())
        prefill = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in range(n - 1):
            logits = self.model(torch.tensor([[token]]), cache=cache)
            cache.commit(0, range(1))
            token = int(logits[0, -1].argmax())
            tokens.append(token)
        return prefill * 1000, (n - 1) / (time.perf_counter() - start), tokens

    def draft(self, prompt: list[int], width: int, depth: int) -> float:
        lm = EdgeLM(self.model, len(prompt) + 2 * width * depth + 2)
        lm.reset(prompt)
        lm.next_logits()  # the prompt is cached, as after a verification round
        start = time.perf_counter()
        BeamDrafter().draft(lm, DraftShape(width, depth), SamplingParams(), None)
        return (time.perf_counter() - start) * 1000

    @torch.inference_mode()
    def teacher_forced(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids]))[0].float()


class LlamaCpp:
    """llama.cpp through llama-cpp-python, greedy, on `threads` threads."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.path = gguf
        self.threads = threads
        self.llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)

    def weight_bytes(self) -> int:
        return (
            self.llm.model_size() if hasattr(self.llm, "model_size") else self.path.stat().st_size
        )

    def generate(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
        prefill = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([token])
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            tokens.append(token)
        return prefill * 1000, (n - 1) / (time.perf_counter() - start), tokens

    def teacher_forced(self, ids: list[int]) -> torch.Tensor:
        from llama_cpp import Llama

        llm = Llama(
            str(self.path), n_ctx=2048, n_threads=self.threads, logits_all=True, verbose=False
        )
        llm.eval(ids)
        return torch.from_numpy(llm.scores[: len(ids)].copy()).float()


def _agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def _perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1], targets)
    return math.exp(nll.item())


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _default_gguf() -> Path:
    from orchestrator.fetch import fetch

    return fetch("smollm2")


if __name__ == "__main__":
    main()
