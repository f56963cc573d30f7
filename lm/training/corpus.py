"""Training text: discover a corpus of source files, split it by path hash, pack it into tokens.

The default corpus is the running interpreter's standard library, the one body of real code that
every Python install carries (the machines here reach no model or data hub).  Left out by default:

- `site-packages`: third-party code, different on every machine, so not reproducible;
- test packages (`test/`, `tests/`, `idle_test/`): 19 of the 34 MB of the 3.11 stdlib.  A training
  budget of a few million tokens never gets through the rest, and tests are the most repetitive,
  least idiomatic part (long literal tables, assertion ladders), so they would only tilt a small
  model toward test boilerplate.  `include_tests=True` puts them back;
- `pydoc_data/` and `encodings/`: generated data (the help topics as one big string, codec
  tables written as thousands of `'\\x00'  # 0x00 -> NULL` lines), not code anyone writes.

Documents are packed into one token stream framed as `document_frame` says for the
tokenizer at hand: the project's BPE (<|bos|> doc <|eos|>) and any model's own (SmolLM2:
doc <|endoftext|>).

The held-out split is a pure function of each file's path relative to the corpus root, so every
tool (train, distill, eval, the benchmarks) recomputes the same split without sharing state, and
`heldout_digest` names it in one line for a model card.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.tokenizer import BOS_NAMES, END_OF_TURN_NAMES, EOS_NAMES, START_OF_TURN_NAMES, Tokenizer

logger = logging.getLogger(__name__)

TEST_DIRS = frozenset({"test", "tests", "idle_test"})
ALWAYS_EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__", "pydoc_data", "encodings"})
DEFAULT_HELDOUT_FRACTION = 0.05


class CorpusError(ValueError):
    """A corpus that cannot be used; the message names the path and what is wrong."""


@dataclass(frozen=True)
class CorpusSplit:
    """Files of one corpus, split into training and held-out parts.

    root: the directory the relative paths (and so the split) are computed from.
    train, heldout: relative POSIX paths, sorted.
    """

    root: Path
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def paths(self, part: str) -> list[Path]:
        """Absolute paths of `part` ("train" or "heldout")."""
        if part not in ("train", "heldout"):
            raise ValueError(f"part: must be 'train' or 'heldout', got {part!r}")
        return [self.root / rel for rel in getattr(self, part)]


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (not the venv's site-packages)."""
    return Path(sysconfig.get_paths()["stdlib"])


def heldout_score(rel_path: str) -> float:
    """A uniform number in [0, 1) fixed by the path: the first 8 bytes of its sha256.

    Example: heldout_score("json/decoder.py") is the same on every machine and every run.
    """
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def discover(
    root: str | Path | None = None,
    *,
    pattern: str = "*.py",
    include_tests: bool = False,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> CorpusSplit:
    """Find the corpus files under `root` (default: the stdlib) and split them by path hash.

    A file whose `heldout_score` is below `heldout_fraction` is held out, so about that fraction
    of the files is, and adding or removing other files never moves a file across the split.
    `root` may also be a single file: it then trains and is never held out.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction}")
    root = stdlib_root() if root is None else Path(root)
    if not root.exists():
        raise CorpusError(f"corpus: {root} does not exist")
    if root.is_file():
        return CorpusSplit(root=root.parent, train=(root.name,), heldout=())
    excluded = ALWAYS_EXCLUDED_DIRS | (frozenset() if include_tests else TEST_DIRS)
    rel_paths = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob(pattern)
        if path.is_file() and not excluded.intersection(path.relative_to(root).parts[:-1])
    )
    if not rel_paths:
        raise CorpusError(f"corpus: no files matching {pattern!r} under {root}")
    heldout = tuple(p for p in rel_paths if heldout_score(p) < heldout_fraction)
    train = tuple(p for p in rel_paths if heldout_score(p) >= heldout_fraction)
    return CorpusSplit(root=root, train=train, heldout=heldout)


def heldout_digest(split: CorpusSplit) -> str:
    """sha256 of the held-out relative paths joined by newlines: names the split in one line."""
    return hashlib.sha256("\n".join(split.heldout).encode("utf-8")).hexdigest()


def read_texts(paths: Iterable[Path]) -> list[str]:
    """The UTF-8 text of each file; files that are not UTF-8 or are empty are skipped (logged).

    Raises CorpusError naming the first path if no file has any text.
    """
    paths = list(paths)
    texts = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            logger.info("skipping %s: not UTF-8", path)
            continue
        if text.strip():
            texts.append(text)
    if not texts:
        where = paths[0].parent if paths else "the corpus"
        raise CorpusError(f"corpus: no text in {len(paths)} file(s) under {where}")
    return texts


@dataclass(frozen=True)
class DocumentFrame:
    """The special tokens around every packed document: bos, tokens..., eos (None: left out;
    `document_frame` never gives both None)."""

    bos: int | None
    eos: int | None


def document_frame(tokenizer: Tokenizer, source: str | Path) -> DocumentFrame:
    """How documents are framed for `tokenizer`, the one answer every training, distillation
    and evaluation stream uses, so a model is measured on text framed as it was trained.

    bos and eos are the tokenizer's own, unless one is a chat-turn marker
    (START_OF_TURN_NAMES, END_OF_TURN_NAMES): an instruct model may name <|im_start|> /
    <|im_end|> its bos/eos, but it was pretrained on documents ending in its end-of-text
    token. Such a marker, or a missing id, is replaced by the first special token spelled
    like a begin / end of sequence (BOS_NAMES, EOS_NAMES), if any.

    Examples: the project's BPE -> (0, 1) for <|bos|>, <|eos|>; SmolLM2-Instruct (bos
    <|im_start|> = 1, eos <|im_end|> = 2) -> (None, 0) for <|endoftext|>; Llama 3 Instruct
    (<|begin_of_text|>, <|eot_id|>) -> <|begin_of_text|>, <|end_of_text|>.
    Raises ValueError naming `source` when neither a bos nor an eos is found.
    """
    special = tokenizer.special_tokens
    turns = {
        special[name] for name in (*START_OF_TURN_NAMES, *END_OF_TURN_NAMES) if name in special
    }

    def own_or_named(token_id: int | None, names: Sequence[str]) -> int | None:
        if token_id is not None and token_id not in turns:
            return token_id
        return next((special[name] for name in names if name in special), None)

    frame = DocumentFrame(
        bos=own_or_named(tokenizer.bos_id, BOS_NAMES), eos=own_or_named(tokenizer.eos_id, EOS_NAMES)
    )
    if frame.bos is None and frame.eos is None:
        raise ValueError(
            f"{source}: the tokenizer has no bos or eos token to separate documents (none "
            f"configured, no special token spelled {' '.join((*BOS_NAMES, *EOS_NAMES))})"
        )
    return frame


def pack(
    documents: Sequence[Sequence[int]], bos_id: int | None, eos_id: int | None
) -> torch.Tensor:
    """Concatenate token documents into one stream, each framed as bos, tokens..., eos (a
    None id is left out).

    Example: pack([[5, 6], [7]], bos_id=1, eos_id=2) -> tensor([1, 5, 6, 2, 1, 7, 2]);
    pack([[5, 6], [7]], bos_id=None, eos_id=0) -> tensor([5, 6, 0, 7, 0]).
    Returns: (total,) int64.
    """
    before = [] if bos_id is None else [bos_id]
    after = [] if eos_id is None else [eos_id]
    stream: list[int] = []
    for doc in documents:
        stream.extend(before)
        stream.extend(doc)
        stream.extend(after)
    return torch.tensor(stream, dtype=torch.long)


def random_windows(
    stream: torch.Tensor, batch_size: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """`batch_size` windows of `length` tokens at uniform random offsets of `stream`.

    stream: (total,) with total >= length.  Returns: (batch_size, length).
    """
    if stream.numel() < length:
        raise CorpusError(
            f"corpus: {stream.numel()} tokens, fewer than one window of {length}; "
            "use a larger corpus or a smaller --context"
        )
    starts = torch.randint(0, stream.numel() - length + 1, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def sequential_windows(stream: torch.Tensor, length: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens from the start of `stream`, for evaluation.

    Example: sequential_windows(tensor([0..9]), 4) -> [[0, 1, 2, 3], [4, 5, 6, 7]] (the tail 8, 9
    is dropped).  Returns: (min(total // length, limit), length).
    """
    count = stream.numel() // length
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise CorpusError(f"corpus: {stream.numel()} tokens, fewer than one window of {length}")
    return stream[: count * length].view(count, length)
