"""Which worker holds a prompt's prefix: block hashes that workers report, and the choice of
worker that the scheduler makes with them.

A prompt is cut into blocks of `BLOCK_TOKENS` tokens; block i's hash covers blocks 0..i (each
hash chains the one before it), so one hash names a whole prefix and a set of hashes answers
"how many leading blocks of this prompt are cached here" without storing any tokens. Workers
send the hashes that appear in and disappear from their prompt cache, batched with a decode
step's output; the scheduler keeps one set per worker. A hash collision can only send a request
to the wrong worker: the worker itself compares tokens before it reuses anything.

Imported by the front end as well as by workers, so it imports nothing from llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

BLOCK_TOKENS = 64


def block_hashes(tokens: Sequence[int], limit: int | None = None) -> list[int]:
    """The chained hash of each full block of `tokens` (of the first `limit` tokens if given)."""
    n = len(tokens) if limit is None else min(limit, len(tokens))
    out: list[int] = []
    h = 0
    for start in range(0, n - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        # Tuples of ints hash the same in every process (no hash randomisation for ints).
        h = hash((h, *tokens[start:start + BLOCK_TOKENS]))
        out.append(h)
    return out


class CachedPrefixes:
    """The prefix block hashes one worker has reported as cached."""

    __slots__ = ("_hashes",)

    def __init__(self) -> None:
        self._hashes: set[int] = set()

    def apply(self, added: Iterable[int], removed: Iterable[int]) -> None:
        self._hashes.difference_update(removed)
        self._hashes.update(added)

    def num_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt (given by its block hashes) are cached here."""
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._hashes)


class CacheHolder(Protocol):
    """A worker as prefix routing sees it."""

    cached_prefixes: CachedPrefixes


W = TypeVar("W", bound=CacheHolder)


def pick_worker(free: Sequence[W], prompt_tokens: Sequence[int], load: Callable[[W], int]) -> W:
    """The free worker whose cache holds the longest prefix of the prompt (at least one block),
    the least loaded of those that tie; without one, the least loaded free worker."""
    if len(free) > 1:
        hashes = block_hashes(prompt_tokens)
        if hashes:
            best = max(free, key=lambda w: (w.cached_prefixes.num_blocks(hashes), -load(w)))
            if best.cached_prefixes.num_blocks(hashes):
                return best
    return min(free, key=load)
