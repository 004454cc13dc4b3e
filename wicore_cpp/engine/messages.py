"""Messages between the front end and worker processes.

Small, plain, slotted dataclasses: they are pickled across a pipe, so each carries only what
the other side needs. Tokens travel back as one `StepOutput` per decode step holding the
updates of every sequence that step touched, never one message per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Finish reasons a worker reports. "stop" and "length" are OpenAI's; the others end a
# sequence early and are mapped by the scheduler.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Everything the worker needs to build one sequence's sampler chain and stop it.

    `n` choices share one prefill of the prompt, each its own sequence and sampler (seed + i).
    `grammar` is GBNF text, compiled from a JSON schema or a tool list by the tokenizer helper
    (the edge never writes it). `logprobs` is None for no log-probabilities, else how many
    alternatives (0-20) to report beside each generated token.
    """

    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; over the prompt and the completion
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    grammar: str | None = None
    # With trigger patterns the grammar is lazy: free text until the output matches one
    # (llama.cpp's regex, the whole output so far), constrained from the match on.
    grammar_triggers: tuple[str, ...] = ()


@dataclass(slots=True)
class GenerateRequest:
    """Front end -> worker: start decoding this prompt."""

    request_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    priority: int = 1  # Priority level; decides which sequence pauses for an urgent one


@dataclass(slots=True)
class CancelRequest:
    """Front end -> worker: drop this sequence at the next step and free its KV cells."""

    request_id: str


@dataclass(slots=True)
class Shutdown:
    """Front end -> worker: cancel what is left and exit."""


@dataclass(slots=True)
class WorkerReady:
    """Worker -> front end: the model is loaded and the worker takes requests."""

    worker_id: int
    n_ctx: int
    gpu_offload: bool
    n_gpu_layers: int
    load_seconds: float
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES as the worker sees it


@dataclass(slots=True)
class WorkerFailed:
    """Worker -> front end: the model could not be loaded; the worker exits after this."""

    worker_id: int
    message: str


# One generated token's log-probability and the most likely tokens at its position, as
# (token bytes, logprob, ((bytes, logprob), ...)); only for sequences that asked for them.
TokenLogprob = tuple[bytes, float, tuple[tuple[bytes, float], ...]]

# (request_id, choice index, text delta, new token ids, finish reason or None,
#  error message or None, logprobs of the new tokens or None). Each choice of a request ends
# with exactly one update that carries a finish reason.
SeqUpdate = tuple[str, int, str, list[int], str | None, str | None, list[TokenLogprob] | None]


@dataclass(slots=True)
class StepOutput:
    """Worker -> front end: what one decode step produced, for every sequence it touched."""

    worker_id: int
    updates: list[SeqUpdate] = field(default_factory=list)
