"""Where a load test's prompts come from: a file, or the demo corpus's held-out split.

Nothing is tokenized here: text prompts go out as text (the server tokenizes them), and
token-id prompts only when the file holds ids. A prompt is a `str` or a tuple of ids, the two
forms `AsyncClient.stream` takes.
"""

from __future__ import annotations

import json
from pathlib import Path

Prompt = str | tuple[int, ...]
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def load_prompt_file(path: Path, *, tokens: bool = False) -> list[Prompt]:
    """The prompts of `path`, in file order; blank lines are skipped.

    A `.jsonl` file holds one JSON object per line with a "prompt" string or a
    "prompt_tokens" list of ids (text is used when a record has both, ids with `tokens`).
    Any other file is one prompt per line: the text without its line break, or with
    `tokens` the ids written out with spaces or commas ("1 5 9" or "1,5,9").

    Raises ValueError naming the file and line, e.g. "prompts.jsonl:3: no "prompt" or
    "prompt_tokens" field"; OSError when it cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    jsonl = Path(path).suffix.lower() in JSONL_SUFFIXES
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{Path(path).name}:{number}"
        if jsonl:
            prompts.append(_jsonl_prompt(line, tokens, where))
        elif tokens:
            prompts.append(_token_ids(line.replace(",", " ").split(), where))
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{Path(path).name}: holds no prompts")
    return prompts


def _jsonl_prompt(line: str, tokens: bool, where: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record and not tokens:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise ValueError(f'{where}: "prompt" must be a non-empty string')
        return record["prompt"]
    if "prompt_tokens" in record:
        ids = record["prompt_tokens"]
        if not isinstance(ids, list):
            raise ValueError(f'{where}: "prompt_tokens" must be a list of token ids')
        return _token_ids(ids, where)
    needed = '"prompt_tokens" field' if tokens else '"prompt" or "prompt_tokens" field'
    raise ValueError(f"{where}: no {needed}")


def _token_ids(values: list, where: str) -> tuple[int, ...]:
    ids = []
    for value in values:
        try:
            token = int(value) if isinstance(value, str) else value
        except ValueError:
            token = None
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"{where}: token ids must be integers >= 0, got {value!r}")
        ids.append(token)
    if not ids:
        raise ValueError(f"{where}: no token ids")
    return tuple(ids)


def heldout_prompts(count: int, *, chars: int = 256) -> list[str]:
    """`count` text prompts cut from the held-out files of the demo corpus, deterministically.

    The split is `lm.training.corpus.discover()`'s default (the stdlib, held out by path hash),
    the one the demo models were trained and evaluated with, so these prompts are code the
    models never saw. Each prompt is whole lines, at most `chars` characters (a longer first
    line is cut), ending in a line break so the model continues at a fresh line. Files are
    visited round robin: the first window of every file, then the second, and so on, so a
    short run still sees many files. Windows of only whitespace are skipped.

    Example: files a.py = "x = 1\\ny = 2\\n" and b.py = "z = 3\\n" with chars=6 give
    ["x = 1\\n", "z = 3\\n", "y = 2\\n"].
    """
    from lm.training import corpus

    if count < 1:
        raise ValueError(f"count: must be >= 1, got {count}")
    if chars < 1:
        raise ValueError(f"chars: must be >= 1, got {chars}")
    split = corpus.discover()
    texts = corpus.read_texts(split.paths("heldout"))
    return round_robin_windows(texts, count, chars)


def round_robin_windows(texts: list[str], count: int, chars: int) -> list[str]:
    """The windows `heldout_prompts` takes from `texts` (see its example)."""
    per_text = [_line_windows(text, chars) for text in texts]
    prompts: list[str] = []
    depth = 0
    while len(prompts) < count and any(depth < len(w) for w in per_text):
        prompts.extend(w[depth] for w in per_text if depth < len(w))
        depth += 1
    return prompts[:count]


def _line_windows(text: str, chars: int) -> list[str]:
    windows, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > chars:
            windows.append(current)
            current = ""
        current += line if current or len(line) <= chars else line[: chars - 1] + "\n"
    if current:
        windows.append(current)
    return [w if w.endswith("\n") else w + "\n" for w in windows if w.strip()]
