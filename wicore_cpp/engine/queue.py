"""The priority queue every worker pulls from: four levels, FIFO within a level, with aging.

Aging: a waiting request's effective priority is `level + waited / aging_s`. For two waiting
requests the `now / aging_s` term is common, so their order never changes while they wait:
it is the order of `arrival - level * aging_s`. One heap keyed that way gives exact aging at
O(log n) per operation with no periodic re-sorting, and bounds a low request's wait: nothing
that arrives more than `3 * aging_s` after it (even urgent) is served before it.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from wicore_cpp.errors import excerpt

T = TypeVar("T")


class Priority(enum.IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2
    URGENT = 3

    @classmethod
    def parse(cls, value: str) -> Priority:
        """'low' / 'normal' / 'high' / 'urgent', in any letter case but nothing around them
        (an HTTP header's surrounding spaces are gone before this). Raises ValueError."""
        # ASCII only: str.upper() maps the dotless 'ı' to 'I', and 'hıgh' is not a level.
        name = value.upper() if isinstance(value, str) and value.isascii() else ""
        if name not in cls.__members__:
            raise ValueError(
                f"priority must be one of low, normal, high, urgent (any case); "
                f"got {excerpt(value)}"
            )
        return cls[name]


class QueueFull(Exception):
    """The queue holds `max_size` requests already."""


@dataclass(order=True, slots=True)
class _Entry(Generic[T]):
    key: float
    seq: int
    item_id: str = field(compare=False)
    item: T = field(compare=False)
    level: Priority = field(compare=False)
    removed: bool = field(default=False, compare=False)


class PriorityRequestQueue(Generic[T]):
    """Bounded priority queue with aging and O(1) removal by id (lazy deletion)."""

    def __init__(self, max_size: int, aging_s: float):
        if max_size < 1 or aging_s <= 0:
            raise ValueError("max_size must be >= 1 and aging_s > 0")
        self.max_size = max_size
        self.aging_s = aging_s
        self._heap: list[_Entry[T]] = []
        self._by_id: dict[str, _Entry[T]] = {}
        self._counts = [0] * len(Priority)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._by_id

    def push(self, item_id: str, item: T, level: Priority, arrival: float) -> None:
        """Add a request that arrived at `arrival` (monotonic seconds). Raises QueueFull.

        A request put back after a worker died keeps its first arrival time, so it goes
        back ahead of everything that came after it.
        """
        if len(self._by_id) >= self.max_size:
            raise QueueFull(f"queue is full ({self.max_size} waiting)")
        if item_id in self._by_id:
            raise ValueError(f"{item_id} is already queued")
        entry = _Entry(arrival - level * self.aging_s, next(self._seq), item_id, item, level)
        heapq.heappush(self._heap, entry)
        self._by_id[item_id] = entry
        self._counts[level] += 1

    def pop(self) -> T | None:
        """The request with the highest effective priority, or None when empty."""
        while self._heap:
            entry = heapq.heappop(self._heap)
            if entry.removed:
                continue
            del self._by_id[entry.item_id]
            self._counts[entry.level] -= 1
            return entry.item
        return None

    def peek(self, level: Priority | None = None) -> T | None:
        """What `pop()` (or `pop_level(level)`) would return, left in the queue."""
        if level is not None:
            entries = [e for e in self._by_id.values() if e.level is level]
            return min(entries).item if entries else None
        while self._heap and self._heap[0].removed:
            heapq.heappop(self._heap)
        return self._heap[0].item if self._heap else None

    def pop_level(self, level: Priority) -> T | None:
        """The longest-waiting request of exactly `level`, whatever waits ahead of it."""
        entries = [e for e in self._by_id.values() if e.level is level]
        if not entries:
            return None
        return self.remove(min(entries).item_id)

    def remove(self, item_id: str) -> T | None:
        """Take a waiting request out (cancelled, timed out); None if it is not waiting."""
        entry = self._by_id.pop(item_id, None)
        if entry is None:
            return None
        entry.removed = True
        self._counts[entry.level] -= 1
        # Keep the heap from filling with tombstones under heavy cancellation.
        if len(self._heap) > 2 * len(self._by_id) + 64:
            self._heap = [e for e in self._heap if not e.removed]
            heapq.heapify(self._heap)
        return entry.item

    def lengths(self) -> dict[Priority, int]:
        """Waiting requests per requested level (before aging)."""
        return {level: self._counts[level] for level in Priority}
