"""Prompt preparation (chat template + tokenization) in a helper process.

The front end must know a prompt's length before it queues the request, but it never imports
llama_cpp; a one-process pool that loads only the vocabulary (`vocab_only`, no weights: a
second or two even for Gemma-3-27B) does the work off the event loop and off the workers'
decode path.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from wicore_cpp.errors import InvalidRequest, ServiceUnavailable

log = logging.getLogger("wicore.tokenizer")

# Used only when a GGUF carries no chat template of its own.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(slots=True)
class _ChildState:
    model: object
    template: object


# The pool's child process keeps its loaded vocabulary here between calls: a process pool
# task can only be a module-level function, so the state has to live at module level (in the
# child only; the front end never sets it).
_child: _ChildState | None = None


def _child_init(model_path: str, log_level: str) -> None:
    global _child
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s tokenizer %(name)s: %(message)s")
    from wicore_cpp.engine.backend import Model
    from wicore_cpp.engine.chat_template import ChatTemplate

    model = Model(Path(model_path), vocab_only=True)
    source = model.info.chat_template
    if source is None:
        log.warning("%s has no chat template; using a generic one", model_path)
        source = FALLBACK_TEMPLATE
    template = ChatTemplate(source, bos_token=model.info.bos_token, eos_token=model.info.eos_token)
    _child = _ChildState(model, template)


def _child_encode_chat(messages: list[dict[str, str]]) -> list[int]:
    assert _child is not None  # set by the pool initializer before any task runs
    text = _child.template.render(messages)
    bos = _child.model.info.bos_token
    # A template that writes <bos> itself must not get a second one from the tokenizer.
    add_special = not (bos and text.startswith(bos))
    return _child.model.tokenize(text, add_special=add_special, parse_special=True)


def _child_ping() -> bool:
    return _child is not None


class PromptTokenizer:
    """Front-end handle to the tokenizer process of one model."""

    def __init__(self, model_path: Path, log_level: str = "INFO"):
        self._model_path = model_path
        self._log_level = log_level
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(str(self._model_path), self._log_level.upper()),
        )

    async def start(self) -> None:
        """Load the vocabulary now, so the first request does not pay for it."""
        await asyncio.get_running_loop().run_in_executor(self._pool, _child_ping)

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render with the model's template and tokenize. Raises InvalidRequest for a
        conversation the template rejects, ServiceUnavailable if the process died."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, _child_encode_chat, messages)
        except InvalidRequest as exc:
            exc.param = exc.param or "messages"
            raise
        except BrokenProcessPool:
            log.error("tokenizer process died; starting a new one")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            raise ServiceUnavailable("the tokenizer restarted; retry the request",
                                     retry_after=1) from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
