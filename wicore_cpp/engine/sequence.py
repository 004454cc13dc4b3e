"""One request's decoding state inside a worker: prompt progress, output text, stop rules."""

from __future__ import annotations

import codecs

from wicore_cpp.engine.messages import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerateRequest,
    SeqUpdate,
    TokenLogprob,
)


class Sequence:
    """One choice of a request being decoded in one KV slot (a request with `n` choices has
    `n` sequences; choice 0 prefills the prompt and the others share its KV cells).

    Text leaves in deltas that never split a UTF-8 character (each sequence has its own
    incremental decoder) and never contain a stop string: the last `len(longest stop) - 1`
    characters are held back only while they could still begin one.
    """

    __slots__ = (
        "request_id", "index", "slot", "prompt", "params", "priority", "tenant", "sampler",
        "reservation",
        "n_cached", "last_token", "num_generated", "finish_reason", "error", "pending_choices",
        "_decoder", "_held", "_hold", "_out_text", "_out_tokens", "_out_logprobs",
        "generated",
    )

    def __init__(self, request: GenerateRequest, slot: int, sampler, reservation: int,
                 index: int = 0):
        self.request_id = request.request_id
        self.index = index
        self.slot = slot
        self.prompt = request.prompt_tokens
        self.params = request.params
        self.priority = request.priority
        self.tenant = request.tenant
        self.sampler = sampler
        self.reservation = reservation
        self.n_cached = 0  # tokens of this sequence already in the KV cache
        self.last_token = -1
        self.num_generated = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        # Choice 0 of a request with n > 1 holds the other choices' (slot, sampler) until its
        # prefill is done and they are fanned out (see ContinuousBatcher._fan_out_choices).
        self.pending_choices: list[tuple[int, object]] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self._hold = max((len(s) for s in self.params.stop), default=1) - 1
        self._out_text: list[str] = []
        self._out_tokens: list[int] = []
        self._out_logprobs: list[TokenLogprob] | None = (
            None if self.params.logprobs is None else [])
        self.generated: list[int] = []  # every accepted token, in order (see kv_tokens)

    @property
    def is_prefilling(self) -> bool:
        return self.n_cached < len(self.prompt)

    def kv_tokens(self) -> list[int]:
        """The tokens its KV cells hold, position by position: the prompt, then each generated
        token once the next step has decoded it (the last one sampled never has been)."""
        n_prompt = len(self.prompt)
        if self.n_cached <= n_prompt:
            return self.prompt[: self.n_cached]
        return self.prompt + self.generated[: self.n_cached - n_prompt]

    def accept(self, token: int, piece: bytes, is_eog: bool,
               logprob: TokenLogprob | None = None) -> None:
        """Take one sampled token (and its log-probabilities, when asked for); decide whether
        the sequence is finished."""
        if self.finish_reason is not None:
            return  # finished (stop string, cancelled) while this token was being decoded
        self.last_token = token
        self.generated.append(token)
        if is_eog:
            self._finish(FINISH_STOP)
            return
        self.num_generated += 1
        self._out_tokens.append(token)
        if self._out_logprobs is not None and logprob is not None:
            self._out_logprobs.append(logprob)
        text = self._decoder.decode(piece)
        if text:
            self._add_text(text)
        if self.finish_reason is None and self.num_generated >= self.params.max_tokens:
            self._finish(FINISH_LENGTH)

    def _add_text(self, text: str) -> None:
        if not self.params.stop:
            self._out_text.append(text)
            return
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._out_text.append(held[:cut])
            self._held = ""
            self.finish_reason = FINISH_STOP
            return
        keep = self._partial_stop_length(held)
        self._out_text.append(held[: len(held) - keep])
        self._held = held[len(held) - keep :]

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of `text` that could still grow into a stop string."""
        for k in range(min(self._hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self.params.stop):
                return k
        return 0

    def _finish(self, reason: str) -> None:
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._add_text(tail)
        if self.finish_reason is None:  # a stop string in the tail wins
            self._out_text.append(self._held)
            self._held = ""
            self.finish_reason = reason

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the sequence from outside (cancelled, failed)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.error = error

    def take_update(self) -> SeqUpdate | None:
        """What this step produced for the front end, or None when nothing new."""
        if not self._out_tokens and self.finish_reason is None and not self._out_text:
            return None
        text = "".join(self._out_text)
        tokens = self._out_tokens
        logprobs = self._out_logprobs
        self._out_text = []
        self._out_tokens = []
        if logprobs is not None:
            self._out_logprobs = []
        return (self.request_id, self.index, text, tokens, self.finish_reason, self.error,
                logprobs)
