"""The output side of a generation: limits, stop conditions, text, rollbacks.

Every token the client sees goes through `Output.emit`, which cuts at `max_tokens`,
the model's end-of-sequence and end-of-turn tokens and stop strings, and detokenises
incrementally (never splitting a UTF-8 character). `rollback` undoes unverified
tokens when the cloud corrects them; the client applies the same `Rollback` to its text.
"""

from __future__ import annotations

from collections.abc import Sequence

from lm.tokenizer import IncrementalDetokenizer, Tokenizer
from protocol.types import Chunk, FinishReason, Rollback


def stop_ids(eos_id: int | None, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """The ids that end a generation: the model config's end-of-sequence token and
    the tokenizer's (`Tokenizer.stop_ids`: eos and end-of-turn tokens)."""
    found = [] if eos_id is None else [eos_id]
    return tuple(dict.fromkeys([*found, *(tokenizer.stop_ids if tokenizer else ())]))


class Output:
    def __init__(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        stop: Sequence[str] = (),
        eos_ids: Sequence[int] = (),
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """`eos_ids`: every token that ends the output (not included in it)."""
        self.max_tokens = max_tokens
        self.stop = tuple(stop)
        self.eos_ids = frozenset(eos_ids)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self._detok = IncrementalDetokenizer(tokenizer, prompt) if tokenizer else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(
        self, tokens: Sequence[int], verified: bool, rollback: Rollback | None = None
    ) -> Chunk:
        tokens = list(tokens[: self.max_tokens - len(self.tokens)])
        end = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        if end is not None:
            tokens = tokens[:end]
            self.finish_reason = FinishReason.STOP
        delta = self._detok.push(tokens) if self._detok else ""
        if self.finish_reason and self._detok:
            delta += self._detok.flush()
        delta = self._cut_at_stop(delta)
        self.tokens.extend(tokens)
        self.text += delta
        if self.finish_reason is None and len(self.tokens) >= self.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        return Chunk(tokens=tuple(tokens), text=delta, verified=verified, rollback=rollback)

    def finish(self, reason: FinishReason) -> None:
        """Ends the output for a reason found outside it (a context limit: LENGTH)."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def rollback(self, keep_tokens: int) -> Rollback:
        """Drops output tokens after the first `keep_tokens`."""
        keep_chars = self._detok.rollback(keep_tokens) if self._detok else 0
        self.tokens = self.tokens[:keep_tokens]
        self.text = self.text[:keep_chars]
        self.finish_reason = None
        return Rollback(keep_tokens=keep_tokens, keep_chars=keep_chars)

    def _cut_at_stop(self, delta: str) -> str:
        if not self.stop or not delta:
            return delta
        full = self.text + delta
        hits = [
            i for s in self.stop if (i := full.find(s, max(0, len(self.text) - len(s) + 1))) >= 0
        ]
        if not hits:
            return delta
        self.finish_reason = FinishReason.STOP
        return full[: min(hits)][len(self.text) :]
