"""Text to token ids and back, and streaming detokenisation that never emits half a character.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` loaded from a `tokenizer.json` (the
format every Llama, Qwen2 and Mistral checkpoint ships, and the one `lm.training.bpe` writes),
or built from the vocabulary and merges inside a `.gguf` file (`lm.gguf`).

`IncrementalDetokenizer` turns a growing list of ids into text deltas.  Decoding one token at a
time is wrong in two ways: a byte-level token can hold part of a UTF-8 character (an emoji is
often four tokens of one byte each), and SentencePiece-style decoders drop the leading space of
the first token they see.  The standard fix (Hugging Face TGI, vLLM) keeps two offsets into the
ids: `read_offset`, the end of what has been emitted, and `prefix_offset`, where the previous
emission started.  Each push decodes ids[prefix_offset:read_offset] and ids[prefix_offset:]; the
new text is the second minus the first, so the tokens before `read_offset` give the new ones
their context.  While the decoded text ends in U+FFFD (an incomplete character) nothing is
emitted and the offsets stay, so the bytes are decoded again once the character is complete.

Example: with byte tokens for "🙂" (F0 9F 99 82) pushed one at a time after "hi", the pushes
return "", "", "" and then "🙂"; nothing ever contains U+FFFD.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tokenizers

from lm.chat import plain_chat_prompt, render_chat_template
from lm.errors import CheckpointError
from lm.gguf import read_gguf_tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Special-token spellings of the common model families, tried when no config names them.
BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]")
EOS_NAMES = ("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
# Special tokens that close a chat turn (ChatML, Llama 3, Phi-3, Gemma): generation stops
# on them as on the end-of-sequence token.
END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
# Special tokens that open a chat turn (ChatML, Llama 3, Gemma); an instruct model may name one
# its bos_token (SmolLM2's <|im_start|>), but it marks a turn, not the start of a document.
START_OF_TURN_NAMES = ("<|im_start|>", "<|start_header_id|>", "<start_of_turn>")
# Prompt tokens decoded before the first generated one, as context for its leading space.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its begin- and end-of-sequence tokens.

    bos_token, eos_token: the special tokens' spellings (as in tokenizer_config.json); when
    None, the first special token spelled like one of BOS_NAMES / EOS_NAMES is used, if any.
    chat_template: the checkpoint's Jinja chat template, rendered by `chat_prompt_ids`.
    """

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._inner = inner
        self.chat_template = chat_template
        self._bos_id = self._special_id("bos_token", bos_token, BOS_NAMES)
        self._eos_id = self._special_id("eos_token", eos_token, EOS_NAMES)
        # What a chat template sees: the spellings the checkpoint names (as transformers'
        # special_tokens_map), not the ones guessed from BOS_NAMES / EOS_NAMES.
        self._template_tokens = {
            name: token
            for name, token in (("bos_token", bos_token), ("eos_token", eos_token))
            if token is not None
        }

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json; special tokens are found by their usual spellings."""
        return cls(_load(Path(path)))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer a `.gguf` file holds, with its bos/eos and chat template."""
        found = read_gguf_tokenizer(path)
        return cls(
            found.inner,
            bos_token=found.bos_token,
            eos_token=found.eos_token,
            chat_template=found.chat_template,
        )

    @staticmethod
    def found_in(path: str | Path) -> bool:
        """Whether `from_dir(path)` has a tokenizer to load: a model directory with a
        tokenizer.json, or a `.gguf` file (which always holds one)."""
        path = Path(path)
        if path.suffix == ".gguf":
            return path.is_file()
        return (path / "tokenizer.json").is_file()

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load `directory`/tokenizer.json, with the bos/eos spellings and chat template of
        tokenizer_config.json when that file exists (it is optional). A `.gguf` file in
        place of the directory is read by `from_gguf`."""
        directory = Path(directory)
        if directory.suffix == ".gguf" and directory.is_file():
            return cls.from_gguf(directory)
        inner = _load(directory / TOKENIZER_FILE)
        config_path = directory / TOKENIZER_CONFIG_FILE
        if not config_path.is_file():
            return cls(inner)
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("the top level must be a JSON object")
            template = config.get("chat_template")
            return cls(
                inner,
                bos_token=_token_content(config.get("bos_token")),
                eos_token=_token_content(config.get("eos_token")),
                chat_template=template if isinstance(template, str) else None,
            )
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            raise CheckpointError(f"{config_path}: {error}") from error

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (a model's embedding may be padded beyond it)."""
        return self._inner.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def special_tokens(self) -> dict[str, int]:
        """Spelling -> id of every special added token (matched whole, skipped when decoding)."""
        return {
            added.content: token_id
            for token_id, added in self._inner.get_added_tokens_decoder().items()
            if added.special
        }

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: the end-of-sequence token, then every special token
        spelled like an end of sequence or of a chat turn (EOS_NAMES, END_OF_TURN_NAMES).
        SmolLM2's ChatML: (2, 0) for <|im_end|> (its eos) and <|endoftext|>."""
        special = self.special_tokens
        found = [special[n] for n in (*END_OF_TURN_NAMES, *EOS_NAMES) if n in special]
        first = [] if self._eos_id is None else [self._eos_id]
        return tuple(dict.fromkeys([*first, *found]))

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt for a chat ({"role", "content"} dicts) with an open assistant turn:
        the chat template rendered as transformers' `apply_chat_template(messages,
        add_generation_prompt=True)` and encoded as it does (no special tokens added: the
        template writes them); without a template, `plain_chat_prompt`'s text, encoded as
        any text prompt."""
        if self.chat_template is None:
            return self.encode(plain_chat_prompt(messages))
        text = render_chat_template(
            self.chat_template, messages, add_generation_prompt=True, **self._template_tokens
        )
        return self.encode(text, add_special_tokens=False)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens runs the tokenizer's post-processor (which
        adds BOS for Llama-style tokenizers)."""
        return self._inner.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[int]]:
        """`encode` of each text, in parallel (the Rust side uses every core)."""
        encodings = self._inner.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        return self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write `directory`/tokenizer.json and a tokenizer_config.json naming the bos/eos
        spellings and chat template this tokenizer was given, so that `from_dir(directory)`
        (and transformers' AutoTokenizer) load the same tokenizer: how a model read from a
        `.gguf` file hands its tokenizer to a directory model, e.g. a distilled draft."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._inner.save(str(directory / TOKENIZER_FILE))
        config: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update(self._template_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    def _special_id(self, field: str, token: str | None, names: Sequence[str]) -> int | None:
        if token is not None:
            token_id = self._inner.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{field}: {token!r} is not in the vocabulary")
            return token_id
        special = self.special_tokens
        return next((special[name] for name in names if name in special), None)


class IncrementalDetokenizer:
    """Text deltas for the ids generated after `prompt_ids` (see the module doc).

    push(ids) returns only the new text; `text` is everything emitted so far; rollback(k)
    forgets all but the first k generated ids, for tokens that turned out to be unverified.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids)
        self._start = len(self._ids)
        self._text = ""
        # (read_offset, prefix_offset, len(text)) at the start and after every emission;
        # rollback returns to the last one that does not need a dropped id.
        self._states = [(self._start, max(self._start - PROMPT_CONTEXT_TOKENS, 0), 0)]

    @property
    def text(self) -> str:
        return self._text

    def push(self, ids: Iterable[int]) -> str:
        """Append generated ids; return the text they complete ("" while a character is open)."""
        self._ids.extend(ids)
        return self._emit(allow_incomplete=False)

    def flush(self) -> str:
        """Emit whatever is held back, incomplete characters (as U+FFFD) included: for the end
        of a generation that stopped inside a character."""
        return self._emit(allow_incomplete=True)

    def rollback(self, keep_tokens: int) -> int:
        """Keep only the first `keep_tokens` generated ids; return len(text) afterwards.

        The remaining text is a prefix of what was emitted, exactly the text those ids had
        produced; ids that were held back become held back again.
        """
        generated = len(self._ids) - self._start
        if not 0 <= keep_tokens <= generated:
            raise ValueError(f"keep_tokens: must be in [0, {generated}], got {keep_tokens}")
        end = self._start + keep_tokens
        del self._ids[end:]
        while self._states[-1][0] > end:
            self._states.pop()
        self._text = self._text[: self._states[-1][2]]
        return len(self._text)

    def _emit(self, *, allow_incomplete: bool) -> str:
        read_offset, prefix_offset, _ = self._states[-1]
        if len(self._ids) == read_offset:
            return ""
        prefix_text = self._tokenizer.decode(self._ids[prefix_offset:read_offset])
        full_text = self._tokenizer.decode(self._ids[prefix_offset:])
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith(REPLACEMENT_CHAR) and not allow_incomplete:
            return ""
        delta = full_text[len(prefix_text) :]
        self._text += delta
        self._states.append((len(self._ids), read_offset, len(self._text)))
        return delta


def _load(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust binding raises a bare Exception
        raise CheckpointError(f"{path}: not a valid tokenizer file ({error})") from error


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, an AddedToken dict, null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or {{'content': ...}}, got {value!r}")
