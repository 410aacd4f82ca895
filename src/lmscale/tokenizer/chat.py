"""Chat templates: a model's Jinja template turns a list of messages into the prompt text.

Rendered the way Hugging Face `transformers` renders them (a sandboxed environment with
`trim_blocks` and `lstrip_blocks`, `raise_exception`, `strftime_now` and an unescaped `tojson`), so
the same template gives the same text here as there.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmscale.errors import LmscaleError

Message = dict[str, str]


def render_chat(
    template: str,
    messages: list[Message],
    add_generation_prompt: bool = True,
    **special: str | None,
) -> str:
    """Render `messages` through a chat template.

    Args:
        template: the Jinja source (as in `tokenizer_config.json`'s `chat_template`).
        messages: dicts with at least "role" and "content".
        add_generation_prompt: end with the header that opens the assistant's turn.
        **special: template variables such as `bos_token` and `eos_token`.

    Returns:
        The prompt text (special tokens appear literally; encode it without adding more).
    """
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            **special,
        )
    except jinja2.TemplateError as err:
        raise LmscaleError(f"chat template failed: {err}") from None


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template text; a syntax error is the template author's mistake."""
    # NOTE: chat templates come from downloaded checkpoints: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise LmscaleError(f"malformed chat template (line {err.lineno}): {err.message}") from None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
