"""libmtmd through llama-cpp-python (`llama_cpp.mtmd_cpp`): a model's vision projector in a
worker, turning an image file into the embeddings its prompt positions are decoded from. With
backend.py, the only module that touches ctypes.

The calls are those of libmtmd's own `mtmd_helper_eval_chunks` (tools/mtmd/mtmd-helper.cpp in
the pinned llama.cpp), split so that the batcher can interleave them with everyone else's
decode steps: `mtmd_tokenize_from_parts` preprocesses the image (resize, normalise) into an
image chunk, `mtmd_encode_chunk` runs the vision tower and projector (on a thread of its own,
while the batcher goes on decoding), and the embeddings are decoded into the sequence's KV
cells as a batch of `embd` rows, with the causal mask off when `mtmd_decode_use_non_causal`
says so (Gemma 3: an image's positions attend to each other).
"""

from __future__ import annotations

import ctypes
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llama_cpp as lc
import numpy as np
from llama_cpp import mtmd_cpp as mt

from wicore_cpp.engine.backend import BackendError, BatchContext, Model
from wicore_cpp.engine.images import decode_image
from wicore_cpp.engine.llama_log import llama_log
from wicore_cpp.errors import InvalidRequest

log = logging.getLogger("wicore.vision")

_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
# No pixel cap here: the tokenizer helper checked every image before it was queued.
_NO_PIXEL_CAP = 1 << 62


class ImageError(RuntimeError):
    """An image this worker could not turn into embeddings; it fails that request only."""


class VisionEncoder:
    """A loaded projector (`mtmd_init_from_file`) bound to one text model and its context."""

    def __init__(self, path: Path, model: Model, *, use_gpu: bool, threads: int,
                 flash_attn: str = "auto", background: bool = True):
        """`background`: encode on a thread of its own beside the decode steps (the default;
        False: between two steps, see `encode_async`). Raises BackendError when libmtmd cannot
        load the projector for this model."""
        hook = llama_log()
        # libmtmd logs through its own hook; route it into the same `wicore.llama` logger.
        mt.mtmd_log_set(hook.callback, ctypes.c_void_p(0))
        mt.mtmd_helper_log_set(hook.callback, ctypes.c_void_p(0))
        params = mt.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = threads
        params.print_timings = False
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        params.warmup = True  # allocate its compute buffers now: a failure shows at load
        self.ptr = mt.mtmd_init_from_file(str(path).encode(), model.ptr, params)
        if not self.ptr:
            reason = hook.last_error or "libmtmd could not load it"
            raise BackendError(f"cannot load vision projector {path}: {reason}")
        if not mt.mtmd_support_vision(self.ptr):
            self.close()
            raise BackendError(f"{path} has no vision encoder")
        self.path = path
        self.use_gpu = use_gpu
        self.in_background = background
        self.n_embd = lc.llama_model_n_embd_inp(model.ptr)
        self.is_non_causal = bool(mt.mtmd_decode_use_non_causal(self.ptr, None))
        self._batch = None
        self._batch_rows = 0
        # One encode at a time, beside the batcher's decode steps (libmtmd has its own ggml
        # context and buffers; ctypes releases the GIL for the call).
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="vision")

    def encode_async(self, data: bytes, expected_tokens: int) -> Future[np.ndarray]:
        """`encode` on the encoder thread, beside the decode steps (or here and now, the
        future done, with `background=False`); the future raises what `encode` raises.

        On two busy CPU cores, tools/bench.py images measured the running streams' median gap
        at 178 ms while images arrived with the encode on its thread, and at 5.7 s with it
        between two steps (each step then waits for a whole encode); see the README."""
        if self.in_background:
            return self._encoder.submit(self.encode, data, expected_tokens)
        done: Future[np.ndarray] = Future()
        try:
            done.set_result(self.encode(data, expected_tokens))
        except ImageError as exc:
            done.set_exception(exc)
        return done

    def encode(self, data: bytes, expected_tokens: int) -> np.ndarray:
        """The image file's embeddings, one row per prompt position (float32, shape
        (tokens, n_embd)). Raises ImageError when it cannot be decoded or encoded, or when
        libmtmd makes a different number of positions than the prompt holds."""
        try:
            image = decode_image(data, "image", _NO_PIXEL_CAP)
        except InvalidRequest as exc:
            raise ImageError(exc.message) from None
        pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
        bitmap = mt.mtmd_bitmap_init(image.width, image.height, pixels)
        if not bitmap:
            raise ImageError("libmtmd could not take the image")
        chunks = mt.mtmd_input_chunks_init()
        try:
            part = mt.mtmd_input_part(None, bitmap)
            parts = (ctypes.POINTER(mt.mtmd_input_part) * 1)(ctypes.pointer(part))
            rc = mt.mtmd_tokenize_from_parts(self.ptr, chunks, parts, 1, False)
            if rc != 0:
                raise ImageError(f"libmtmd could not preprocess the image ({rc})")
            chunk = None
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                c = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    chunk = c
            if chunk is None:
                raise ImageError("libmtmd made no image chunk")
            n_tokens = mt.mtmd_input_chunk_get_n_tokens(chunk)
            if n_tokens != expected_tokens:
                raise ImageError(f"the image is {n_tokens} tokens here, {expected_tokens} in "
                                 "the prompt")
            if mt.mtmd_encode_chunk(self.ptr, chunk) != 0:
                raise ImageError("the vision encoder failed on the image")
            out = mt.mtmd_get_output_embd(self.ptr)
            if not out:
                raise ImageError("the vision encoder returned nothing")
            return np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,)).reshape(
                n_tokens, self.n_embd).copy()
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def decode(self, ctx: BatchContext, embd: np.ndarray, pos: int, seq_id: int) -> int:
        """Decode embedding rows as positions pos, pos + 1, ... of `seq_id`, in one llama.cpp
        batch (an image's positions must share one for non-causal attention). Returns
        llama_decode's code (0 ok, 1 no KV slot)."""
        n = len(embd)
        if n > ctx.n_batch:
            raise BackendError(f"{n} image positions exceed the batch of {ctx.n_batch}")
        if not 0 <= seq_id < ctx.n_seq_max:
            raise BackendError(f"seq_id {seq_id} out of range")
        if self._batch is None or self._batch_rows < n:
            if self._batch is not None:
                lc.llama_batch_free(self._batch)
            self._batch = lc.llama_batch_init(ctx.n_batch, self.n_embd, 1)
            self._batch_rows = ctx.n_batch
        b = self._batch
        rows = np.ascontiguousarray(embd, dtype=np.float32)
        ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
        for i in range(n):
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = False
        b.n_tokens = n
        if self.is_non_causal:
            lc.llama_set_causal_attn(ctx.ptr, False)
        try:
            return lc.llama_decode(ctx.ptr, b)
        finally:
            if self.is_non_causal:
                lc.llama_set_causal_attn(ctx.ptr, True)

    def close(self) -> None:
        self._encoder.shutdown(wait=True, cancel_futures=True)
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self.ptr:
            mt.mtmd_free(self.ptr)
            self.ptr = None
