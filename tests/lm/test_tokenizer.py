import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lm.errors import CheckpointError
from lm.tokenizer import IncrementalDetokenizer, Tokenizer
from lm.training.bpe import save_tokenizer, train_bpe

REPLACEMENT = "\ufffd"
TRAINING_LINES = [
    "héllo wörld 日本語 🙂",
    "hello world, héllo again",
    "日本語 text and wörds 🙂 here",
    "the cat sat on the mat",
] * 10
# 🦀 never occurs in training, so it is split into byte-level pieces.
SAMPLE_TEXTS = [
    "héllo wörld 日本語 🙂",
    "a crab 🦀 and 🙂🙂 in 日本",
    "plain ascii text, nothing else",
    "ünïcödé 語🦀語",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bpe")
    save_tokenizer(train_bpe(TRAINING_LINES, vocab_size=300), directory, max_length=64)
    return directory


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def push_one_by_one(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push([token]) for token in ids]


def test_round_trip_and_special_ids(tok: Tokenizer, tokenizer_dir: Path) -> None:
    for text in SAMPLE_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 300
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"
    assert tok.decode([0, 1], skip_special_tokens=False) == "<|bos|><|eos|>"
    from_file = Tokenizer.from_file(tokenizer_dir / "tokenizer.json")
    assert (from_file.bos_id, from_file.eos_id) == (0, 1)  # found by their usual spellings


def test_special_ids_come_from_tokenizer_config(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": {"content": "<|pad|>"}, "eos_token": "<|bos|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (2, 0)


def test_no_special_tokens_gives_none(tmp_path: Path) -> None:
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.train_from_iterator(["abc abd"], trainers.BpeTrainer(show_progress=False))
    tok = Tokenizer(inner)
    assert tok.bos_id is None and tok.eos_id is None


def test_missing_and_bad_files_are_named(tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.json: tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: tokenizer file not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer file"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = tmp_path / "tokenizer_config.json"
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: "):
        Tokenizer.from_dir(tmp_path)
    config.write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: eos_token: '<\|end\|>'"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_deltas_concatenate_to_the_full_decode_without_broken_characters(
    tok: Tokenizer, text: str
) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = push_one_by_one(detok, ids)
    assert "".join(deltas) == tok.decode(ids) == detok.text == text
    assert not any(REPLACEMENT in delta for delta in deltas)


def test_random_chunks_give_the_same_text(tok: Tokenizer) -> None:
    ids = tok.encode(" ".join(SAMPLE_TEXTS))
    rng = random.Random(0)
    for _ in range(20):
        detok = IncrementalDetokenizer(tok)
        start, deltas = 0, []
        while start < len(ids):
            size = rng.randint(1, 4)
            deltas.append(detok.push(ids[start : start + size]))
            start += size
        assert "".join(deltas) == tok.decode(ids)
        assert not any(REPLACEMENT in delta for delta in deltas)


def crab_ids(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """Ids of "hi" and of "🦀", which must take several tokens for the tests to mean anything."""
    prefix, crab = tok.encode("hi"), tok.encode("🦀")
    assert tok.encode("hi🦀") == prefix + crab
    assert len(crab) >= 2 and tok.decode(crab[:1]).endswith(REPLACEMENT)
    return prefix, crab


def test_emoji_split_across_tokens_is_held_back_then_emitted_whole(tok: Tokenizer) -> None:
    prefix, crab = crab_ids(tok)
    detok = IncrementalDetokenizer(tok)
    assert "".join(push_one_by_one(detok, prefix)) == "hi"
    deltas = push_one_by_one(detok, crab)
    assert deltas == [""] * (len(crab) - 1) + ["🦀"]


def test_prompt_is_context_not_output(tok: Tokenizer) -> None:
    prompt = tok.encode("héllo 日本")
    generated = tok.encode("語 🦀 wörld")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(push_one_by_one(detok, generated))
    assert text == tok.decode(prompt + generated)[len(tok.decode(prompt)) :]


def test_prompt_context_keeps_leading_space_of_sentencepiece_tokens() -> None:
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    inner.decoder = decoders.Metaspace()
    inner.train_from_iterator(
        ["hello world the world"] * 10, trainers.BpeTrainer(vocab_size=60, show_progress=False)
    )
    tok = Tokenizer(inner)
    hello, world = tok.encode("hello world")
    assert tok.decode([world]) == "world"  # alone, the decoder drops the leading space
    detok = IncrementalDetokenizer(tok, prompt_ids=[hello])
    assert detok.push([world]) == " world"
    assert detok.push([world]) == " world"


def test_rollback_matches_a_detokenizer_that_never_saw_the_dropped_ids(tok: Tokenizer) -> None:
    ids = tok.encode("a crab 🦀 and 日本語 🙂")
    for keep in range(len(ids) + 1):
        detok = IncrementalDetokenizer(tok)
        emitted = "".join(push_one_by_one(detok, ids))
        remaining = detok.rollback(keep)
        fresh = IncrementalDetokenizer(tok)
        push_one_by_one(fresh, ids[:keep])
        assert remaining == len(detok.text) == len(fresh.text)
        assert detok.text == fresh.text == emitted[:remaining]
        # After the rollback the stream continues as if the dropped ids never came.
        rest = "".join(push_one_by_one(detok, ids[keep:]))
        assert detok.text == emitted and emitted[remaining:] == rest


def test_rollback_inside_a_character_holds_its_bytes_back_again(tok: Tokenizer) -> None:
    prefix, crab = crab_ids(tok)
    other = tok.encode("ok")
    detok = IncrementalDetokenizer(tok)
    push_one_by_one(detok, prefix + crab + other)
    assert detok.rollback(len(prefix) + 1) == len("hi")
    assert detok.text == "hi"
    assert "".join(push_one_by_one(detok, crab[1:])) == "🦀"
    assert detok.text == "hi🦀"


def test_rollback_range_is_checked(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("prompt"))
    detok.push(tok.encode("abc"))
    with pytest.raises(ValueError, match=r"keep_tokens: must be in \[0, 3\], got 4"):
        detok.rollback(4)
    with pytest.raises(ValueError, match=r"keep_tokens: must be in \[0, 3\], got -1"):
        detok.rollback(-1)
    assert detok.rollback(0) == 0 and detok.text == ""


def test_flush_emits_an_unfinished_character(tok: Tokenizer) -> None:
    prefix, crab = crab_ids(tok)
    ids = prefix + crab[:-1]
    detok = IncrementalDetokenizer(tok)
    assert "".join(push_one_by_one(detok, ids)) == "hi"
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT)
    assert detok.text == tok.decode(ids)
    assert detok.flush() == ""
