"""Continuous batching inside one worker: many sequences, one llama.cpp context, one KV pool.

Every `step()` builds one batch: a token for each sequence that is generating, then prompt
chunks of sequences still prefilling in the room left (at most `n_batch` tokens in all), so a
long prompt is spread over several steps while running streams keep getting a token per step.
New requests join between steps; finished ones leave and free their KV cells at once.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from wicore_cpp.engine.backend import BatchContext, Model, Sampler
from wicore_cpp.engine.messages import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    GenerateRequest,
    SeqUpdate,
)
from wicore_cpp.engine.sequence import Sequence

log = logging.getLogger("wicore.batcher")


class ContinuousBatcher:
    def __init__(self, model: Model, ctx: BatchContext, max_batch_size: int | None = None,
                 sample_threads: int = 1):
        self.model = model
        self.ctx = ctx
        # Slots beyond max_batch_size are for urgent requests; a step still decodes at most
        # max_batch_size sequences, pausing the lowest-priority ones.
        self.max_batch_size = max_batch_size or ctx.n_seq_max
        # Sampling walks the whole vocabulary once per sequence (262k entries for Gemma 3),
        # in C with the GIL released, so a step's sequences are sampled in parallel chunks.
        self._num_chunks = max(1, sample_threads)
        self._pool = ThreadPoolExecutor(self._num_chunks - 1) if self._num_chunks > 1 else None
        self._free_slots = deque(range(ctx.n_seq_max))
        self._pending: deque[GenerateRequest] = deque()
        self._active: dict[str, Sequence] = {}  # admission order = prefill order
        self._reserved = 0  # KV cells promised to active sequences
        self._updates: list[SeqUpdate] = []

    @property
    def is_idle(self) -> bool:
        return not self._active and not self._pending

    @property
    def num_active(self) -> int:
        return len(self._active)

    def submit(self, request: GenerateRequest) -> None:
        self._pending.append(request)

    def cancel(self, request_id: str) -> None:
        """Drop a request; its slot and KV cells are freed by the next step."""
        seq = self._active.get(request_id)
        if seq is not None:
            seq.finish(FINISH_CANCELLED)
            return
        for req in self._pending:
            if req.request_id == request_id:
                self._pending.remove(req)
                self._updates.append((request_id, "", [], FINISH_CANCELLED, None))
                return

    def cancel_all(self) -> None:
        for request_id in [r.request_id for r in self._pending] + list(self._active):
            self.cancel(request_id)

    def _admit(self) -> None:
        # A sequence is admitted only when its whole prompt + completion fits in the KV pool
        # beside the others, so a decode never runs out of cells halfway through a stream.
        while self._pending and self._free_slots:
            req = self._pending[0]
            need = len(req.prompt_tokens) + req.params.max_tokens
            if need > self.ctx.n_ctx:
                self._pending.popleft()
                self._updates.append((req.request_id, "", [], FINISH_ERROR,
                                      f"prompt + max_tokens ({need}) exceeds the KV cache "
                                      f"({self.ctx.n_ctx} tokens)"))
                continue
            if self._reserved + need > self.ctx.n_ctx:
                break
            self._pending.popleft()
            sampler = Sampler(req.params, self.model.info.n_vocab)
            seq = Sequence(req, self._free_slots.popleft(), sampler, need)
            self._active[req.request_id] = seq
            self._reserved += need

    def step(self) -> list[SeqUpdate]:
        """Admit, decode one batch, sample, and return every sequence's news."""
        self._admit()
        ctx = self.ctx
        ctx.clear_batch()
        to_sample: list[tuple[Sequence, int]] = []
        progress: list[tuple[Sequence, int]] = []  # (seq, tokens added to the batch)
        budget = ctx.n_batch
        running = [s for s in self._active.values() if s.finish_reason is None]
        if len(running) > self.max_batch_size:
            # Highest priority first, then first admitted: the newest low-priority sequences
            # wait (their KV cells stay) while urgent ones run.
            order = {id(s): i for i, s in enumerate(running)}
            running.sort(key=lambda s: (-s.priority, order[id(s)]))
            running = running[: self.max_batch_size]
        for seq in running:
            if not seq.is_prefilling and budget > 0:
                to_sample.append((seq, ctx.add(seq.last_token, seq.n_cached, seq.slot, True)))
                progress.append((seq, 1))
                budget -= 1
        for seq in running:
            if budget <= 0:
                break
            if seq.is_prefilling:
                start = seq.n_cached
                take = min(budget, len(seq.prompt) - start)
                end = start + take
                for pos in range(start, end):
                    idx = ctx.add(seq.prompt[pos], pos, seq.slot, pos == len(seq.prompt) - 1)
                if end == len(seq.prompt):
                    to_sample.append((seq, idx))
                progress.append((seq, take))
                budget -= take

        if ctx.batch_size:
            rc = ctx.decode()
            if rc != 0:
                self._on_decode_failure(rc, progress)
                to_sample = []
            else:
                for seq, n in progress:
                    seq.n_cached += n
        model = self.model
        for (seq, _), token in zip(to_sample, self._sample(to_sample), strict=True):
            seq.accept(token, model.piece(token), model.is_eog(token))
        return self._collect()

    def _sample(self, to_sample: list[tuple[Sequence, int]]) -> list[int]:
        if self._pool is None or len(to_sample) < 2:
            return [seq.sampler.sample(self.ctx, idx) for seq, idx in to_sample]
        # The first logits read may reorder llama.cpp's outputs: do it on this thread, so the
        # parallel samplers below only read.
        self.ctx.logits_ready(to_sample[0][1])
        n = min(self._num_chunks, len(to_sample))
        chunks = [to_sample[i::n] for i in range(n)]

        def run(chunk: list[tuple[Sequence, int]]) -> list[int]:
            return [seq.sampler.sample(self.ctx, idx) for seq, idx in chunk]

        futures = [self._pool.submit(run, chunk) for chunk in chunks[1:]]
        results = [run(chunks[0])] + [f.result() for f in futures]
        tokens = [0] * len(to_sample)
        for i, chunk_tokens in enumerate(results):
            tokens[i::n] = chunk_tokens
        return tokens

    def _on_decode_failure(self, rc: int, progress: list[tuple[Sequence, int]]) -> None:
        if rc == 1 and progress:
            # No KV slot despite the reservations (fragmentation): give up the newest
            # sequence of this batch rather than stall everyone; the rest retry next step.
            seq = progress[-1][0]
            log.warning("KV cache full; failing request %s", seq.request_id)
            seq.finish(FINISH_ERROR, "the KV cache is full; retry the request")
            return
        log.error("llama_decode failed (%d); failing %d sequences", rc, len(progress))
        for seq, _ in progress:
            seq.finish(FINISH_ERROR, f"decode failed ({rc})")

    def _collect(self) -> list[SeqUpdate]:
        updates, self._updates = self._updates, []
        finished: list[Sequence] = []
        for seq in self._active.values():
            update = seq.take_update()
            if update is not None:
                updates.append(update)
            if seq.finish_reason is not None:
                finished.append(seq)
        for seq in finished:
            del self._active[seq.request_id]
            self.ctx.drop_sequence(seq.slot)
            seq.sampler.free()
            self._free_slots.append(seq.slot)
            self._reserved -= seq.reservation
        return updates
