"""`Output`: what a client is streamed when a stop string spans chunks."""

from __future__ import annotations

from edge_node.output import Output
from lm.tokenizer import Tokenizer
from lm.training.bpe import train_bpe
from protocol.types import FinishReason

LINES = ["Hello, how are you?\n", "The END is near. ENDING\n"] * 10


def _stream(out: Output, ids: list[int]) -> list[str]:
    """Emits `ids` one token a chunk, as decode steps do; the chunks' texts, the final
    chunk's (`release(final=True)`) last."""
    texts = []
    for token in ids:
        texts.append(out.emit([token], verified=True).text)
        if out.done:
            break
    return [*texts, out.release(final=True)]


def test_a_stop_string_across_chunks_never_reaches_the_client_in_part():
    tokenizer = Tokenizer(train_bpe(LINES, vocab_size=300))
    ids = tokenizer.encode("Hello, how are you?", add_special_tokens=False)
    assert len(ids) > 4  # "ow a" spans tokens
    out = Output([], 50, stop=("ow a",), tokenizer=tokenizer)
    texts = _stream(out, ids)
    assert "".join(texts) == out.text == "Hello, h"
    assert out.finish_reason is FinishReason.STOP


def test_text_that_may_start_a_stop_string_waits_for_the_next_tokens():
    tokenizer = Tokenizer(train_bpe(LINES, vocab_size=300))
    ids = tokenizer.encode("The END is near. EN", add_special_tokens=False)
    out = Output([], 50, stop=("ENDING",), tokenizer=tokenizer)
    texts = _stream(out, ids)
    # "END" might have become "ENDING" until " is" came: it went out then, not before.
    sent = ""
    for text in texts[:-1]:
        sent += text
        assert not sent.endswith(("E", "EN", "END")) or sent.endswith("END is")
    assert texts[-1] == "EN"  # held to the end: the final chunk carries it
    assert "".join(texts) == out.text == "The END is near. EN"
    assert out.finish_reason is None


def test_a_rollback_below_held_text_keeps_the_stream_consistent():
    tokenizer = Tokenizer(train_bpe(LINES, vocab_size=300))
    ids = tokenizer.encode("Hello, how", add_special_tokens=False)
    out = Output([], 50, stop=("how are",), tokenizer=tokenizer)
    streamed = "".join(out.emit([token], verified=False).text for token in ids)
    assert streamed == "Hello, " and out.text == "Hello, how"  # "how" held
    rollback = out.rollback(2)
    client = streamed[: rollback.keep_chars]
    client += out.emit(tokenizer.encode(" world", add_special_tokens=False), verified=True).text
    assert client + out.release(final=True) == out.text


def test_a_rollback_into_held_text_keeps_only_what_the_client_has():
    """Adaptive mode corrects unverified tokens whose text is partly held back: the
    client is told to keep at most what it was sent, and gets the rest later."""
    tokenizer = Tokenizer(train_bpe(LINES, vocab_size=300))
    ids = tokenizer.encode("Hello, how ar", add_special_tokens=False)
    out = Output([], 50, stop=("how are",), tokenizer=tokenizer)
    client = "".join(out.emit([token], verified=False).text for token in ids)
    assert client == "Hello, "  # "how ar" held
    kept = len(tokenizer.encode("Hello, how", add_special_tokens=False))
    rollback = out.rollback(kept)
    assert rollback.keep_chars == len(client)  # not len("Hello, how"): never sent
    client = client[: rollback.keep_chars]
    client += out.emit(tokenizer.encode(" you", add_special_tokens=False), verified=True).text
    assert client + out.release(final=True) == out.text == "Hello, how you"


def test_several_stop_strings_hold_back_the_longest_possible_start():
    tokenizer = Tokenizer(train_bpe(LINES, vocab_size=300))
    out = Output([], 50, stop=("ENDING", "near."), tokenizer=tokenizer)
    texts = _stream(out, tokenizer.encode("The END is near. END", add_special_tokens=False))
    assert "".join(texts) == out.text == "The END is "
    assert out.finish_reason is FinishReason.STOP


def test_a_stop_string_continuing_text_sent_before_a_rollback_keeps_client_and_server_equal():
    tokenizer = Tokenizer(train_bpe(LINES, vocab_size=300))
    out = Output([], 50, stop=("how are",), tokenizer=tokenizer)
    ids = tokenizer.encode("Hello, how you", add_special_tokens=False)
    client = "".join(out.emit([token], verified=False).text for token in ids)
    assert client == "Hello, how you"  # "how y" can start no stop string: all sent
    rollback = out.rollback(len(tokenizer.encode("Hello, how", add_special_tokens=False)))
    client = client[: rollback.keep_chars]
    client += out.emit(tokenizer.encode(" are", add_special_tokens=False), verified=True).text
    # "how" was sent before the correction: it stays, and the output ends there.
    assert client == out.text == "Hello, how" and out.finish_reason is FinishReason.STOP
