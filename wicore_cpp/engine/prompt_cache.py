"""The prompt cache of one worker: KV cells of earlier requests, kept for requests that start
with the same tokens (the previous turns of a conversation, a shared system prompt).

What is kept. Every cached prefix is an *entry*: a llama.cpp sequence id whose cells hold the
KV of known tokens, position by position.
- A sequence that ends (finished, cancelled, timed out; not failed) stays where it is: its seq
  id and cells become an entry holding its prompt and what it generated.
- A *pin* is a prefix of a running sequence shared into a seq id of its own at a boundary worth
  reusing: one token before the end of its prompt (the same prompt again, or the next turn of
  the conversation when the reply does not re-tokenize the same way), and the point where its
  prompt parts from a cached one (the end of a shared system prompt).
In llama.cpp's unified KV pool `llama_memory_seq_cp` shares cells between sequences without
copying them, so a pin costs a seq id, not cells; `llama_memory_seq_rm` trims what a new prompt
does not share.

Reuse. A new request starts from the longest prefix of its prompt that an entry can give (at
most all but the prompt's last token: its logits must be computed). An entry that ends exactly
where the prompt parts from it, or whose whole prompt the new prompt repeats (the next turn of
the same conversation), is taken over in place; otherwise its prefix is shared into the new
sequence's seq id.

Sliding-window layers (Gemma 3, `swa_full = false`). In those layers llama.cpp keeps only the
cells a sequence still needs to continue from its end: a cell at position p is given away once
p <= pos_max + 1 - n_swa, unless another sequence shares it. So an entry can always be continued
from its end, but reusing its first n tokens needs the cells from n - n_swa + 1 on, and those are
there only while `llama_memory_seq_pos_min` <= n - n_swa + 1. That is checked before every
reuse; where it fails the prefix is recomputed (a window miss), never used without its cells.
The pins are what make the common boundaries reusable in spite of the window: a pin ends at its
boundary, so it can always be continued from there.

Room. Running sequences reserve prompt + max_tokens cells each, as without a cache, counting
cells they share with entries; the cache adds only the cells no running sequence holds. When a
new request needs room or a seq id, least recently used entries are evicted first (dropping an
entry never takes cells a running sequence still holds: those are shared), and a request waits
only when it would wait with the cache empty. If llama.cpp still finds no slot for a batch
(cells shared by several sequences in the sliding-window layers are not given away while they
are shared), the batcher evicts entries one by one and retries the batch.

Host tier. An evicted entry is saved to host memory (`llama_state_seq_get_data`), bounded in
bytes, and put back (`llama_state_seq_set_data`) when a request comes back for a prefix at
least `RESTORE_MIN_GAIN` tokens longer than what the KV pool holds: restoring costs a copy of
the cells, recomputing costs a forward pass over every token (see the README for both measured).
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from wicore_cpp.engine.backend import BatchContext
from wicore_cpp.engine.messages import CacheReport, PromptCacheStats
from wicore_cpp.engine.prefix_routing import block_hashes

log = logging.getLogger("wicore.prompt_cache")

# Shorter common prefixes (a chat template's first tokens) are not worth sharing cells for.
MIN_REUSE_TOKENS = 16
# A boundary shorter than this is not worth a seq id of its own.
MIN_PIN_TOKENS = 64
# Shorter prefixes are recomputed in about the time a restore takes, and fill the host tier.
MIN_HOST_TOKENS = 64
# Restore from host memory only when it saves at least this many tokens of prefill.
RESTORE_MIN_GAIN = 32


class Span:
    """KV cells one sequence computed itself, for positions from `start` on. Every sequence
    that holds some of them holds a prefix of them, so their count is the longest such prefix."""

    __slots__ = ("start", "is_running")

    def __init__(self, start: int):
        self.start = start
        self.is_running = True  # its sequence runs, and reserves all of its cells


Piece = tuple[Span, int]  # positions [span.start, end) of a span


def _truncate(pieces: list[Piece], n: int) -> list[Piece]:
    """The pieces that hold positions [0, n)."""
    out: list[Piece] = []
    for span, end in pieces:
        if span.start >= n:
            break
        out.append((span, min(end, n)))
    return out


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit` (list compares run in C)."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(slots=True, eq=False)
class Entry:
    """A cached prefix in the KV pool: seq id `seq_id` holds `tokens`, position by position."""

    seq_id: int
    tokens: list[int]
    n_prompt: int  # how many of the tokens were its prompt (the rest it generated)
    pieces: list[Piece]
    is_pin: bool
    last_used: int
    blocks: list[int]


@dataclass(slots=True, eq=False)
class HostEntry:
    """An evicted entry's cells in host memory; `pos_min` as `llama_memory_seq_pos_min` said."""

    tokens: list[int]
    state: bytearray
    pos_min: int
    last_used: int
    blocks: list[int]


@dataclass(slots=True, eq=False)
class _Running:
    """What the cache knows of a running sequence."""

    prompt: list[int]
    borrowed: list[Piece]  # cells it shares with the entry it started from
    own: Span  # cells it computes itself
    pins: list[int]  # positions to pin its prefix at, ascending
    # The sliding-window cells it shares (span, first position, end): they stay taken while
    # another sequence holds them too, even once the window has moved past them.
    swa_shared: list[tuple[Span, int, int]]
    is_cached: bool = False  # it uses the cache (its prefixes may be pinned)
    seq: Any = None  # the batcher's Sequence (`n_cached`, `finish_reason`), once bound


@dataclass(slots=True)
class _Plan:
    """Where a new sequence starts."""

    n: int = 0  # prompt tokens it reuses
    entry: Entry | None = None
    host: HostEntry | None = None
    take_over: bool = False  # use the entry's seq id itself
    branch_at: int = 0  # where its prompt parts from a longer cached one (pin it there)
    pin_ends: frozenset[int] = frozenset()  # lengths of entries that match the prompt that far


class PromptCache:
    """The cached prefixes of one llama.cpp context, with the seq ids and cells they hold.

    The batcher asks it where a new sequence starts (`place`), tells it when a step has
    decoded (`after_step`), when a sequence ends (`release`), and when llama.cpp found no room
    for a batch (`evict_one`). Seq ids not in use are in `free_ids`, which the batcher shares.
    """

    def __init__(self, ctx: BatchContext, n_swa: int, free_ids: deque[int], *, max_cells: int,
                 host_bytes: int = 0, swa_budget: int = 0):
        """`max_cells`: most KV cells the entries may hold (0 turns the cache off);
        `host_bytes`: size of the host tier (0: none); `swa_budget`: most sliding-window cells
        running sequences may share by starting from cached prefixes (the windows of the seq
        ids beyond the running ones, which llama.cpp sized its sliding-window cache for)."""
        self._ctx = ctx
        self._n_swa = n_swa
        self._swa_budget = swa_budget
        self._free_ids = free_ids
        self.max_cells = max_cells
        self.host_limit = host_bytes
        self._entries: dict[int, Entry] = {}  # by seq id
        self._host: list[HostEntry] = []
        self._running: dict[int, _Running] = {}  # by seq id
        self._awaiting: set[int] = set()  # seq ids of running sequences with pins to come
        self._clock = itertools.count(1)
        self._blocks: Counter[int] = Counter()  # prefix block hashes of all entries
        self._added: list[int] = []
        self._removed: list[int] = []
        self._cached_tokens: list[tuple[str, int]] = []
        self._changed = False
        self._hits = self._tokens_reused = self._window_misses = self._evictions = 0
        self._host_saves = self._host_restores = 0

    @property
    def is_enabled(self) -> bool:
        return self.max_cells > 0

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    # -- a new sequence --------------------------------------------------------------------------

    def place(self, request_id: str, prompt: list[int], need: int, reserved: int,
              use_cache: bool = True) -> tuple[int, int] | None:
        """A seq id for a new sequence and how many prompt tokens its cells already hold.

        `need`: the cells it reserves (prompt + max_tokens); `reserved`: those the running
        sequences reserve. Evicts entries for room and for a seq id. None when it does not fit
        even with the cache empty: the request waits, as it would without a cache.
        """
        if reserved + need > self._ctx.n_ctx:
            return None  # it waits for running sequences to end; evicting would not help
        cached = self.is_enabled and use_cache
        plan = self._lookup(prompt) if cached else _Plan()
        swa_shared: list[tuple[Span, int, int]] = []
        if plan.entry is not None and not plan.take_over and self._n_swa > 0:
            # Sharing window cells is safe only within what llama.cpp has room for even if
            # the sequences sharing them outlive every entry (see _shared_swa).
            swa_shared = self._swa_cells(plan.entry, plan.n)
            if self._shared_swa(swa_shared) > self._swa_budget:
                # Sharing would leave window cells held by an entry beside the running
                # sequences: continue the entry itself instead, trimmed to the prefix (with no
                # seq ids of the cache's own, the memory fit's first concession, this is how
                # cached prefixes are reused).
                log.debug("taking over %d cached tokens in place: sliding-window cells would "
                          "run short if shared", plan.n)
                plan.take_over = True
                swa_shared = []
        if not self._make_room(plan, need, reserved):
            return None
        slot, borrowed = self._attach(plan)
        n = plan.n
        if n and not self._holds(slot, n):
            # Never trust cells llama.cpp does not report: recompute instead.
            log.warning("cached prefix of %d tokens not held as expected; recomputing", n)
            self._ctx.drop_sequence(slot)
            n, borrowed, swa_shared = 0, [], []
        if plan.entry is None or plan.take_over:
            swa_shared = []
        own_start = borrowed[-1][1] if borrowed else 0
        pins: list[int] = []
        if cached:
            ends = plan.pin_ends
            for at in sorted({plan.branch_at, len(prompt) - 1}):
                if at >= MIN_PIN_TOKENS and at not in ends:
                    pins.append(at)
        self._running[slot] = _Running(prompt, borrowed, Span(own_start), pins, swa_shared,
                                       cached)
        if n:
            self._hits += 1
            self._tokens_reused += n
        if cached:
            self._cached_tokens.append((request_id, n))
            self._changed = True
            self._pin_reached(slot, n)
        return slot, n

    def bind(self, slot: int, seq: Any) -> None:
        """The running sequence in `slot` (its progress tells when a prefix can be pinned)."""
        r = self._running.get(slot)
        if r is not None:
            r.seq = seq

    def wait_for(self, prompt: list[int], use_cache: bool = True) -> bool:
        """Whether a new request should wait for a running sequence to compute a prefix their
        prompts share (many requests with one system prompt arriving together).

        That sequence is then pinned where the prompts part, and the request starts from the
        pin once it exists, rather than compute the same prefix beside it. True: let it wait
        (the requests behind it may go first); False: place it now. A running sequence that
        has already passed that point is pinned at once, if its window cells are still there.
        """
        if not (self.is_enabled and use_cache):
            return False
        limit = len(prompt) - 1
        source, at = None, 0
        for slot, r in self._running.items():
            if not r.is_cached or r.seq is None or r.seq.finish_reason is not None:
                continue
            c = common_prefix(r.prompt, prompt, limit)
            if c > at:
                source, at = slot, c
        if source is None or at < MIN_PIN_TOKENS:
            return False
        if any(common_prefix(e.tokens, prompt, limit) >= at for e in self._entries.values()):
            return False  # cached already
        r = self._running[source]
        if at not in r.pins:
            bisect.insort(r.pins, at)
        n = r.seq.n_cached
        if n >= at:
            self._pin_reached(source, n)
            return False
        self._awaiting.add(source)
        return True

    def _lookup(self, prompt: list[int]) -> _Plan:
        """The longest usable cached prefix of `prompt`, and the boundaries worth pinning."""
        limit = len(prompt) - 1  # the last prompt token is always decoded: its logits are needed
        plan = _Plan()
        if limit <= 0:
            return plan
        # The longest match of all, and whether the prompt parts from every entry that long
        # inside its prompt: a branch (another conversation with the same beginning), worth a
        # pin. Parting inside what an entry generated is the same conversation's next turn.
        longest, is_branch = 0, False
        blocked = 0  # longest match whose sliding-window cells were gone
        ends: set[int] = set()
        best_key: tuple = (0,)
        for e in self._entries.values():
            c = common_prefix(e.tokens, prompt, limit)
            if c < MIN_REUSE_TOKENS:
                continue
            if c == len(e.tokens):
                ends.add(c)
            inside = c < min(len(e.tokens), e.n_prompt)
            if c > longest:
                longest, is_branch = c, inside
            elif c == longest:
                is_branch = is_branch and inside
            if not self._window_ok(e.seq_id, c):
                blocked = max(blocked, c)
                continue
            take_over = not e.is_pin and (c == len(e.tokens) or c >= e.n_prompt)
            key = (c, take_over, e.is_pin, e.last_used)
            if key > best_key:
                best_key = key
                plan.n, plan.entry, plan.take_over = c, e, take_over
        host_best: HostEntry | None = None
        host_n = 0
        for h in self._host:
            c = common_prefix(h.tokens, prompt, limit)
            if c >= MIN_REUSE_TOKENS and c > host_n and self._host_window_ok(h, c):
                host_best, host_n = h, c
        if host_best is not None and host_n >= plan.n + RESTORE_MIN_GAIN:
            plan.n, plan.entry, plan.host, plan.take_over = host_n, None, host_best, False
        if blocked > plan.n:
            self._window_misses += 1
        if is_branch:
            plan.branch_at = longest
        plan.pin_ends = frozenset(ends)
        return plan

    def _window_ok(self, seq_id: int, n: int) -> bool:
        """Whether seq `seq_id` still has every cell a sequence continuing at position n needs."""
        if self._n_swa <= 0:
            return True
        pos_min = self._ctx.pos_min(seq_id)
        return 0 <= pos_min <= max(0, n - self._n_swa + 1)

    def _host_window_ok(self, h: HostEntry, n: int) -> bool:
        if self._n_swa <= 0 or n == len(h.tokens):
            return True
        return 0 <= h.pos_min <= max(0, n - self._n_swa + 1)

    def _holds(self, seq_id: int, n: int) -> bool:
        """Whether seq `seq_id` holds exactly positions [0, n), with the cells position n needs."""
        return self._ctx.pos_max(seq_id) == n - 1 and self._window_ok(seq_id, n)

    def _swa_cells(self, entry: Entry, n: int) -> list[tuple[Span, int, int]]:
        """The sliding-window cells a sequence sharing `entry`'s first n positions gets."""
        lo = max(0, self._ctx.pos_min(entry.seq_id))
        return [(span, max(span.start, lo), end) for span, end in _truncate(entry.pieces, n)
                if end > max(span.start, lo)]

    def _shared_swa(self, extra: list[tuple[Span, int, int]] = ()) -> int:
        """Sliding-window cells that running sequences share through cached prefixes.

        llama.cpp gives a window cell away only when one sequence holds it, so these can stay
        taken after every entry is evicted, for as long as two running sequences share them.
        Kept within the windows of the cache's own seq ids, evicting entries always makes room
        for a batch (see ContinuousBatcher.step).
        """
        ranges: dict[Span, tuple[int, int]] = {}
        shared = (r.swa_shared for r in self._running.values())
        for span, lo, hi in itertools.chain(itertools.chain.from_iterable(shared), extra):
            old = ranges.get(span)
            ranges[span] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        return sum(hi - lo for lo, hi in ranges.values())

    def _make_room(self, plan: _Plan, need: int, reserved: int) -> bool:
        """Evict least recently used entries until the new sequence fits; give up the plan's
        hit rather than make the request wait."""
        n_ctx = self._ctx.n_ctx
        while True:
            cover = _truncate(plan.entry.pieces, plan.n) if plan.entry is not None else []
            transient = len(plan.host.tokens) - plan.n if plan.host is not None else 0
            if reserved + need + transient + self._cells(cover)[1] <= n_ctx:
                return True
            victim = self._lru(exclude=plan.entry)
            if victim is not None:
                self._evict(victim)
            elif plan.n:
                plan.n, plan.entry, plan.host, plan.take_over = 0, None, None, False
            else:
                return False

    def _attach(self, plan: _Plan) -> tuple[int, list[Piece]]:
        """Take a seq id for the new sequence and give it the plan's cached prefix."""
        ctx = self._ctx
        entry = plan.entry
        if entry is not None and not plan.take_over:
            slot = self._take_free_id(exclude=entry)
            if slot is None:  # the entry holds the last seq id: continue it in place
                plan.take_over = True
        if entry is not None and plan.take_over:
            slot = entry.seq_id
            self._remove(entry)
            if plan.n < len(entry.tokens):
                ctx.trim(slot, plan.n)
            return slot, _truncate(entry.pieces, plan.n)
        if entry is None:
            slot = self._take_free_id(exclude=None)
            assert slot is not None, "a seq id is free or held by an entry"
        if entry is not None:
            entry.last_used = next(self._clock)
            ctx.share_prefix(entry.seq_id, slot, plan.n)
            return slot, _truncate(entry.pieces, plan.n)
        if plan.host is not None:
            host = plan.host
            host.last_used = next(self._clock)
            if ctx.restore_sequence(slot, host.state):
                ctx.trim(slot, plan.n)
                self._host_restores += 1
                self._changed = True
            else:
                log.warning("restoring a cached prefix of %d tokens failed; recomputing",
                            len(host.tokens))
                ctx.drop_sequence(slot)
                plan.n = 0
        return slot, []

    def _take_free_id(self, exclude: Entry | None) -> int | None:
        if self._free_ids:
            return self._free_ids.popleft()
        victim = self._lru(exclude=exclude)
        if victim is None:
            return None
        self._evict(victim)
        return self._free_ids.popleft()

    def take_seq_id(self) -> int:
        """A seq id for another sequence (a request's further choices), evicting the least
        recently used entry when none is free. The caller keeps sequences within the context's
        seq ids, so one is free or held by an entry."""
        seq_id = self._take_free_id(exclude=None)
        assert seq_id is not None, "a seq id is free or held by an entry"
        return seq_id

    def fork(self, src: int, dst: int, n: int) -> None:
        """Running sequence `dst` was given `src`'s first n positions (a request's further
        choice after its shared prefill): it holds them as `src` does."""
        r = self._running.get(src)
        if r is None:
            return
        pieces = r.borrowed + ([(r.own, n)] if n > r.own.start else [])
        # Its window cells are shared with `src` as a request's choices share them with or
        # without a cache: not the cache's to count (see _shared_swa).
        self._running[dst] = _Running(r.prompt, _truncate(pieces, n), Span(n), [], [])

    # -- running sequences -----------------------------------------------------------------------

    def after_step(self, progress: list[tuple[Any, int]]) -> None:
        """A decode step went through; `progress` holds (sequence, tokens added) for each
        sequence it advanced. Pins the prefixes that reached their boundary."""
        if not self._awaiting:
            return
        for seq, _ in progress:
            if seq.slot in self._awaiting:
                self._pin_reached(seq.slot, seq.n_cached)

    def _pin_reached(self, slot: int, n: int) -> None:
        r = self._running[slot]
        self._awaiting.discard(slot)
        if r.pins and r.pins[-1] > n:
            self._awaiting.add(slot)
        while r.pins and r.pins[0] <= n:
            at = r.pins.pop(0)
            # Pinned right after the step that computed position `at - 1`: the window cells it
            # needs have not been given away yet (that happens only when the sequence's next
            # batch finds its slots). Checked all the same.
            seq_id = self._take_free_id(exclude=None)
            if seq_id is None:
                return
            self._ctx.share_prefix(slot, seq_id, at)
            if not self._holds(seq_id, at):
                self._ctx.drop_sequence(seq_id)
                self._free_ids.append(seq_id)
                continue
            pieces = r.borrowed + ([(r.own, at)] if at > r.own.start else [])
            self._add(Entry(seq_id, r.prompt[:at], at, _truncate(pieces, at), True,
                            next(self._clock), block_hashes(r.prompt, at)))
        self._enforce_bound(keep=None)

    def release(self, slot: int, kv_tokens: list[int] | None, n_prompt: int,
                request_id: str = "") -> bool:
        """A sequence has ended; `kv_tokens` are what its cells hold (None: do not keep them:
        it failed or opted out). True: the cache took over its seq id and cells; False: the
        caller drops them and frees the seq id."""
        r = self._running.pop(slot, None)
        self._awaiting.discard(slot)
        if r is None:
            return False
        r.own.is_running = False
        if not self.is_enabled or not kv_tokens:
            return False
        n = len(kv_tokens)
        if n > self.max_cells:
            return False
        for e in self._entries.values():
            if len(e.tokens) == n and e.tokens == kv_tokens:
                e.last_used = next(self._clock)
                return False  # the same tokens are cached already
        pieces = r.borrowed + ([(r.own, n)] if n > r.own.start else [])
        entry = Entry(slot, kv_tokens, n_prompt, _truncate(pieces, n), False,
                      next(self._clock), block_hashes(kv_tokens))
        self._add(entry)
        self._enforce_bound(keep=entry)
        log.debug("cached %d tokens of %s (%d entries)", n, request_id, len(self._entries))
        return True

    def evict_one(self) -> bool:
        """llama.cpp found no room for a batch: evict the least recently used entry."""
        victim = self._lru(exclude=None)
        if victim is None:
            return False
        log.debug("no KV slot for a batch: evicting a cached prefix of %d tokens",
                 len(victim.tokens))
        self._evict(victim)
        return True

    # -- entries ---------------------------------------------------------------------------------

    def _add(self, entry: Entry) -> None:
        self._entries[entry.seq_id] = entry
        for h in entry.blocks:
            if self._blocks[h] == 0:
                self._added.append(h)
            self._blocks[h] += 1
        self._changed = True

    def _remove(self, entry: Entry) -> None:
        """Forget an entry; its seq id and cells are the caller's."""
        del self._entries[entry.seq_id]
        self._forget_blocks(entry.blocks)

    def _forget_blocks(self, blocks: list[int]) -> None:
        for h in blocks:
            self._blocks[h] -= 1
            if self._blocks[h] == 0:
                del self._blocks[h]
                self._removed.append(h)
        self._changed = True

    def _evict(self, entry: Entry) -> None:
        # A pin of a sequence still running is not worth a host copy: that sequence will be
        # cached with the same prefix when it ends.
        if (self.host_limit and len(entry.tokens) >= MIN_HOST_TOKENS
                and not (entry.is_pin and entry.pieces[-1][0].is_running)):
            self._save_to_host(entry)
        self._remove(entry)
        self._ctx.drop_sequence(entry.seq_id)
        self._free_ids.append(entry.seq_id)
        self._evictions += 1

    def _lru(self, exclude: Entry | None) -> Entry | None:
        return min((e for e in self._entries.values() if e is not exclude),
                   key=lambda e: e.last_used, default=None)

    def _enforce_bound(self, keep: Entry | None) -> None:
        while self._entries and self._cells()[0] > self.max_cells:
            victim = self._lru(exclude=keep) or keep
            assert victim is not None
            self._evict(victim)
            if victim is keep:
                return

    def _cells(self, cover: list[Piece] = ()) -> tuple[int, int]:
        """(cells the entries hold, of those the cells no running sequence holds). A span's
        cells count once however many sequences share them; `cover`: more running pieces."""
        held: dict[Span, int] = {}
        for e in self._entries.values():
            for span, end in e.pieces:
                if held.get(span, 0) < end:
                    held[span] = end
        covered: dict[Span, int] = {}
        for pieces in itertools.chain((r.borrowed for r in self._running.values()), (cover,)):
            for span, end in pieces:
                if covered.get(span, 0) < end:
                    covered[span] = end
        total = only_cache = 0
        for span, end in held.items():
            total += end - span.start
            if not span.is_running:
                only_cache += max(0, end - max(span.start, covered.get(span, 0)))
        return total, only_cache

    # -- host tier -------------------------------------------------------------------------------

    def _save_to_host(self, entry: Entry) -> None:
        n = len(entry.tokens)
        for h in self._host:
            if len(h.tokens) >= n and h.tokens[:n] == entry.tokens and self._host_window_ok(h, n):
                h.last_used = next(self._clock)
                return  # a host copy already gives this prefix
        state = self._ctx.save_sequence(entry.seq_id)
        if state is None or len(state) > self.host_limit:
            return
        pos_min = self._ctx.pos_min(entry.seq_id)
        saved = HostEntry(entry.tokens, state, pos_min, next(self._clock), entry.blocks)
        # Copies this one can stand in for (shorter prefixes of it) go.
        for h in [h for h in self._host if len(h.tokens) < n
                  and entry.tokens[:len(h.tokens)] == h.tokens
                  and self._host_window_ok(saved, len(h.tokens))]:
            self._drop_host(h)
        while self._host and self.host_bytes + len(state) > self.host_limit:
            self._drop_host(min(self._host, key=lambda h: h.last_used))
        self._host.append(saved)
        for h in saved.blocks:
            if self._blocks[h] == 0:
                self._added.append(h)
            self._blocks[h] += 1
        self._host_saves += 1

    def _drop_host(self, h: HostEntry) -> None:
        self._host.remove(h)
        self._forget_blocks(h.blocks)

    @property
    def host_bytes(self) -> int:
        return sum(len(h.state) for h in self._host)

    # -- reporting -------------------------------------------------------------------------------

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(
            entries=len(self._entries), cells=self._cells()[0], hits=self._hits,
            tokens_reused=self._tokens_reused, window_misses=self._window_misses,
            evictions=self._evictions, host_entries=len(self._host), host_bytes=self.host_bytes,
            host_saves=self._host_saves, host_restores=self._host_restores,
        )

    def take_report(self) -> CacheReport | None:
        """What changed since the last report, or None: sent with the step's output."""
        if not self._changed:
            return None
        report = CacheReport(self._cached_tokens, self._added, self._removed, self.stats())
        self._cached_tokens, self._added, self._removed = [], [], []
        self._changed = False
        return report
