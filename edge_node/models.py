"""What an edge node runs: its SLM (a checkpoint in DRAM or a flash pack), the SLM's
tokenizer and an optional draft head, loaded the same way by the Ray actor and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lm.draft_head import DraftHead, load_head
from lm.model import Transformer
from lm.tokenizer import Tokenizer


@dataclass(frozen=True)
class EdgeModels:
    slm: Transformer
    tokenizer: Tokenizer | None  # None when the model has none (Tokenizer.found_in)
    head: DraftHead | None


def load_edge_models(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    flash_budget_mb: float | None = None,
    head_dir: str | Path | None = None,
    quantize: str | None = None,
) -> EdgeModels:
    """flash_budget_mb: `model_dir` is a flash pack (`edgecloud flash pack`) whose FFN
    weights stay on flash, run within this much DRAM (BudgetError below its minimum).
    dtype: the SLM's and the head's (None: the device's default).
    quantize: "int4" or "int8": the SLM's weights as integer codes on the CPU
    (`lm.quantized`; a GGUF file's Q4_0/Q4_1 blocks kept as they are for int4); it then
    computes in float32 and `dtype` applies to the head only.
    """
    from lm.checkpoint import load_model

    path = Path(model_dir)
    if quantize is not None:
        if flash_budget_mb is not None:
            raise ValueError("quantize: a flash pack stores its own quantization (flash pack)")
        from lm.quantized import QuantScheme, load_quantized

        slm = load_quantized(path, QuantScheme.named(quantize), device=device)
    elif flash_budget_mb is None:
        slm = load_model(path, device=device, dtype=dtype)
    else:
        from edge_node.flash.ffn import load_flash_model

        slm = load_flash_model(path, int(flash_budget_mb * 2**20), device=device, dtype=dtype)
    tokenizer = Tokenizer.from_dir(path) if Tokenizer.found_in(path) else None
    head = None if head_dir is None else load_head(head_dir, device=device, dtype=dtype)
    return EdgeModels(slm, tokenizer, head)
