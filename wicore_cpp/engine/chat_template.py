"""Renders a conversation with the GGUF's own Jinja chat template.

llama.cpp's `llama_chat_apply_template` only pattern-matches known formats; running the
template itself is what makes Gemma 3 fold a system message into the first user turn exactly
as Google wrote it. The sandbox keeps a template from reaching anything but its inputs.
"""

from __future__ import annotations

from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from wicore_cpp.errors import InvalidRequest


class TemplateRejected(InvalidRequest):
    """The template refused the conversation (e.g. roles that do not alternate)."""


def _raise_exception(message: str) -> None:
    raise TemplateRejected(f"chat template: {message}", param="messages")


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str):
        # Same settings as Hugging Face's renderer, which these templates are written for.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateRejected:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"chat template failed: {exc}", param="messages") from None
