"""The bundled demo models: a code-completion target, its distilled draft, and a recurrent
draft head for the same target (ReDrafter, lm.draft_head).

All were trained by `edgecloud train` / `edgecloud distill [--head]` on the Python standard
library; the exact commands, seeds, checksums and measured quality are in MODEL_CARD.md beside
them.  They are what `edgecloud demo`, the tests and the benchmarks load when no model is named.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
TARGET_DIR = DEMO_DIR / "target"
DRAFT_DIR = DEMO_DIR / "draft"
HEAD_DIR = DEMO_DIR / "head"  # head_config.json + head.safetensors, for TARGET_DIR's model
MODEL_CARD = DEMO_DIR / "MODEL_CARD.md"
# Drafts distilled for real targets that `edgecloud fetch` gets (orchestrator/fetch.py),
# by name; each directory holds its own MODEL_CARD.md.
REAL_DRAFTS = {"smollm2": DEMO_DIR / "smollm2-draft"}
