"""llama.cpp through llama-cpp-python's low-level API: the only module that touches ctypes.

Imported by worker processes and the prompt tokenizer process, never by the front end.

What llama.cpp does with a bad batch, in this version (vendor/llama.cpp, src/llama-context.cpp
and src/llama-batch.cpp of llama-cpp-python 0.3.36):
- more than `n_batch` tokens in one `llama_decode` is a C assert that aborts the whole process:
  `BatchContext.add` refuses the token before it gets there;
- a `seq_id` outside `[0, n_seq_max)` is refused by `llama_decode` with -1; `add` checks it
  too, because the check costs nothing there and names the culprit;
- positions that do not continue a sequence at `pos_max + 1` are refused by `llama_decode`
  with -1 (logged with both positions). Python does not repeat that check: it would take a
  `llama_memory_seq_pos_max` call per sequence per step, and the batcher's positions come from
  `n_cached`, which only moves after a successful decode. A -1 fails that step's sequences.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc
import numpy as np

from wicore_cpp.engine.llama_log import llama_log
from wicore_cpp.engine.messages import SamplingParams

_RANDOM_SEED = 0xFFFFFFFF
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
# kv_cache_type -> ggml_type for llama.cpp's type_k / type_v (ggml/include/ggml.h).
KV_CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}


class BackendError(RuntimeError):
    """llama.cpp refused: a model that does not load, a context that cannot be made."""


@dataclass(slots=True, frozen=True)
class LoadedModelInfo:
    """What llama.cpp reports about a loaded model (or vocabulary)."""

    n_ctx_train: int
    n_vocab: int
    n_layer: int
    bos_token: str
    eos_token: str
    add_bos: bool
    chat_template: str | None


class Model:
    """A loaded GGUF model (or just its vocabulary) with tokenize/detokenize."""

    def __init__(self, path: Path, *, vocab_only: bool = False, n_gpu_layers: int = 0):
        self.llama_log = llama_log()
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = n_gpu_layers
        self.path = path
        self.ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            reason = self.llama_log.last_error or "llama.cpp could not load it"
            raise BackendError(f"cannot load model {path}: {reason}")
        self.vocab = lc.llama_model_get_vocab(self.ptr)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        template = lc.llama_model_chat_template(self.ptr, None)
        self.info = LoadedModelInfo(
            n_ctx_train=lc.llama_model_n_ctx_train(self.ptr),
            n_vocab=lc.llama_vocab_n_tokens(self.vocab),
            n_layer=lc.llama_model_n_layer(self.ptr),
            bos_token=self.token_text(lc.llama_vocab_bos(self.vocab)),
            eos_token=self.token_text(lc.llama_vocab_eos(self.vocab)),
            add_bos=bool(lc.llama_vocab_get_add_bos(self.vocab)),
            chat_template=template.decode("utf-8") if template else None,
        )

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return lc.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (lc.llama_token * n_max)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise BackendError(f"tokenization failed ({n})")
        return buf[:n]

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (special tokens render as nothing). Cached."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = self._to_piece(token, special=False)
        return cached

    def longest_piece_bytes(self) -> int:
        """The most bytes of text any one token stands for, special tokens' own text included
        (a prompt is tokenized with `parse_special`, so `<start_of_turn>` in it is one token).
        A prompt of B bytes is therefore at least B / this many tokens."""
        buf = ctypes.create_string_buffer(256)
        longest = 1
        for token in range(self.info.n_vocab):
            n = lc.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
            longest = max(longest, n if n >= 0 else -n)
        return longest

    def is_control(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_control(self.vocab, token))

    def special_piece(self, token: int) -> bytes:
        """The bytes of a token as written in a prompt (`<start_of_turn>` included)."""
        return self._to_piece(token, special=True)

    def _to_piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[: max(n, 0)]

    def is_eog(self, token: int) -> bool:
        cached = self._eog.get(token)
        if cached is None:
            cached = self._eog[token] = bool(lc.llama_vocab_is_eog(self.vocab, token))
        return cached

    @property
    def n_swa(self) -> int:
        """The sliding window of the model's windowed layers, in tokens (0: it has none)."""
        return lc.llama_model_n_swa(self.ptr)

    def close(self) -> None:
        if self.ptr:
            lc.llama_model_free(self.ptr)
            self.ptr = None


def supports_gpu_offload() -> bool:
    return bool(lc.llama_supports_gpu_offload())


# llama_token_data as numpy sees it: the constrained path builds candidate arrays in numpy.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(lc.llama_token_data)
# A grammar first looks for an allowed token among the most likely ones, then, if none is
# allowed there, walks the rest of the vocabulary in chunks, checking its time budget between
# chunks: a grammar's cost per step is bounded however many parse stacks it has.
GRAMMAR_FIRST_CANDIDATES = 1024
GRAMMAR_CHUNK = 32768


class GrammarError(BackendError):
    """A grammar llama.cpp refused, or one that allowed no token within its step budget."""


def init_grammar(model: Model, grammar: str, triggers: tuple[str, ...] = ()):
    """A llama.cpp grammar sampler (lazy when there are trigger patterns). Raises
    GrammarError with llama.cpp's reason when it refuses the grammar."""
    if triggers:
        patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
        ptr = lc.llama_sampler_init_grammar_lazy_patterns(
            model.vocab, grammar.encode(), b"root", patterns, len(triggers), None, 0)
    else:
        ptr = lc.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    if not ptr:
        reason = model.llama_log.last_error or "llama.cpp refused it"
        raise GrammarError(f"invalid grammar: {reason.strip()}")
    return ptr


def runs_on_backend(params: SamplingParams) -> bool:
    """Whether a request's sampling can run inside llama.cpp's decode graph (backend sampling):
    only temperature, top-k, top-p, min-p and the seeded draw (or greedy) have backend stages in
    this llama.cpp (src/llama-sampler.cpp). A grammar, logit bias, penalties and
    log-probabilities need the logits on the host, and so does `n` > 1, whose other choices
    draw their first token from choice 0's logits."""
    return (not params.grammar and not params.logit_bias and params.logprobs is None
            and params.repetition_penalty == 1.0 and not params.frequency_penalty
            and not params.presence_penalty and params.n == 1)


class Sampler:
    """One sequence's sampling: its chain (penalty history and random state live in it), its
    grammar if its output is constrained, and its log-probabilities if it asked for them.

    With `on_backend` (and a request `runs_on_backend` allows), the chain is attached to the
    context for the steps its sequence gets a token (`BatchContext.attach_only`): llama.cpp
    samples inside `llama_decode`, multi-threaded on the CPU or on the GPU when offloaded, and
    `sample` only reads the token back (this llama.cpp still copies the row's probabilities and
    logits to the host). The chain is the same either
    way, so both paths draw from the same distribution (tests/test_backend_sampling.py).

    Unconstrained sequences sample with `llama_sampler_sample` (the candidates are built in C).
    A constrained one never lets llama.cpp's grammar walk the whole vocabulary each step (262k
    tokens for Gemma): it samples as if unconstrained, asks the grammar about that one token,
    and only when it is refused samples again among the tokens the grammar allows, found from
    the most likely down within `grammar_budget_s` (llama.cpp's common sampler does the same,
    minus the budget). A grammar is only ever given tokens it allowed: llama.cpp aborts the
    process on any other.
    """

    def __init__(self, params: SamplingParams, model: Model, *, choice: int = 0,
                 prompt: list[int] | tuple[int, ...] = (), grammar_budget_s: float = 0.5,
                 on_backend: bool = False):
        """`choice` offsets the seed, so the `n` choices of a request differ under sampling.
        `prompt` feeds the repetition penalty. `on_backend`: sample inside the decode graph
        when the request allows it. Raises GrammarError for a grammar llama.cpp refuses."""
        self.ptr = None
        self._post = None
        self._grammar = None
        self._n_vocab = n_vocab = model.info.n_vocab
        self._budget_s = grammar_budget_s
        self.num_logprobs = params.logprobs
        self.last_logprob: tuple[float, tuple[tuple[int, float], ...]] | None = None
        # Set by BatchContext.attach once llama.cpp has taken the chain into its graph.
        self.on_backend = False
        self.wants_backend = on_backend and runs_on_backend(params)
        if params.grammar:
            self._grammar = init_grammar(model, params.grammar, params.grammar_triggers)
        pre = self._logit_stages(params, n_vocab, prompt)
        post = self._selection_stages(params, choice)
        if self._grammar is None:
            self.ptr = _chain(pre + post)
        else:
            # The grammar goes between the logit adjustments and the selection, so two chains.
            self.ptr = _chain(pre)
            self._post = _chain(post)
            self._cands = np.zeros(n_vocab, _TOKEN_DATA)
            self._work = np.zeros(n_vocab, _TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._one = (lc.llama_token_data * 1)()

    @staticmethod
    def _logit_stages(params: SamplingParams, n_vocab: int, prompt) -> list:
        stages = []
        if params.logit_bias:
            biases = (lc.llama_logit_bias * len(params.logit_bias))(
                *(lc.llama_logit_bias(token, bias) for token, bias in params.logit_bias))
            stages.append(lc.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias),
                                                           biases))
        if params.repetition_penalty != 1.0:
            # vLLM's and llama-server's repetition penalty counts the prompt's tokens as well:
            # its own stage, fed the prompt, beside OpenAI's penalties that count only output.
            rep = lc.llama_sampler_init_penalties(
                n_vocab, len(prompt) + params.max_tokens, params.repetition_penalty, 0.0, 0.0)
            for token in prompt:
                lc.llama_sampler_accept(rep, token)
            stages.append(rep)
        if params.frequency_penalty or params.presence_penalty:
            # OpenAI penalises every generated token, so the window covers the whole
            # completion; prompt tokens are never accepted into this stage.
            stages.append(lc.llama_sampler_init_penalties(
                n_vocab, max(params.max_tokens, 1), 1.0, params.frequency_penalty,
                params.presence_penalty))
        return stages

    @staticmethod
    def _selection_stages(params: SamplingParams, choice: int) -> list:
        if params.temperature == 0:
            return [lc.llama_sampler_init_greedy()]
        # Temperature first, as vLLM does: OpenAI's nucleus is taken over the tempered
        # distribution (top_k does not care; min_p is relative to the tempered top).
        stages = [lc.llama_sampler_init_temp(params.temperature)]
        if params.top_k > 0:
            stages.append(lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            stages.append(lc.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            stages.append(lc.llama_sampler_init_min_p(params.min_p, 1))
        seed = _RANDOM_SEED if params.seed is None else (params.seed + choice) & 0xFFFFFFFF
        stages.append(lc.llama_sampler_init_dist(seed))
        return stages

    def renew_chain(self) -> None:
        """Replace the chain with a copy in the same state (its random state included), not
        yet initialised for a decode graph. Only chains that may run on the backend (no
        grammar, so one chain) are ever renewed."""
        fresh = lc.llama_sampler_clone(self.ptr)
        lc.llama_sampler_free(self.ptr)
        self.ptr = fresh

    @property
    def is_constrained(self) -> bool:
        return self._grammar is not None

    def sample(self, ctx: BatchContext, batch_index: int) -> int:
        """The next token from batch position `batch_index`, accepted into this sampler.
        Sets `last_logprob` when log-probabilities were asked for. Raises GrammarError."""
        if self.on_backend:
            token = lc.llama_get_sampled_token_ith(ctx.ptr, batch_index)
            if token < 0:
                raise GrammarError("llama.cpp sampled no token on the backend")
            lc.llama_sampler_accept(self.ptr, token)  # llama-server's order: read, accept
            return token
        if self._grammar is None:
            token = lc.llama_sampler_sample(self.ptr, ctx.ptr, batch_index)
        else:
            token = self._sample_constrained(self._logits(ctx, batch_index))
        if self.num_logprobs is not None:
            self.last_logprob = self._logprob(self._logits(ctx, batch_index), token)
        return token

    def _logits(self, ctx: BatchContext, batch_index: int) -> np.ndarray:
        ptr = lc.llama_get_logits_ith(ctx.ptr, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _logprob(self, logits: np.ndarray,
                 token: int) -> tuple[float, tuple[tuple[int, float], ...]]:
        return token_logprob(logits, token, self.num_logprobs or 0)

    def _sample_constrained(self, logits: np.ndarray) -> int:
        cands = self._cands
        cands["id"] = self._ids
        cands["logit"] = logits
        cands["p"] = 0.0
        lc.llama_sampler_apply(self.ptr, ctypes.byref(_array_of(cands)))  # bias, penalties
        work = self._work
        work[:] = cands
        token = self._select(work)
        if not self._allows(token):
            token = self._select(self._allowed_candidates(cands))
        lc.llama_sampler_accept(self._grammar, token)
        lc.llama_sampler_accept(self.ptr, token)
        lc.llama_sampler_accept(self._post, token)
        return token

    def _select(self, cands: np.ndarray) -> int:
        """Run the selection stages (temperature, truncation, draw) over `cands`."""
        arr = _array_of(cands)
        lc.llama_sampler_apply(self._post, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise GrammarError("sampling selected no token")
        return int(cands["id"][arr.selected])

    def _allows(self, token: int) -> bool:
        one = self._one
        one[0].id = token
        one[0].logit = 0.0
        one[0].p = 0.0
        arr = lc.llama_token_data_array(one, 1, -1, False)
        lc.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return one[0].logit != -np.inf

    def _mask(self, cands: np.ndarray) -> np.ndarray:
        """The candidates the grammar allows (a contiguous copy)."""
        lc.llama_sampler_apply(self._grammar, ctypes.byref(_array_of(cands)))
        return cands[np.isfinite(cands["logit"])]

    def _allowed_candidates(self, cands: np.ndarray) -> np.ndarray:
        started = time.monotonic()
        n = len(cands)
        k = min(GRAMMAR_FIRST_CANDIDATES, n)
        best = np.argpartition(cands["logit"], n - k)[n - k:]
        allowed = self._mask(cands[best])
        if len(allowed):
            return allowed
        rest = np.ones(n, dtype=bool)
        rest[best] = False
        rest_idx = np.flatnonzero(rest)
        found = []
        for start in range(0, len(rest_idx), GRAMMAR_CHUNK):
            if time.monotonic() - started > self._budget_s:
                raise GrammarError(
                    f"the output grammar found no allowed token within "
                    f"{self._budget_s * 1000:.0f} ms; the schema is too complex")
            chunk = self._mask(cands[rest_idx[start:start + GRAMMAR_CHUNK]])
            if len(chunk):
                found.append(chunk)
        if not found:
            raise GrammarError("the output grammar allows no token here")
        return np.concatenate(found)

    def free(self) -> None:
        for name in ("ptr", "_post", "_grammar"):
            ptr = getattr(self, name)
            if ptr:
                lc.llama_sampler_free(ptr)
                setattr(self, name, None)


def token_logprob(logits: np.ndarray, token: int,
                  k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's own log-probability of `token` and its `k` most likely tokens (log-softmax
    of the raw logits, before penalties, temperature or grammar)."""
    top = logits.max()
    lse = float(top) + float(np.log(np.exp(logits - top, dtype=np.float64).sum()))
    alternatives: tuple[tuple[int, float], ...] = ()
    if k:
        best = np.argpartition(logits, -k)[-k:]
        best = best[np.argsort(-logits[best], kind="stable")]
        alternatives = tuple((int(t), float(logits[t]) - lse) for t in best)
    return float(logits[token]) - lse, alternatives


def logits_at(ctx: BatchContext, batch_index: int, n_vocab: int) -> np.ndarray:
    """The logits of batch position `batch_index` (a view, valid until the next decode)."""
    ptr = lc.llama_get_logits_ith(ctx.ptr, batch_index)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def _chain(stages: list):
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    for stage in stages:
        lc.llama_sampler_chain_add(chain, stage)  # the chain owns its stages from here
    return chain


def _array_of(cands: np.ndarray) -> lc.llama_token_data_array:
    """A llama_token_data_array over a contiguous numpy candidate array (no copy)."""
    return lc.llama_token_data_array(
        cands.ctypes.data_as(lc.llama_token_data_p), len(cands), -1, False)


class BatchContext:
    """One llama.cpp context whose unified KV pool is shared by up to `n_seq_max` sequences."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_seq_max: int, threads: int,
                 flash_attn: str = "auto", kv_cache_type: str = "f16",
                 backend_sampling: bool = False):
        """`backend_sampling`: sequences whose request allows it sample inside the decode graph
        (`attach`); each sequence then asks for at most one output per step, which lets
        llama.cpp draw without its transactional bookkeeping."""
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        # A step asks for logits of at most one token per sequence, so llama.cpp reserves
        # logits rows for n_seq_max outputs instead of n_batch: with Gemma 3's 262,144-token
        # vocabulary that is 17 rows of 1 MiB instead of 512 in the compute buffer. `add`
        # refuses more (llama.cpp would abort the process on it).
        params.n_outputs_max = n_seq_max
        if backend_sampling:
            params.n_outputs_max_per_seq = 1
        params.kv_unified = True
        # llama.cpp defaults to a full-size sliding-window cache; Gemma 3 has 5 of 6 layers
        # windowed, so a window-sized one (window x sequences) cuts its KV memory several-fold.
        params.swa_full = False
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        # A quantized V cache exists in llama.cpp only with flash attention; config.py refuses
        # flash_attn "off" with one, and "auto" is made "on" here so that the context either
        # has flash attention or fails to load, never falls back to an unusable cache.
        params.flash_attn_type = _FLASH_ATTN["on" if kv_cache_type != "f16" else flash_attn]
        params.type_k = params.type_v = KV_CACHE_TYPES[kv_cache_type]
        self.ptr = lc.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            reason = model.llama_log.last_error or "out of memory?"
            raise BackendError(f"cannot create a context of {n_ctx} tokens: {reason}")
        self.n_ctx = lc.llama_n_ctx(self.ptr)
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.memory = lc.llama_get_memory(self.ptr)
        self.backend_sampling = backend_sampling
        self._attached: dict[int, Sampler] = {}  # seq id -> the sampler llama.cpp holds
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._n = 0
        self._n_outputs = 0

    def clear_batch(self) -> None:
        self._n = 0
        self._n_outputs = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append one token to the next decode; returns its batch index (for sampling)."""
        i = self._n
        if i >= self.n_batch:
            raise BackendError("batch overflow")  # a scheduling bug; never abort in C
        if not 0 <= seq_id < self.n_seq_max:
            raise BackendError(f"seq_id {seq_id} out of range")
        if logits:
            if self._n_outputs >= self.n_seq_max:
                raise BackendError("more logits in one step than sequences")  # see __init__
            self._n_outputs += 1
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        self._n = i + 1
        return i

    @property
    def batch_size(self) -> int:
        return self._n

    @property
    def outputs_left(self) -> int:
        """Logits rows the batch being built may still ask for (see __init__)."""
        return self.n_seq_max - self._n_outputs

    def decode(self) -> int:
        """Run the batch built with `add`. 0 ok, 1 no KV slot, other values failures."""
        self._batch.n_tokens = self._n
        return lc.llama_decode(self.ptr, self._batch)

    def logits_ready(self, batch_index: int) -> None:
        """Settle llama.cpp's output order (its first logits read may reorder them)."""
        lc.llama_get_logits_ith(self.ptr, batch_index)

    def attach(self, seq_id: int, sampler: Sampler) -> bool:
        """Hand `sampler`'s chain to llama.cpp for `seq_id` when it asked for backend sampling
        and this context allows it; True when llama.cpp took it (from the next decode on,
        `sampler.sample` reads the token llama.cpp drew). Changing the attached set makes
        llama.cpp re-reserve its compute graph once, at the next decode."""
        if not (self.backend_sampling and sampler.wants_backend and sampler.ptr):
            return False
        if not lc.llama_set_sampler(self.ptr, seq_id, sampler.ptr):
            return False
        self._attached[seq_id] = sampler
        sampler.on_backend = True
        return True

    def attach_only(self, samplers: dict[int, Sampler]) -> None:
        """Make the attached chains those of `samplers` (seq id -> sampler) that want the
        backend: detach the others, attach the new ones; no llama.cpp call when nothing
        changes (a change costs a graph re-reservation at the next decode)."""
        if not self.backend_sampling:
            return
        for seq_id in [s for s, smp in self._attached.items() if samplers.get(s) is not smp]:
            self.detach(seq_id)
        for seq_id, sampler in samplers.items():
            if seq_id not in self._attached and sampler.wants_backend:
                self.attach(seq_id, sampler)

    def detach(self, seq_id: int, *, reuse: bool = True) -> None:
        """Take `seq_id`'s sampler back from llama.cpp (before it is freed: llama.cpp keeps a
        pointer to the chain). With `reuse` (a sequence paused, say), the sampler gets a fresh
        copy of its chain: llama.cpp initialises a chain for its graph once in its life (a
        second `llama_set_sampler` aborts the process) and, once initialised, a chain skips
        its backend stages when applied on the host."""
        sampler = self._attached.pop(seq_id, None)
        if sampler is not None:
            lc.llama_set_sampler(self.ptr, seq_id, None)
            sampler.on_backend = False
            if reuse:
                sampler.renew_chain()

    def pos_max(self, seq_id: int) -> int:
        return lc.llama_memory_seq_pos_max(self.memory, seq_id)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Give sequence `dst` (empty) all of `src`'s KV cells; shared, not copied, in the
        unified pool."""
        lc.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def drop_sequence(self, seq_id: int) -> None:
        lc.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    # -- what the prompt cache needs ------------------------------------------------------------

    def pos_min(self, seq_id: int) -> int:
        """The first position `seq_id` still holds in every layer (-1: none). With sliding-window
        layers this rises as the window moves on: positions before it are gone from those."""
        return lc.llama_memory_seq_pos_min(self.memory, seq_id)

    def share_prefix(self, src: int, dst: int, n: int) -> None:
        """Give `dst` the cells of `src`'s positions [0, n): in the unified pool the cells are
        shared (a sequence id is added to them), nothing is copied."""
        lc.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def trim(self, seq_id: int, n: int) -> None:
        """Drop `seq_id`'s positions from `n` on."""
        lc.llama_memory_seq_rm(self.memory, seq_id, n, -1)

    def save_sequence(self, seq_id: int) -> bytearray | None:
        """A copy of `seq_id`'s cells (every layer) in host memory, or None if llama.cpp fails."""
        size = lc.llama_state_seq_get_size(self.ptr, seq_id)
        if size <= 0:
            return None
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        n = lc.llama_state_seq_get_data(self.ptr, view, size, seq_id)
        del view  # release the buffer export so the bytearray can be resized
        if n <= 0:
            return None
        del data[n:]
        return data

    def restore_sequence(self, seq_id: int, data: bytearray) -> bool:
        """Put cells saved by `save_sequence` back, as `seq_id` (whose cells are dropped first)."""
        view = (ctypes.c_uint8 * len(data)).from_buffer(data)
        try:
            return lc.llama_state_seq_set_data(self.ptr, view, len(data), seq_id) > 0
        finally:
            del view

    def close(self) -> None:
        if self.ptr:
            for seq_id in list(self._attached):
                self.detach(seq_id, reuse=False)
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.ptr)
            self.ptr = None
