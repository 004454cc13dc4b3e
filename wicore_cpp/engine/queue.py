"""The priority queue every worker pulls from: four levels with aging, and a fair share
between tenants (API keys) within a level.

Aging: a waiting request's effective priority is `level + waited / aging_s`. For two waiting
requests the `now / aging_s` term is common, so their order never changes while they wait:
it is the order of `arrival - level * aging_s`. Ordering by that key gives exact aging with no
periodic re-sorting, and bounds a low request's wait: nothing that arrives more than
`3 * aging_s` after it (even urgent) is served before it.

Fair share: each arrival takes a *place* in its level's line, keyed as above, and which
level serves next is decided by places alone, so aging and the urgent slots work exactly as
without tenants. Which request fills a level's place is the fair-share choice: the tenant
with that level's waiting requests that has been served the fewest tokens (its own oldest
request goes). One tenant flooding a level therefore cannot starve another: the other's next
request takes the next place of the level. Tokens are charged by the scheduler as they are
served (`charge`), prompt and completion alike. A tenant that starts waiting at a level where
others wait is set level with the least-served of them: time away is neither credit (which
would let it starve the others later) nor debt (for tokens it was served while nobody else
wanted any). Ties go to the tenant whose last turn is longest ago. With one tenant (API keys
off) every place is filled by its own request and the queue is plain FIFO-with-aging.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from wicore_cpp.errors import excerpt

T = TypeVar("T")
Tenant = Hashable  # an API key's name, or None when keys are off


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
class _Place:
    """A place in a level's line: `arrival - level * aging_s`, ties by insertion order."""

    key: float
    seq: int
    is_free: bool = field(default=False, compare=False)  # taken back by a removal


@dataclass(order=True, slots=True)
class _Entry(Generic[T]):
    """A waiting request, ordered within its tenant by arrival (then insertion order)."""

    arrival: float
    seq: int
    item_id: str = field(compare=False)
    item: T = field(compare=False)
    level: Priority = field(compare=False)
    tenant: Tenant = field(compare=False)
    place: _Place = field(compare=False)
    removed: bool = field(default=False, compare=False)


@dataclass(slots=True)
class _Level(Generic[T]):
    """One level's line of places, and its waiting requests per tenant."""

    places: list[_Place] = field(default_factory=list)  # heap; free places deleted lazily
    waiting: dict[Tenant, list[_Entry[T]]] = field(default_factory=dict)  # heaps, lazily too
    num_waiting: dict[Tenant, int] = field(default_factory=dict)

    def head(self) -> _Place | None:
        while self.places and self.places[0].is_free:
            heapq.heappop(self.places)
        return self.places[0] if self.places else None

    def oldest(self, tenant: Tenant) -> _Entry[T]:
        entries = self.waiting[tenant]
        while entries[0].removed:
            heapq.heappop(entries)
        return entries[0]

    def free_latest_place(self) -> None:
        latest = max((p for p in self.places if not p.is_free), default=None)
        if latest is not None:
            latest.is_free = True

    def num_entries(self) -> int:
        return len(self.places) + sum(len(e) for e in self.waiting.values())

    def compact(self) -> None:
        self.places = [p for p in self.places if not p.is_free]
        heapq.heapify(self.places)
        for tenant, entries in self.waiting.items():
            self.waiting[tenant] = [e for e in entries if not e.removed]
            heapq.heapify(self.waiting[tenant])


class PriorityRequestQueue(Generic[T]):
    """Bounded priority queue with aging, fair share between tenants, and O(1) removal by id
    (lazy deletion)."""

    def __init__(self, max_size: int, aging_s: float):
        if max_size < 1 or aging_s <= 0:
            raise ValueError("max_size must be >= 1 and aging_s > 0")
        self.max_size = max_size
        self.aging_s = aging_s
        self._levels: list[_Level[T]] = [_Level() for _ in Priority]
        self._by_id: dict[str, _Entry[T]] = {}
        self._seq = itertools.count()
        self._served: dict[Tenant, int] = {}  # tokens served per tenant (fair share)
        self._last_turn: dict[Tenant, int] = {}  # when a tenant last had a place; breaks ties

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._by_id

    def push(self, item_id: str, item: T, level: Priority, arrival: float,
             tenant: Tenant = None) -> None:
        """Add a request that arrived at `arrival` (monotonic seconds). Raises QueueFull.

        A request put back after a worker died keeps its first arrival time, so it goes
        back ahead of everything that came after it.
        """
        if len(self._by_id) >= self.max_size:
            raise QueueFull(f"queue is full ({self.max_size} waiting)")
        if item_id in self._by_id:
            raise ValueError(f"{item_id} is already queued")
        line = self._levels[level]
        if tenant not in line.num_waiting and line.num_waiting:
            # Starting to wait: level with the least-served tenant waiting (module docstring).
            self._served[tenant] = min(self._served.get(t, 0) for t in line.num_waiting)
        seq = next(self._seq)
        place = _Place(arrival - level * self.aging_s, seq)
        entry = _Entry(arrival, seq, item_id, item, level, tenant, place)
        heapq.heappush(line.places, place)
        heapq.heappush(line.waiting.setdefault(tenant, []), entry)
        line.num_waiting[tenant] = line.num_waiting.get(tenant, 0) + 1
        self._by_id[item_id] = entry

    def pop(self) -> T | None:
        """The request for the place with the highest effective priority, or None when empty."""
        best = self._best_level()
        return None if best is None else self._take(best)

    def peek(self, level: Priority | None = None) -> T | None:
        """What `pop()` (or `pop_level(level)`) would return, left in the queue."""
        if level is None:
            level = self._best_level()
            if level is None:
                return None
        line = self._levels[level]
        if not line.num_waiting:
            return None
        return line.oldest(self._fair_tenant(line)).item

    def pop_level(self, level: Priority) -> T | None:
        """The next request of exactly `level`, whatever waits ahead of it (urgent slots)."""
        return self._take(level) if self._levels[level].num_waiting else None

    def charge(self, tenant: Tenant, num_tokens: int) -> None:
        """`tenant` was served `num_tokens` more tokens (prompt or completion)."""
        self._served[tenant] = self._served.get(tenant, 0) + num_tokens

    def remove(self, item_id: str) -> T | None:
        """Take a waiting request out (cancelled, timed out); None if it is not waiting."""
        entry = self._by_id.pop(item_id, None)
        if entry is None:
            return None
        entry.removed = True
        line = self._levels[entry.level]
        self._forget(line, entry.tenant)
        if not entry.place.is_free:
            entry.place.is_free = True
        else:
            # Its place was consumed when another tenant's request took a turn ahead of it;
            # that request's later place stands in for it. Giving back the level's latest
            # place never moves the level ahead of other levels.
            line.free_latest_place()
        # Keep the heaps from filling with tombstones under heavy cancellation.
        if sum(lv.num_entries() for lv in self._levels) > 2 * (2 * len(self._by_id)) + 64:
            for lv in self._levels:
                lv.compact()
        return entry.item

    def lengths(self) -> dict[Priority, int]:
        """Waiting requests per requested level (before aging)."""
        return {level: sum(self._levels[level].num_waiting.values()) for level in Priority}

    def _best_level(self) -> Priority | None:
        """The level whose first place has the highest effective priority."""
        best: Priority | None = None
        best_place: _Place | None = None
        for level in Priority:
            place = self._levels[level].head()
            if place is not None and (best_place is None or place < best_place):
                best, best_place = level, place
        return best

    def _fair_tenant(self, line: _Level[T]) -> Tenant:
        """Whose turn it is at `line`: least served, then longest since its last turn."""
        return min(line.num_waiting, key=lambda t: (
            self._served.get(t, 0), self._last_turn.get(t, -1), line.oldest(t)))

    def _take(self, level: Priority) -> T:
        line = self._levels[level]
        place = line.head()
        assert place is not None  # places and waiting requests of a level are as many
        heapq.heappop(line.places)
        place.is_free = True
        tenant = self._fair_tenant(line)
        entry = line.oldest(tenant)
        heapq.heappop(line.waiting[tenant])
        entry.removed = True
        del self._by_id[entry.item_id]
        self._forget(line, tenant)
        self._last_turn[tenant] = next(self._seq)
        return entry.item

    @staticmethod
    def _forget(line: _Level[T], tenant: Tenant) -> None:
        line.num_waiting[tenant] -= 1
        if not line.num_waiting[tenant]:
            del line.num_waiting[tenant]
            del line.waiting[tenant]
