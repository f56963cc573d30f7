"""Chat messages to prompt text: the checkpoint's Jinja chat template, rendered the way
transformers' `apply_chat_template` renders it, or for a model without a template the
plain "Role: content" turns the bundled demo models read.

transformers renders in a sandbox (`ImmutableSandboxedEnvironment`: a template from the
Hub is untrusted code) with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` filter that does not escape HTML, and the globals
`raise_exception(message)` and `strftime_now(format)`; `{% generation %}` blocks (which
mark the assistant's tokens for training masks) render their body. The template sees `messages`,
`add_generation_prompt`, the tokenizer's special tokens (`bos_token`, `eos_token`) and any
extra keywords. Messages whose values are None lose those keys, as there.

Example (a ChatML template, add_generation_prompt=True):

    [{"role": "user", "content": "Hi"}]
    -> "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The plain format's role names; "developer" is OpenAI's newer name for "system".
PLAIN_ROLES = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, object]],
    *,
    add_generation_prompt: bool = True,
    **variables: object,
) -> str:
    """`template` rendered for `messages` ({"role", "content", ...} dicts) with
    `variables` (bos_token, eos_token, ...) as transformers renders it; a template's
    `raise_exception` raises `jinja2.TemplateError`."""
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    return _compiled(template).render(
        messages=chat, add_generation_prompt=add_generation_prompt, **variables
    )


def plain_chat_prompt(messages: Sequence[Mapping[str, object]]) -> str:
    """The prompt for a model without a chat template: every message becomes
    "<Role>: <content>" (PLAIN_ROLES), messages are separated by a blank line, and
    "Assistant:" closes the prompt for the model to continue.

    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    -> "System: Be brief.\\n\\nUser: Hi\\n\\nAssistant:"
    """
    turns = [f"{PLAIN_ROLES[m['role']]}: {m.get('content') or ''}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders the body, as transformers does
    when it is not computing an assistant-token mask."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """jinja2's own `tojson` escapes <, >, & and ' for HTML; chat templates want JSON."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
