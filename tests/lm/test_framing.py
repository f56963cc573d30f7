"""`corpus.document_frame`: how training, distillation and evaluation frame documents for any
tokenizer (the project's BPE, a ChatML or Llama 3 instruct model's own), the streams packed
with it, and `Tokenizer.save`, which hands a `.gguf` model's tokenizer to a directory model."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from lm.tokenizer import Tokenizer
from lm.training import bpe, corpus
from lm.training.train import load_split_streams

TEXT = "def f(x):\n    return x  # café 🙂\n"


def byte_level(specials: list[str], *, plain: tuple[str, ...] = ()) -> tokenizers.Tokenizer:
    """A byte-level BPE without merges whose first ids are `specials` (0, 1, ...), then the
    256 byte symbols, then the `plain` added tokens."""
    symbols = [*specials, *sorted(pre_tokenizers.ByteLevel.alphabet())]
    inner = tokenizers.Tokenizer(models.BPE({s: i for i, s in enumerate(symbols)}, []))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    inner.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return inner


def frame(inner: tokenizers.Tokenizer, **names: str) -> corpus.DocumentFrame:
    return corpus.document_frame(Tokenizer(inner, **names), "model-x")


def test_the_project_bpe_keeps_bos_doc_eos() -> None:
    inner = bpe.train_bpe([TEXT] * 20, vocab_size=300)
    assert frame(inner) == frame(inner, bos_token=bpe.BOS, eos_token=bpe.EOS)
    assert frame(inner) == corpus.DocumentFrame(bos=0, eos=1)


def test_chat_turn_markers_give_way_to_the_end_of_text_token() -> None:
    # SmolLM2-Instruct names <|im_start|> / <|im_end|> its bos / eos: documents end in
    # <|endoftext|> as in its pretraining, with no bos.
    chatml = byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert frame(chatml, bos_token="<|im_start|>", eos_token="<|im_end|>") == (
        corpus.DocumentFrame(bos=None, eos=0)
    )
    llama3 = byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    assert frame(llama3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>") == (
        corpus.DocumentFrame(bos=0, eos=1)
    )
    # Spellings that name no turn are the tokenizer's own, however unusual.
    odd = byte_level(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"])
    assert frame(odd, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>") == (
        corpus.DocumentFrame(bos=0, eos=1)
    )


def test_a_tokenizer_without_bos_or_eos_is_one_line_naming_it() -> None:
    for inner, names in (
        (byte_level([]), {}),
        (byte_level(["<|im_start|>", "<|im_end|>"]), {"eos_token": "<|im_end|>"}),
    ):
        with pytest.raises(ValueError, match=r"^model-x: the tokenizer has no bos or eos") as got:
            frame(inner, **names)
        assert "\n" not in str(got.value)


def test_pack_leaves_out_a_missing_id() -> None:
    assert corpus.pack([[5, 6], [7]], bos_id=None, eos_id=0).tolist() == [5, 6, 0, 7, 0]
    assert corpus.pack([[5, 6], [7]], bos_id=3, eos_id=None).tolist() == [3, 5, 6, 3, 7]


def test_streams_are_framed_once_even_where_the_tokenizer_adds_a_bos(tmp_path: Path) -> None:
    """A Llama-style post-processor adds <s> to every encoding; the packed stream must still
    hold exactly one <s> and one </s> per document."""
    inner = byte_level(["<s>", "</s>"])
    inner.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    tokenizer = Tokenizer(inner)
    assert tokenizer.encode("a")[0] == 0
    for name, text in (("a.py", "x = 1\n"), ("b.py", "y = 2\n")):
        (tmp_path / name).write_text(text)
    split = corpus.discover(tmp_path, heldout_fraction=0.0)
    stream, heldout = load_split_streams(split, tokenizer, corpus.document_frame(tokenizer, "t"))
    body = tokenizer.encode("x = 1\n", add_special_tokens=False)
    assert stream.tolist()[: len(body) + 2] == [0, *body, 1]
    assert (stream == 0).sum() == (stream == 1).sum() == 2
    assert heldout is None


def test_saved_tokenizer_loads_back_the_same(tmp_path: Path) -> None:
    inner = byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=("<repo>",))
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    ours = Tokenizer(
        inner, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=template
    )
    ours.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    sample = f"<|im_start|>user\n{TEXT}<repo><|im_end|><|endoftext|>"
    assert back.encode(sample) == ours.encode(sample)
    assert (back.bos_id, back.eos_id, back.stop_ids) == (1, 2, ours.stop_ids)
    assert back.chat_template == template
    messages = [{"role": "user", "content": "hi"}]
    assert back.chat_prompt_ids(messages) == ours.chat_prompt_ids(messages)
