"""Prompt preparation (chat template, tokenization, output grammar) in helper processes, in two
lanes.

The front end must know a prompt's length before it queues the request, but it never imports
llama_cpp; helper processes that load only the vocabulary (`vocab_only`, no weights: a second
or two even for Gemma-3-27B) do the work off the event loop and off the workers' decode path.
They also turn an output JSON schema into a grammar and have llama.cpp compile it once, so a
grammar llama.cpp refuses is a 400 here, never a failure in a worker; and they answer
`/tokenize` and `/detokenize`.

That work takes time in proportion to the conversation (rendering and tokenizing 50,000
messages took 20 s), so two things keep a long conversation from holding up everyone else:

- `PromptBounds`: before any rendering, a conversation whose text and message count cannot
  fit the context however it tokenizes is refused, in microseconds. The bounds are safe: each
  token stands for at most `max_token_bytes` bytes of text (the vocabulary's longest piece),
  and each message costs at least the template's special tokens for it.
- Two lanes, one helper process each, each first come first served: a conversation with little
  text and few messages goes to the short lane, any other to the long lane. A short request
  therefore never waits behind a long one, and long ones wait only for each other.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from wicore_cpp.engine.images import (
    IMAGE_BEGIN,
    IMAGE_END,
    ImageInput,
    decode_image,
    image_tokens,
)
from wicore_cpp.errors import (
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    UnsupportedValue,
    WicoreError,
)
from wicore_cpp.logs import LogSettings, configure_logging

log = logging.getLogger("wicore.tokenizer")

T = TypeVar("T")

# Used only when a GGUF carries no chat template of its own.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# What the short lane takes: a conversation this small renders and tokenizes in a few
# milliseconds, so nothing in that lane waits long for what is ahead of it.
SHORT_LANE_MAX_BYTES = 64 * 1024
SHORT_LANE_MAX_MESSAGES = 256


class Lane(enum.Enum):
    SHORT = "short"
    LONG = "long"


@dataclass(slots=True, frozen=True)
class PromptSize:
    """What can be known of a conversation without rendering it."""

    num_messages: int
    num_bytes: int  # UTF-8 bytes of all the messages' text
    num_images: int = 0

    @classmethod
    def of(cls, messages: Sequence[dict[str, Any]]) -> PromptSize:
        num_bytes = num_images = 0
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                num_bytes += len(content.encode("utf-8"))
                continue
            for part in content:  # text and image parts (user messages with images)
                if part["type"] == "text":
                    num_bytes += len(part["text"].encode("utf-8"))
                else:
                    num_images += 1
        return cls(len(messages), num_bytes, num_images)

    @classmethod
    def of_text(cls, text: str) -> PromptSize:
        return cls(1, len(text.encode("utf-8")))

    @property
    def lane(self) -> Lane:
        # Decoding an image takes time in proportion to its pixels, which its file's size does
        # not tell (a small PNG can be 25 megapixels of one colour): images go to the long lane.
        if (self.num_messages <= SHORT_LANE_MAX_MESSAGES and self.num_bytes <= SHORT_LANE_MAX_BYTES
                and not self.num_images):
            return Lane.SHORT
        return Lane.LONG


@dataclass(slots=True, frozen=True)
class PromptBounds:
    """Facts about a model's vocabulary and template that bound a prompt's length from below."""

    max_token_bytes: int  # the most bytes of text one token stands for
    min_message_tokens: int  # the fewest tokens the template spends on one message

    def min_tokens(self, size: PromptSize) -> int:
        """Tokens the rendered conversation has at least (never more than it really has)."""
        by_text = -(-size.num_bytes // self.max_token_bytes)
        return max(by_text, size.num_messages * self.min_message_tokens)


@dataclass(slots=True, frozen=True)
class HelperInfo:
    pid: int
    bounds: PromptBounds


# -- the helper process --------------------------------------------------------------------------


@dataclass(slots=True)
class _ChildState:
    model: Any
    template: Any
    bounds: PromptBounds


# A helper process keeps its loaded vocabulary here between calls: a process pool task can
# only be a module-level function, so the state has to live at module level (in the helper
# only; the front end never sets it).
_child: _ChildState | None = None


def _child_init(model_path: str, log_settings: LogSettings) -> None:
    global _child
    configure_logging(log_settings, "tokenizer")
    from wicore_cpp.engine.backend import Model
    from wicore_cpp.engine.chat_template import ChatTemplate

    model = Model(Path(model_path), vocab_only=True)
    source = model.info.chat_template
    if source is None:
        log.warning("%s has no chat template; using a generic one", model_path)
        source = FALLBACK_TEMPLATE
    template = ChatTemplate(source, bos_token=model.info.bos_token, eos_token=model.info.eos_token)
    _child = _ChildState(model, template, PromptBounds(1, 1))
    _child.bounds = PromptBounds(model.longest_piece_bytes(), _min_message_tokens(_child))


def _min_message_tokens(state: _ChildState) -> int:
    """Special tokens the template writes per message (Gemma: `<start_of_turn>` and
    `<end_of_turn>`). Only those count: plain template text can merge with a message's text
    into fewer tokens, a special token never does. At least 1."""

    def specials(num_pairs: int) -> int:
        turns = [{"role": role, "content": ""} for _ in range(num_pairs)
                 for role in ("user", "assistant")]
        return sum(state.model.is_control(t) for t in _encode(state, turns))

    try:
        per_message = (specials(2) - specials(1)) // 2
    except InvalidRequest:  # a template that refuses empty turns: assume the least
        per_message = 0
    return max(1, per_message)


def _encode(state: _ChildState, messages: list[dict[str, str]]) -> list[int]:
    text = state.template.render(messages)
    bos = state.model.info.bos_token
    # A template that writes <bos> itself must not get a second one from the tokenizer.
    add_special = not (bos and text.startswith(bos))
    return state.model.tokenize(text, add_special=add_special, parse_special=True)


def _encode_with_images(state: _ChildState, messages: list[dict[str, Any]],
                        digests: list[bytes], n_image_tokens: int,
                        ) -> tuple[list[int], list[tuple[int, int, bytes]]]:
    """The prompt of a conversation with images, laid out as libmtmd's `mtmd_tokenize` lays it
    out (tests/test_images.py holds the two side by side): the text around each
    `<start_of_image>` the template wrote is tokenized apart, and the image's positions follow
    that token, closed by `<end_of_image>`. Returns the tokens and each image's
    (position, token count, pixel hash)."""
    text = state.template.render(messages)
    pieces = text.split(IMAGE_BEGIN)
    if len(pieces) - 1 != len(digests):
        if len(pieces) == 1:
            raise InvalidRequest("this model's chat template does not place images",
                                 param="messages")
        raise InvalidRequest(f"the messages' text contains {IMAGE_BEGIN!r}, which marks an "
                             f"image for this model; remove it from the text", param="messages")
    model = state.model
    bos = model.info.bos_token
    add_special = not (bos and text.startswith(bos))
    begin = model.tokenize(IMAGE_BEGIN, add_special=False, parse_special=True)
    end = model.tokenize(IMAGE_END, add_special=False, parse_special=True)
    tokens = model.tokenize(pieces[0], add_special=add_special, parse_special=True)
    spans = []
    for digest, piece in zip(digests, pieces[1:], strict=True):
        tokens += begin
        spans.append((len(tokens), n_image_tokens, digest))
        tokens += image_tokens(digest, n_image_tokens)
        tokens += end
        if piece:
            tokens += model.tokenize(piece, add_special=False, parse_special=True)
    return tokens, spans


@dataclass(slots=True, frozen=True)
class PromptJob:
    """What the helper prepares for one request: exactly one of `messages` (chat turns for
    the template), `text` (a raw prompt) and `token_ids` (a prompt already tokenized); and,
    when the output is constrained, the JSON schema it must follow (checked already)."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    schema: Any = None
    schema_param: str = "response_format"
    grammar_triggers: tuple[str, ...] = ()
    token_params: tuple[tuple[int, str], ...] = ()  # ids to check are in the vocabulary
    # The images of `messages` (their `{"type": "image"}` parts, in order): each is decoded
    # and checked (at most `max_pixels`) and takes `image_tokens` positions.
    images: tuple[ImageInput, ...] = ()
    image_tokens: int = 0
    max_pixels: int = 0

    @property
    def size(self) -> PromptSize:
        """What decides the job's lane and its cheap lower bound, before any work."""
        if self.messages is not None:
            return PromptSize.of(self.messages)
        if self.text is not None:
            return PromptSize.of_text(self.text)
        return PromptSize(0, 0)  # token ids: nothing to render or tokenize


@dataclass(slots=True, frozen=True)
class PreparedPrompt:
    tokens: list[int]
    grammar: str | None  # GBNF that llama.cpp has compiled once
    # Each image's (position, token count, pixel hash), in the order of the job's images.
    images: tuple[tuple[int, int, bytes], ...] = ()


def _child_prepare(job: PromptJob) -> PreparedPrompt:
    assert _child is not None  # set by the pool initializer before any task runs
    model = _child.model
    n_vocab = model.info.n_vocab
    for token, param in job.token_params:
        if not 0 <= token < n_vocab:
            raise InvalidRequest(f"token id {token} is not in the vocabulary (0-{n_vocab - 1})",
                                 param=param)
    spans: list[tuple[int, int, bytes]] = []
    if job.images:
        digests = [decode_image(image.data, image.param, job.max_pixels).digest
                   for image in job.images]
        tokens, spans = _encode_with_images(_child, job.messages or [], digests,
                                            job.image_tokens)
    elif job.messages is not None:
        tokens = _encode(_child, job.messages)
    elif job.text is not None:
        tokens = model.tokenize(job.text, add_special=True, parse_special=True)
    else:
        tokens = list(job.token_ids or [])
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is not in the vocabulary (0-{n_vocab - 1})",
                                 param="prompt")
    grammar = None
    if job.schema is not None:
        grammar = _compile_grammar(job.schema, job.schema_param, job.grammar_triggers)
    return PreparedPrompt(tokens, grammar, tuple(spans))


def _compile_grammar(schema: Any, param: str, triggers: tuple[str, ...]) -> str:
    import llama_cpp as lc

    from wicore_cpp.engine.backend import GrammarError, init_grammar
    from wicore_cpp.engine.schema_grammar import schema_to_grammar

    try:
        grammar = schema_to_grammar(schema)
    except UnsupportedValue as exc:
        exc.param = param
        raise
    try:
        ptr = init_grammar(_child.model, grammar, triggers)
    except GrammarError as exc:
        raise UnsupportedValue(f"JSON schema: llama.cpp cannot compile its grammar ({exc})",
                               param=param) from None
    lc.llama_sampler_free(ptr)
    return grammar


def _child_tokenize(text: str, add_special: bool, parse_special: bool,
                    with_pieces: bool) -> list[int] | list[tuple[int, bytes]]:
    assert _child is not None
    model = _child.model
    tokens = model.tokenize(text, add_special=add_special, parse_special=parse_special)
    if with_pieces:
        return [(t, model.special_piece(t)) for t in tokens]
    return tokens


def _child_detokenize(tokens: list[int]) -> str:
    assert _child is not None
    model = _child.model
    n_vocab = model.info.n_vocab
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is not in the vocabulary (0-{n_vocab - 1})",
                             param="tokens")
    return b"".join(model.special_piece(t) for t in tokens).decode("utf-8", errors="replace")


def _child_info() -> HelperInfo:
    assert _child is not None
    return HelperInfo(os.getpid(), _child.bounds)


# -- the front end's side ------------------------------------------------------------------------


class _HelperLane:
    """One helper process and the requests waiting for it."""

    def __init__(self, lane: Lane, model_path: Path, log_settings: LogSettings,
                 max_waiting: int):
        self.lane = lane
        self._model_path = model_path
        self._log_settings = log_settings
        self.max_waiting = max_waiting
        self.num_waiting = 0  # submitted and not yet answered, the one running included
        self.pid: int | None = None
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(str(self._model_path), self._log_settings),
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the helper; ServiceUnavailable if it died (a new one starts),
        RateLimited if `max_waiting` calls wait already."""
        if self.num_waiting >= self.max_waiting:
            raise RateLimited(
                f"{self.num_waiting} prompts are already waiting to be tokenized in the "
                f"{self.lane.value} lane", retry_after=1)
        self.num_waiting += 1
        try:
            if self.pid is None:  # a new helper: learn its pid first
                self.pid = (await self._call(_child_info)).pid
            return await self._call(fn, *args)
        finally:
            self.num_waiting -= 1

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokenProcessPool:
            log.error("%s-lane tokenizer process died; starting a new one", self.lane.value)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            self.pid = None
            raise ServiceUnavailable("the tokenizer restarted; retry the request",
                                     retry_after=1) from None

    async def start(self) -> HelperInfo:
        return await self.run(_child_info)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class PromptTokenizer:
    """Front-end handle to the tokenizer helpers of one model."""

    def __init__(self, model_path: Path, log_settings: LogSettings | str | None = None,
                 max_waiting: int = 32):
        """`log_settings`: the helpers' logging (a level name alone will do);
        `max_waiting`: prompts one lane holds (running and waiting) before it answers 429."""
        if not isinstance(log_settings, LogSettings):
            log_settings = LogSettings(level=(log_settings or "INFO").upper())
        self._lanes = {lane: _HelperLane(lane, model_path, log_settings, max_waiting)
                       for lane in Lane}
        self._started: asyncio.Task[PromptBounds] | None = None

    async def start(self) -> None:
        """Load the vocabulary in both helpers now, so the first request does not pay for it."""
        try:
            await self.bounds()
        except WicoreError as exc:  # the next request tries again
            log.error("tokenizer helpers did not start: %s", exc.message)

    async def bounds(self) -> PromptBounds:
        """The model's prompt bounds (known once the helpers have loaded). Raises
        ServiceUnavailable when a helper died starting; the next call starts again."""
        started = self._started
        if started is None or (started.done() and (started.cancelled() or started.exception())):
            self._started = started = asyncio.ensure_future(self._start())
        return await asyncio.shield(started)

    async def _start(self) -> PromptBounds:
        infos = await asyncio.gather(*(helper.start() for helper in self._lanes.values()))
        bounds = infos[0].bounds
        log.info("tokenizer helpers ready (pids %s): a token is at most %d bytes, a message "
                 "at least %d tokens", ", ".join(str(i.pid) for i in infos),
                 bounds.max_token_bytes, bounds.min_message_tokens)
        return bounds

    def helper_pids(self) -> dict[str, int | None]:
        """Each lane's helper process id (None before it started)."""
        return {lane.value: helper.pid for lane, helper in self._lanes.items()}

    async def prepare(self, job: PromptJob) -> PreparedPrompt:
        """Render with the model's template (or take the raw prompt) and tokenize, and compile
        the output grammar, in the lane for the job's size. Raises InvalidRequest for a
        conversation the template rejects, a schema llama.cpp cannot compile or a token id
        outside the vocabulary, ServiceUnavailable if the helper died, RateLimited if too many
        prompts wait in that lane."""
        try:
            return await self._lanes[job.size.lane].run(_child_prepare, job)
        except InvalidRequest as exc:
            exc.param = exc.param or ("messages" if job.messages is not None else "prompt")
            raise

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render with the model's template and tokenize."""
        return (await self.prepare(PromptJob(messages=messages))).tokens

    async def tokenize(self, text: str, *, add_special: bool, parse_special: bool,
                       with_pieces: bool) -> list[int] | list[tuple[int, bytes]]:
        lane = PromptSize.of_text(text).lane
        return await self._lanes[lane].run(_child_tokenize, text, add_special, parse_special,
                                           with_pieces)

    async def detokenize(self, tokens: list[int]) -> str:
        lane = Lane.SHORT if len(tokens) <= SHORT_LANE_MAX_BYTES // 4 else Lane.LONG
        return await self._lanes[lane].run(_child_detokenize, tokens)

    def close(self) -> None:
        if self._started is not None:
            self._started.cancel()
        for helper in self._lanes.values():
            helper.close()
