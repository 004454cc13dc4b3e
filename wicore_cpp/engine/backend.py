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
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc

from wicore_cpp.engine.llama_log import llama_log
from wicore_cpp.engine.messages import SamplingParams

_RANDOM_SEED = 0xFFFFFFFF
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


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
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            cached = buf.raw[: max(n, 0)]
            self._pieces[token] = cached
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

    def is_eog(self, token: int) -> bool:
        cached = self._eog.get(token)
        if cached is None:
            cached = self._eog[token] = bool(lc.llama_vocab_is_eog(self.vocab, token))
        return cached

    def close(self) -> None:
        if self.ptr:
            lc.llama_model_free(self.ptr)
            self.ptr = None


def supports_gpu_offload() -> bool:
    return bool(lc.llama_supports_gpu_offload())


class Sampler:
    """One sequence's sampler chain: penalty history and random state live in it."""

    def __init__(self, params: SamplingParams, n_vocab: int):
        self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if params.frequency_penalty or params.presence_penalty:
            # OpenAI penalises every generated token, so the window covers the whole
            # completion; prompt tokens are never accepted into the chain.
            lc.llama_sampler_chain_add(
                self.ptr,
                lc.llama_sampler_init_penalties(
                    n_vocab,
                    max(params.max_tokens, 1),
                    1.0,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.temperature == 0:
            lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_greedy())
        else:
            # Temperature before top_p: OpenAI's nucleus is taken over the tempered distribution.
            lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_temp(params.temperature))
            if params.top_p < 1.0:
                lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_top_p(params.top_p, 1))
            seed = _RANDOM_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_dist(seed))

    def sample(self, ctx: BatchContext, batch_index: int) -> int:
        return lc.llama_sampler_sample(self.ptr, ctx.ptr, batch_index)

    def free(self) -> None:
        if self.ptr:
            lc.llama_sampler_free(self.ptr)
            self.ptr = None


class BatchContext:
    """One llama.cpp context whose unified KV pool is shared by up to `n_seq_max` sequences."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_seq_max: int, threads: int,
                 flash_attn: str = "auto"):
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        # llama.cpp defaults to a full-size sliding-window cache; Gemma 3 has 5 of 6 layers
        # windowed, so a window-sized one (window x sequences) cuts its KV memory several-fold.
        params.swa_full = False
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        self.ptr = lc.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            reason = model.llama_log.last_error or "out of memory?"
            raise BackendError(f"cannot create a context of {n_ctx} tokens: {reason}")
        self.n_ctx = lc.llama_n_ctx(self.ptr)
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.memory = lc.llama_get_memory(self.ptr)
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._n = 0

    def clear_batch(self) -> None:
        self._n = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append one token to the next decode; returns its batch index (for sampling)."""
        i = self._n
        if i >= self.n_batch:
            raise BackendError("batch overflow")  # a scheduling bug; never abort in C
        if not 0 <= seq_id < self.n_seq_max:
            raise BackendError(f"seq_id {seq_id} out of range")
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

    def decode(self) -> int:
        """Run the batch built with `add`. 0 ok, 1 no KV slot, other values failures."""
        self._batch.n_tokens = self._n
        return lc.llama_decode(self.ptr, self._batch)

    def logits_ready(self, batch_index: int) -> None:
        """Settle llama.cpp's output order (its first logits read may reorder them)."""
        lc.llama_get_logits_ith(self.ptr, batch_index)

    def pos_max(self, seq_id: int) -> int:
        return lc.llama_memory_seq_pos_max(self.memory, seq_id)

    def drop_sequence(self, seq_id: int) -> None:
        lc.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def close(self) -> None:
        if self.ptr:
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.ptr)
            self.ptr = None
