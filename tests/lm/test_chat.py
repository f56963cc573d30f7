"""Chat templates rendered as transformers' `apply_chat_template` renders them: a template
written here (compared with `PreTrainedTokenizerFast` given the same template) and the
real SmolLM2 tokenizer's own; and the plain format for models without a template."""

from __future__ import annotations

import jinja2
import pytest

from edge_node.output import Output, stop_ids
from lm.chat import plain_chat_prompt, render_chat_template
from lm.tokenizer import Tokenizer
from lm.training.bpe import BOS, EOS, train_bpe
from protocol.types import FinishReason

# Exercises what transformers' environment adds: trim_blocks / lstrip_blocks, loop
# controls, the non-escaping tojson filter, raise_exception, namespace, bos/eos tokens.
TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['content'] == 'skip me' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{% if message['role'] == 'tool' %} {{ message | tojson }}{% endif %}
{% if message['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}

{% endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}[{{ ns.turns }} turns]"""

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "def add(a, b):"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi <b>&</b> café 🙂"},
        {"role": "assistant", "content": "  Hello.  "},
        {"role": "user", "content": "skip me"},
        {"role": "tool", "content": "{\"x\": 'y'}"},
        {"role": "user", "content": "And now?"},
    ],
    "one_user": [{"role": "user", "content": "What is 2 + 2?"}],
}
LINES = ["def add(a, b):\n    return a + b\n", "Hello, how are you?\n", "café 🙂 <b>&</b>\n"] * 10


@pytest.fixture(scope="module")
def pair() -> tuple[Tokenizer, object]:
    """(ours, transformers') tokenizers over one tiny BPE, with TEMPLATE."""
    transformers = pytest.importorskip("transformers")
    inner = train_bpe(LINES, vocab_size=300)
    ours = Tokenizer(inner, bos_token=BOS, eos_token=EOS, chat_template=TEMPLATE)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token=BOS, eos_token=EOS, chat_template=TEMPLATE
    )
    return ours, theirs


def their_text(theirs, messages, add_generation_prompt: bool) -> str:
    return theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def assert_renders_as_transformers(ours, theirs, messages, add_generation_prompt: bool):
    """Our rendering of `ours.chat_template` equals transformers' text; with the generation
    prompt, our prompt ids equal transformers' tokenized chat."""
    expected = their_text(theirs, messages, add_generation_prompt)
    text = render_chat_template(
        ours.chat_template,
        messages,
        add_generation_prompt=add_generation_prompt,
        **theirs.special_tokens_map,
    )
    assert text == expected
    if add_generation_prompt:
        their_ids = theirs.apply_chat_template(messages, add_generation_prompt=True)
        their_ids = getattr(their_ids, "input_ids", their_ids)  # a BatchEncoding in v5
        assert ours.chat_prompt_ids(messages) == list(their_ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_written_template_renders_as_transformers(pair, name, add_generation_prompt):
    assert_renders_as_transformers(*pair, CONVERSATIONS[name], add_generation_prompt)


def test_written_template_raises_as_transformers(pair):
    ours, theirs = pair
    messages = [{"role": "robot", "content": "beep"}]
    with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
        their_text(theirs, messages, True)
    with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
        ours.chat_prompt_ids(messages)


def test_the_sandbox_refuses_what_transformers_refuses():
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template(escape, [{"role": "user", "content": "x"}])


def test_plain_format_without_a_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert plain_chat_prompt(messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    tokenizer = Tokenizer(train_bpe(LINES, vocab_size=300))
    assert tokenizer.chat_template is None
    assert tokenizer.chat_prompt_ids(messages) == tokenizer.encode(plain_chat_prompt(messages))


def test_output_stops_at_any_eos_id_and_at_stop_strings():
    tokenizer = Tokenizer(train_bpe(LINES, vocab_size=300))
    ids = tokenizer.encode("Hello, how are you?", add_special_tokens=False)
    out = Output([], 50, eos_ids=(7, 1))  # the second id ends it
    chunk = out.emit([*ids[:2], 1, *ids[2:]], verified=True)
    assert chunk.tokens == tuple(ids[:2]) and out.finish_reason is FinishReason.STOP
    stopped = Output([], 50, stop=("how",), eos_ids=stop_ids(None, tokenizer), tokenizer=tokenizer)
    stopped.emit(ids, verified=True)
    assert stopped.text == "Hello, " and stopped.finish_reason is FinishReason.STOP
    assert stop_ids(9, tokenizer) == (9, tokenizer.eos_id)


@pytest.fixture(scope="module")
def real_tokenizers(real_gguf):
    """(ours, transformers') tokenizers of the real SmolLM2 GGUF; no model weights."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF")
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    return Tokenizer.from_dir(real_gguf), theirs


@pytest.mark.real_model
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_real_template_renders_as_transformers(real_tokenizers, name, add_generation_prompt):
    assert_renders_as_transformers(*real_tokenizers, CONVERSATIONS[name], add_generation_prompt)


@pytest.mark.real_model
def test_real_stop_ids_end_a_chatml_turn(real_tokenizers):
    ours, _ = real_tokenizers
    assert ours.stop_ids == (2, 0)  # <|im_end|> (the GGUF's eos), <|endoftext|>
