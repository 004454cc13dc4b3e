"""Messages between the front end and worker processes.

Small, plain, slotted dataclasses: they are pickled across a pipe, so each carries only what
the other side needs. Tokens travel back as one `StepOutput` per decode step holding the
updates of every sequence that step touched, never one message per token.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field

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
    # Not sampling, but per sequence all the same: False (llama-server's `cache_prompt`) neither
    # reuses cached KV for this prompt nor keeps this sequence's KV for later requests.
    cache_prompt: bool = True


@dataclass(slots=True)
class GenerateRequest:
    """Front end -> worker: start decoding this prompt."""

    request_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    priority: int = 1  # Priority level; decides which sequence pauses for an urgent one
    # Whose request it is (an API key's name; None without keys): with more sequences than
    # max_batch_size, the key running the most pauses first within a level (fair slots).
    tenant: str | None = None


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


@dataclass(slots=True, frozen=True)
class PromptCacheStats:
    """One worker's prompt cache: what it holds now, and what it has done since it started."""

    entries: int = 0  # cached sequences in the KV pool (finished ones and pinned prefixes)
    cells: int = 0  # KV cells they hold; a prefix several of them share counts once
    hits: int = 0  # requests that started from cached KV
    tokens_reused: int = 0  # prompt tokens those requests did not prefill
    window_misses: int = 0  # requests that recomputed a cached prefix whose sliding-window
    #                         cells were gone
    evictions: int = 0  # entries dropped from the KV pool (room, the bound, a seq id)
    host_entries: int = 0  # evicted prefixes kept in host memory
    host_bytes: int = 0
    host_saves: int = 0
    host_restores: int = 0

    def __add__(self, other: PromptCacheStats) -> PromptCacheStats:
        return PromptCacheStats(*(a + b for a, b in zip(astuple(self), astuple(other),
                                                        strict=True)))


@dataclass(slots=True)
class CacheReport:
    """Worker -> front end, with a step's output when the prompt cache changed.

    `cached_tokens`: (request id, prompt tokens taken from the cache) for each request that
    started this step. `added` / `removed`: prefix block hashes (see prefix_routing) that
    appeared in / left this worker's cache, for routing requests to the worker that holds them.
    """

    cached_tokens: list[tuple[str, int]]
    added: list[int]
    removed: list[int]
    stats: PromptCacheStats


@dataclass(slots=True)
class StepOutput:
    """Worker -> front end: what one decode step produced, for every sequence it touched."""

    worker_id: int
    updates: list[SeqUpdate] = field(default_factory=list)
    cache: CacheReport | None = None  # only on steps where the prompt cache changed
