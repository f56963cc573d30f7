"""The output side of a generation: limits, stop conditions, text, rollbacks.

Every token the client sees goes through `Output.emit`, which cuts at `max_tokens`,
the model's end-of-sequence and end-of-turn tokens and stop strings, and detokenises
incrementally (never splitting a UTF-8 character). Text that may be the start of a stop
string is held back until the next tokens tell (as vLLM does), so a stop string split
across chunks does not reach the client in part (unless a rollback cut back to text
already sent that a stop string then continues). `rollback` undoes unverified tokens
when the cloud corrects them; the client applies the same `Rollback` to its text.
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
        self._sent = 0  # characters of `text` returned in chunks
        self.finish_reason: FinishReason | None = None
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, prompt) if tokenizer else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(
        self, tokens: Sequence[int], verified: bool, rollback: Rollback | None = None
    ) -> Chunk:
        """Appends what of `tokens` the limits leave. With stop strings the tokens go in
        one at a time: the output ends before the token in which a stop string starts,
        so it holds (and `GenerationStats.generated_tokens` counts) only the tokens whose
        text it returns, as OpenAI's `usage` counts the returned completion."""
        tokens = list(tokens[: self.max_tokens - len(self.tokens)])
        end = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        if end is not None:
            tokens = tokens[:end]
        sent_tokens = len(self.tokens)
        for step in ([t] for t in tokens) if self.stop else [tokens]:
            self._append(step, self._detok.push(step) if self._detok else "")
            if self.done:
                break
        if end is not None and not self.done:
            if self._detok:
                self._append([], self._detok.flush())
            self.finish_reason = FinishReason.STOP
        if self.finish_reason is None and len(self.tokens) >= self.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        return Chunk(
            tokens=tuple(self.tokens[sent_tokens:]),
            text=self.release(),
            verified=verified,
            rollback=rollback,
        )

    def finish(self, reason: FinishReason) -> None:
        """Ends the output for a reason found outside it (a context limit: LENGTH); the
        final chunk carries what `release` still holds."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def release(self, final: bool = False) -> str:
        """The text not yet returned that may go now: all of it once the output is done
        (or for the `final` chunk), else all but a tail that a stop string may start
        with (e.g. with stop "END", text "abcEN" releases "abc")."""
        end = len(self.text)
        if not (self.done or final):
            tail = self.text[self._sent :]
            end -= max(
                (
                    k
                    for s in self.stop
                    for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])
                ),
                default=0,
            )
        text, self._sent = self.text[self._sent : end], end
        return text

    def rollback(self, keep_tokens: int) -> Rollback:
        """Drops output tokens after the first `keep_tokens`. The client keeps at most
        the text it was sent: what the kept tokens have beyond it is still held back,
        and goes out with later chunks."""
        keep_chars = self._detok.rollback(keep_tokens) if self._detok else 0
        self.tokens = self.tokens[:keep_tokens]
        self.text = self.text[:keep_chars]
        self._sent = min(self._sent, keep_chars)
        self.finish_reason = None
        return Rollback(keep_tokens=keep_tokens, keep_chars=self._sent)

    def _append(self, tokens: list[int], text: str) -> None:
        """Appends `tokens` and their `text`, cut before the first stop string, but never
        below the text already returned (`release` holds back any tail a stop string
        may start with, so only a rollback into sent text can leave a stop string's
        start in it: then that start stays). `tokens` are dropped when the
        stop string starts before their own text, the last `len(decode(tokens))`
        characters of `text`: those before it complete tokens held back earlier (a
        UTF-8 character split across tokens), which are already in the output."""
        start = len(self.text)
        self.text += text
        hit = self._stop_at(start) if self.stop and text else None
        if hit is None:
            self.tokens.extend(tokens)
            return
        own = len(self._tokenizer.decode(tokens)) if self._tokenizer and tokens else 0
        if hit > len(self.text) - min(own, len(text)):
            self.tokens.extend(tokens)
        self.text = self.text[: max(hit, self._sent)]
        self.finish_reason = FinishReason.STOP

    def _stop_at(self, start: int) -> int | None:
        """Where the first stop string that ends past `start` begins, if any."""
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        return min(hits, default=None)
