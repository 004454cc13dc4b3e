"""Continuous batching inside one worker: many sequences, one llama.cpp context, one KV pool.

Every `step()` builds one batch: a token for each sequence that is generating, then prompt
chunks of sequences still prefilling in the room left (at most `n_batch` tokens in all), so a
long prompt is spread over several steps while running streams keep getting a token per step.
New requests join between steps; finished ones leave, and their KV cells either go back to the
pool at once or stay in the prompt cache (prompt_cache.py), which also decides where a new
sequence starts. A request with `n` choices prefills once and then runs as `n` sequences
(`_fan_out_choices`).

Images. A prompt's image positions are prefilled from embeddings, not tokens, and llama.cpp
takes a batch of either, not both; Gemma 3's image positions also attend to each other, which
the causal mask of a token batch would forbid. So one image at a time is encoded on the vision
encoder's own thread (vision.py) while the steps go on; the step after its encode is done first
decodes its embeddings in a batch of their own, then builds the token batch as above. Running
streams lose at most one image's embedding decode a step, never a whole encode.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from typing import TYPE_CHECKING

from wicore_cpp.engine.backend import (
    BatchContext,
    GrammarError,
    Model,
    Sampler,
    logits_at,
    token_logprob,
)
from wicore_cpp.engine.images import PromptImage
from wicore_cpp.engine.messages import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    GenerateRequest,
    SeqUpdate,
    TokenLogprob,
)
from wicore_cpp.engine.prompt_cache import PromptCache
from wicore_cpp.engine.sequence import Sequence

# Echo with logprobs computes logits at every prompt position: at most this many a step, so
# llama.cpp's output buffer (a row of n_vocab floats per position: 1 MiB for Gemma 3) stays
# small.
PROMPT_LOGITS_PER_STEP = 64

if TYPE_CHECKING:
    from wicore_cpp.engine.vision import VisionEncoder

log = logging.getLogger("wicore.batcher")


class ContinuousBatcher:
    def __init__(self, model: Model, ctx: BatchContext, max_batch_size: int | None = None,
                 sample_threads: int = 1, grammar_budget_s: float = 0.5, *,
                 max_running: int | None = None, cache_cells: int = 0,
                 cache_host_bytes: int = 0, vision: VisionEncoder | None = None):
        """`max_running`: sequences at once (default: every seq id of the context; seq ids
        beyond it are for cached prefixes); `cache_cells`: most KV cells the prompt cache may
        hold (0: no cache); `cache_host_bytes`: its host-memory tier (0: none); `vision`: the
        model's projector, for prompts with images."""
        self.model = model
        self.ctx = ctx
        self.vision = vision
        # The image being encoded: (its sequence, the image, the encoder's future).
        self._encoding: tuple[Sequence, PromptImage, Future] | None = None
        # Slots beyond max_batch_size are for urgent requests; a step still decodes at most
        # max_batch_size sequences, pausing the lowest-priority ones.
        self.max_batch_size = max_batch_size or ctx.n_seq_max
        self.grammar_budget_s = grammar_budget_s
        # Sampling walks the whole vocabulary once per sequence (262k entries for Gemma 3),
        # in C with the GIL released, so a step's sequences are sampled in parallel chunks.
        self._num_chunks = max(1, sample_threads)
        self._pool = ThreadPoolExecutor(self._num_chunks - 1) if self._num_chunks > 1 else None
        self._free_slots = deque(range(ctx.n_seq_max))
        self.max_running = max_running or ctx.n_seq_max
        self.cache = PromptCache(
            ctx, model.n_swa, self._free_slots, max_cells=cache_cells,
            host_bytes=cache_host_bytes,
            swa_budget=model.n_swa * (ctx.n_seq_max - self.max_running),
        )
        self._pending: deque[GenerateRequest] = deque()
        # (request id, choice index) -> sequence; admission order = prefill order
        self._active: dict[tuple[str, int], Sequence] = {}
        self._reserved = 0  # KV cells promised to active sequences
        self._updates: list[SeqUpdate] = []
        # What the launched step samples once its decode is done (None: no step launched).
        self._launched: list[tuple[Sequence, int]] | None = None

    @property
    def is_idle(self) -> bool:
        return not self._active and not self._pending

    @property
    def num_active(self) -> int:
        return len(self._active)

    def submit(self, request: GenerateRequest) -> None:
        self._pending.append(request)

    def cancel(self, request_id: str) -> None:
        """Drop a request (all its choices); slots and KV cells are freed by the next step."""
        found = False
        for (rid, _), seq in self._active.items():
            if rid == request_id:
                seq.finish(FINISH_CANCELLED)
                found = True
        if found:
            return
        for req in self._pending:
            if req.request_id == request_id:
                self._pending.remove(req)
                self._end_unstarted(req, FINISH_CANCELLED, None)
                return

    def cancel_all(self) -> None:
        for request_id in {r.request_id for r in self._pending} | {k[0] for k in self._active}:
            self.cancel(request_id)

    def _end_unstarted(self, req: GenerateRequest, reason: str, error: str | None) -> None:
        for i in range(req.params.n):
            self._updates.append((req.request_id, i, "", [], reason, error, None))

    def _admit(self) -> None:
        # A request is admitted only when its whole prompt + completions fit in the KV pool
        # beside the others, so a decode never runs out of cells halfway through a stream.
        # Its choices share the prompt's cells; cached prefixes give way to it, and it starts
        # after the longest one it can use. One that shares a long beginning with a prompt
        # being prefilled waits for that prefix rather than compute it too, and lets the
        # requests behind it go first (never while a sequence is paused for an urgent one).
        waiting: list[GenerateRequest] = []
        can_wait = self._num_sequences() < self.max_batch_size
        while self._pending and self._num_sequences() < self.max_running:
            req = self._pending[0]
            n = req.params.n
            need = len(req.prompt_tokens) + n * req.params.max_tokens
            if need > self.ctx.n_ctx:
                self._pending.popleft()
                self._end_unstarted(req, FINISH_ERROR,
                                    f"prompt + max_tokens ({need}) exceeds the KV cache "
                                    f"({self.ctx.n_ctx} tokens)")
                continue
            if req.images and self.vision is None:
                self._pending.popleft()
                self._end_unstarted(req, FINISH_ERROR, "this worker has no vision projector")
                continue
            if can_wait and self.cache.wait_for(req.prompt_tokens, req.params.cache_prompt):
                waiting.append(self._pending.popleft())
                continue
            if (self._reserved + need > self.ctx.n_ctx
                    or self._num_sequences() + n > self.max_running):
                break
            self._pending.popleft()
            samplers: list[Sampler] = []
            try:
                # Image positions are not vocabulary tokens: the repetition penalty skips them.
                text = ([t for t in req.prompt_tokens if t >= 0] if req.images
                        else req.prompt_tokens)
                for i in range(n):
                    samplers.append(Sampler(req.params, self.model, choice=i, prompt=text,
                                            grammar_budget_s=self.grammar_budget_s,
                                            on_backend=self.ctx.backend_sampling))
            except GrammarError as exc:
                log.warning("request %s: %s", req.request_id, exc)
                for sampler in samplers:
                    sampler.free()
                self._end_unstarted(req, FINISH_ERROR, str(exc))
                continue
            slot, n_cached = self.cache.place(req.request_id, req.prompt_tokens, need,
                                              self._reserved, req.params.cache_prompt)
            choice_slots = [self.cache.take_seq_id() for _ in range(n - 1)]
            seq = Sequence(req, slot, samplers[0], need)
            seq.n_cached = n_cached
            seq.pending_choices = list(zip(choice_slots, samplers[1:], strict=True))
            self.cache.bind(slot, seq)
            self._active[(req.request_id, 0)] = seq
            self._reserved += need
        self._pending.extendleft(reversed(waiting))

    def step(self) -> list[SeqUpdate]:
        """Admit, decode one batch, sample, and return every sequence's news."""
        self.launch()
        return self.complete()

    def launch(self) -> None:
        """The first half of a step: admit, build the batch and start `llama_decode`. With an
        asynchronous backend (a GPU) the device is still computing when this returns, and the
        caller may ship the previous step's text meanwhile; `complete` waits for it."""
        if self._launched is not None:
            raise RuntimeError("launch() twice without complete()")
        self._admit()
        ctx = self.ctx
        ctx.clear_batch()
        to_sample: list[tuple[Sequence, int]] = []
        progress: list[tuple[Sequence, int]] = []  # (seq, tokens added to the batch)
        prompt_scores: list[tuple[Sequence, int, int]] = []  # (seq, prompt position, index)
        budget = ctx.n_batch
        running = [s for s in self._active.values() if s.finish_reason is None]
        if len(running) > self.max_batch_size:
            running = self._unpaused(running)
        if self.vision is not None:
            self._prefill_one_image(running)
        for seq in running:
            if not seq.is_prefilling and budget > 0:
                to_sample.append((seq, ctx.add(seq.last_token, seq.n_cached, seq.slot, True)))
                progress.append((seq, 1))
                budget -= 1
        for i, seq in enumerate(running):
            if budget <= 0:
                break
            if seq.is_prefilling and seq.finish_reason is None:
                start = seq.n_cached
                take = min(budget, seq.text_end(start) - start)
                if take <= 0:
                    continue  # its next image waits for a step of its own
                scored = seq.prompt_logprobs is not None
                if scored:
                    # Logits rows are bounded (n_outputs_max, see BatchContext): keep one for
                    # each prefilling sequence after this one; one row per sequence when
                    # sampling runs in the decode graph (n_outputs_max_per_seq).
                    later = sum(1 for s in running[i + 1:] if s.is_prefilling)
                    room = ctx.outputs_left - later
                    if ctx.backend_sampling:
                        room = min(room, 1)
                    take = min(take, PROMPT_LOGITS_PER_STEP, room)
                    if take <= 0:
                        continue
                end = start + take
                if scored and start == 0:
                    prompt_scores.append((seq, 0, -1))  # nothing predicts the first token
                for pos in range(start, end):
                    idx = ctx.add(seq.prompt[pos], pos, seq.slot,
                                  scored or pos == len(seq.prompt) - 1)
                    if scored and pos + 1 < len(seq.prompt):
                        prompt_scores.append((seq, pos + 1, idx))
                if end == len(seq.prompt):
                    if seq.params.max_tokens == 0:
                        seq.finish(FINISH_LENGTH)  # a completion that only echoes its prompt
                    else:
                        to_sample.append((seq, idx))
                progress.append((seq, take))
                budget -= take

        if not ctx.batch_size and self._encoding is not None:
            # Nothing to decode until the image is encoded: wait for it (briefly, so that new
            # requests and cancellations are still read) rather than spin.
            wait_for_futures([self._encoding[2]], timeout=0.05)
        if ctx.batch_size:
            # Exactly the sequences that get a token this step sample in the decode graph:
            # llama.cpp runs every attached chain each step (an idle one on a dummy row, its
            # random state advancing), so a sequence still prefilling or paused is not attached
            # and a seed gives the same tokens however the prompt was chunked.
            ctx.attach_only({seq.slot: seq.sampler for seq, _ in to_sample})
            rc = ctx.decode()
            while rc == 1 and self.cache.evict_one():
                rc = ctx.decode()  # cells a cached prefix held may be what this batch lacked
            if rc != 0:
                self._on_decode_failure(rc, progress)
                to_sample = []
            else:
                for seq, n in progress:
                    seq.n_cached += n
                self.cache.after_step(progress)
                self._score_prompts(prompt_scores)
                to_sample += self._fan_out_choices(to_sample)
        self._launched = to_sample

    def complete(self) -> list[SeqUpdate]:
        """The second half of a step: wait for the decode `launch` started (reading a token or
        a logits row synchronizes), sample, and return every sequence's news."""
        to_sample, self._launched = self._launched or [], None
        model = self.model
        for (seq, _), token in zip(to_sample, self._sample(to_sample), strict=True):
            if token < 0:
                continue  # its sampler failed; the sequence is finished with the error
            seq.accept(token, model.piece(token), model.is_eog(token),
                       self._logprob_of(seq, token))
        return self._collect()

    def _prefill_one_image(self, running: list[Sequence]) -> None:
        """Start encoding the next image a running sequence's prefill has reached, unless one
        is being encoded; decode an image whose encode is done into its sequence's KV cells
        (from where its cached cells end, when the prompt cache gave it part of that image
        already). A bad image fails its own request; the step goes on for everyone else."""
        if self._encoding is None:
            for seq in running:
                if seq.is_prefilling and seq.finish_reason is None:
                    image = seq.image_at(seq.n_cached)
                    if image is not None:
                        self._encoding = (seq, image,
                                          self.vision.encode_async(image.data, image.n_tokens))
                        break
        # Done meanwhile (or just now, when the encoder does not run in the background).
        if self._encoding is not None and self._encoding[2].done():
            seq, image, future = self._encoding
            self._encoding = None
            if seq.finish_reason is None and seq.image_at(seq.n_cached) is image:
                self._take_encoded(seq, image, future)

    def _take_encoded(self, seq: Sequence, image: PromptImage, future: Future) -> None:
        from wicore_cpp.engine.vision import ImageError

        try:
            embd = future.result()
        except ImageError as exc:
            log.warning("request %s: image at position %d: %s", seq.request_id, image.pos, exc)
            seq.finish(FINISH_ERROR, f"the image could not be encoded: {exc}")
            return
        self._decode_image(seq, image, embd)

    def _decode_image(self, seq: Sequence, image: PromptImage, embd) -> None:
        rows = embd[seq.n_cached - image.pos:]
        rc = self.vision.decode(self.ctx, rows, seq.n_cached, seq.slot)
        while rc == 1 and self.cache.evict_one():
            rc = self.vision.decode(self.ctx, rows, seq.n_cached, seq.slot)
        if rc != 0:
            self._on_decode_failure(rc, [(seq, len(rows))])
            return
        seq.n_cached += len(rows)
        self.cache.after_step([(seq, len(rows))])

    def _fan_out_choices(self, to_sample: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """The other choices of requests whose prompt was just prefilled, ready to sample.

        A request with n choices prefills its prompt once, in choice 0's slot. Then each other
        choice gets those KV cells (`llama_memory_seq_cp` shares them in the unified pool,
        nothing is copied) and its own sequence and sampler, and all n sample their first
        token from the same logits.
        """
        added: list[tuple[Sequence, int]] = []
        for seq, idx in to_sample:
            if not seq.pending_choices:
                continue
            choices, seq.pending_choices = seq.pending_choices, []
            max_tokens = seq.params.max_tokens
            seq.reservation -= len(choices) * max_tokens
            request = GenerateRequest(seq.request_id, seq.prompt, seq.params, seq.priority,
                                      seq.tenant)
            for i, (slot, sampler) in enumerate(choices, start=1):
                self.ctx.copy_sequence(seq.slot, slot)
                self.cache.fork(seq.slot, slot, seq.n_cached)
                choice = Sequence(request, slot, sampler, max_tokens, index=i)
                choice.n_cached = seq.n_cached
                self._active[(seq.request_id, i)] = choice
                added.append((choice, idx))
        return added

    def _score_prompts(self, scores: list[tuple[Sequence, int, int]]) -> None:
        """The log-probabilities of prompt tokens (echo with logprobs), from this step's
        logits of the positions before them."""
        piece, n_vocab = self.model.piece, self.model.info.n_vocab
        for seq, pos, idx in scores:
            token = seq.prompt[pos]
            if idx < 0:
                seq.prompt_logprobs.append((piece(token), None, ()))
                continue
            logprob, top = token_logprob(logits_at(self.ctx, idx, n_vocab), token,
                                         seq.params.logprobs or 0)
            seq.prompt_logprobs.append(
                (piece(token), logprob, tuple((piece(t), lp) for t, lp in top)))

    def _unpaused(self, running: list[Sequence]) -> list[Sequence]:
        """The `max_batch_size` sequences this step decodes, highest priority first, then in
        admission order; the others wait with their KV cells kept. Paused first: the lowest
        priority (urgent ones run), then, within it, the key with the most sequences of that
        level running (a key that started in a fair slot runs beside a flood), then the
        newest."""
        order = {id(s): i for i, s in enumerate(running)}
        held = Counter((s.priority, s.tenant) for s in running)
        left = list(running)
        for _ in range(len(running) - self.max_batch_size):
            victim = min(left, key=lambda s: (s.priority, -held[(s.priority, s.tenant)],
                                              -order[id(s)]))
            held[(victim.priority, victim.tenant)] -= 1
            left.remove(victim)
        return sorted(left, key=lambda s: (-s.priority, order[id(s)]))

    def _logprob_of(self, seq: Sequence, token: int) -> TokenLogprob | None:
        found = seq.sampler.last_logprob
        if found is None:
            return None
        piece = self.model.piece
        logprob, alternatives = found
        return (piece(token), logprob, tuple((piece(t), lp) for t, lp in alternatives))

    def _sample_one(self, seq: Sequence, idx: int) -> int:
        try:
            return seq.sampler.sample(self.ctx, idx)
        except GrammarError as exc:
            log.warning("request %s: %s", seq.request_id, exc)
            seq.finish(FINISH_ERROR, str(exc))
            return -1

    def _sample(self, to_sample: list[tuple[Sequence, int]]) -> list[int]:
        """One token per (sequence, batch index), in order. Sequences sampled on the backend
        only read the token llama.cpp drew during the decode; the others sample here from
        their logits row, in parallel chunks."""
        tokens = [0] * len(to_sample)
        on_host: list[int] = []
        for i, (seq, idx) in enumerate(to_sample):
            if seq.sampler.on_backend:
                tokens[i] = self._sample_one(seq, idx)
            else:
                on_host.append(i)
        if self._pool is None or len(on_host) < 2:
            for i in on_host:
                tokens[i] = self._sample_one(*to_sample[i])
            return tokens
        # The first logits read may reorder llama.cpp's outputs: do it on this thread, so the
        # parallel samplers below only read.
        self.ctx.logits_ready(to_sample[on_host[0]][1])
        n = min(self._num_chunks, len(on_host))
        chunks = [on_host[i::n] for i in range(n)]

        def run(chunk: list[int]) -> None:
            for i in chunk:
                tokens[i] = self._sample_one(*to_sample[i])

        futures = [self._pool.submit(run, chunk) for chunk in chunks[1:]]
        run(chunks[0])
        for future in futures:
            future.result()
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
        finished: list[tuple[tuple[str, int], Sequence]] = []
        for key, seq in self._active.items():
            update = seq.take_update()
            if update is not None:
                updates.append(update)
            if seq.finish_reason is not None:
                finished.append((key, seq))
        for key, seq in finished:
            del self._active[key]
            self._release(seq, updates)
        return updates

    def _release(self, seq: Sequence, updates: list[SeqUpdate]) -> None:
        """Free a finished sequence's sampler and reservation; its slot and KV cells go back
        to the pool or stay in the prompt cache."""
        self.ctx.detach(seq.slot, reuse=False)  # llama.cpp holds the chain until told so
        if not self.cache.release(seq.slot, self._kv_to_keep(seq), len(seq.prompt)):
            self.ctx.drop_sequence(seq.slot)
            self._free_slots.append(seq.slot)
        seq.sampler.free()
        for i, (slot, sampler) in enumerate(seq.pending_choices, start=1):
            # Ended (cancelled, failed) before its choices were fanned out: they end with it.
            sampler.free()
            self._free_slots.append(slot)
            updates.append((seq.request_id, i, "", [], seq.finish_reason, seq.error, None))
        seq.pending_choices = []
        # The prompt's cells stay while another choice still uses them: so does their share
        # of the reservation (held by one live choice at a time).
        prompt_share = seq.reservation - seq.params.max_tokens
        if prompt_share > 0 and seq.params.n > 1:
            survivor = next((s for (rid, _), s in self._active.items()
                             if rid == seq.request_id and s.finish_reason is None), None)
            if survivor is not None:
                survivor.reservation += prompt_share
                seq.reservation -= prompt_share
        self._reserved -= seq.reservation

    def _kv_to_keep(self, seq: Sequence) -> list[int] | None:
        """What an ended sequence's KV cells hold, for the prompt cache; None when they are
        not to be kept (the cache is off, the request opted out, or its decode failed)."""
        if (not self.cache.is_enabled or not seq.params.cache_prompt
                or seq.finish_reason == FINISH_ERROR):
            return None
        return seq.kv_tokens()

    def _num_sequences(self) -> int:
        """Sequences holding a seq id: running ones, and choices waiting to fan out."""
        return len(self._active) + sum(len(s.pending_choices) for s in self._active.values())
