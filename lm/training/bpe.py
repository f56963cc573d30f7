"""Byte-level BPE training with Hugging Face `tokenizers`, saved as `tokenizer.json`.

Byte-level (GPT-2 style) means every string round-trips: the base alphabet is the 256 bytes, so
no text is ever mapped to an unknown token.  Runs of spaces are their own pre-tokens, which suits
code: indentation levels become single tokens after training.  The special tokens come first, so
their ids are fixed whatever the corpus: <|bos|> = 0, <|eos|> = 1, <|pad|> = 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Learn byte-level BPE merges from `texts` until the vocabulary has `vocab_size` entries."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size: must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, *, max_length: int) -> None:
    """Write `tokenizer.json` plus the `tokenizer_config.json` that `transformers.AutoTokenizer`
    needs to name the special tokens."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": max_length,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def special_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) ids; ValueError naming the token if the tokenizer lacks one."""
    ids = []
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer: special token {token} missing")
        ids.append(token_id)
    return ids[0], ids[1], ids[2]
