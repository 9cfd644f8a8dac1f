"""A checkpoint's chat template, rendered from role messages as HF's `apply_chat_template` does.

The template comes from `chat_template.jinja`, else from `tokenizer_config.json`'s
`chat_template` (a string, or a list of named templates of which "default" is used). It is
rendered in a sandboxed jinja2 environment with HF's settings (`trim_blocks`,
`lstrip_blocks`, `loopcontrols`, their `tojson`, `raise_exception` and `strftime_now`), and
gets the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: a bad role, or the template refused them."""


class NoChatTemplate(ChatTemplateError):
    """The checkpoint has no chat template at all."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


def find_template(folder: str | Path | None) -> str | None:
    """The folder's chat template source, or None when it has none."""
    if folder is None:
        return None
    folder = Path(folder)
    file = folder / TEMPLATE_FILE
    if file.is_file():
        return file.read_text()
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: HF uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not parse: {e}") from e
        self._special = dict(special_tokens)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        if not messages:
            raise ChatTemplateError("messages is empty")
        for i, m in enumerate(messages):
            if m.role not in ROLES:
                raise ChatTemplateError(
                    f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}"
                )
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self._special,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from e


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    # HF's filter: jinja's own escapes HTML characters, which would change the prompt.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)
