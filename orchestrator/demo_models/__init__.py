"""The bundled demo model pair: a code-completion target and its distilled draft.

Both were trained by `edgecloud train` / `edgecloud distill` on the Python standard library; the
exact commands, seeds, checksums and measured quality are in MODEL_CARD.md beside them.  They are
what `edgecloud demo`, the tests and the benchmarks load when no model is named.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
TARGET_DIR = DEMO_DIR / "target"
DRAFT_DIR = DEMO_DIR / "draft"
MODEL_CARD = DEMO_DIR / "MODEL_CARD.md"
