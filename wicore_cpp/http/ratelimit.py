"""Sliding 60 s windows per client: requests (each counts 1) or tokens (each counts its amount).

A client is whatever the caller names: an API key, or a client address when keys are off.
"""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 60.0
MAX_IDLE_CLIENTS = 10_000  # past this, clients with nothing in their window are forgotten


class RateLimiter:
    """Counts what each client did in the last minute against a per-minute limit.

    `per_minute` is the default limit; a call may pass another (an API key's own). A limit
    of 0 is no limit.
    """

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._hits: dict[str, deque[tuple[float, int]]] = {}
        self._sums: dict[str, int] = {}

    def check(self, client: str, limit: int | None = None) -> float | None:
        """Record one request; None if allowed, else seconds until the client may retry."""
        limit = self.per_minute if limit is None else limit
        if limit <= 0:
            return None
        now = self._clock()
        retry = self._blocked_for(client, limit, now)
        if retry is None:
            self._add(client, 1, now)
        return retry

    def blocked_for(self, client: str, limit: int | None = None) -> float | None:
        """Seconds until the client's use in the window drops below `limit`; None if it is."""
        limit = self.per_minute if limit is None else limit
        if limit <= 0:
            return None
        return self._blocked_for(client, limit, self._clock())

    def add(self, client: str, amount: int) -> None:
        """Record `amount` (tokens used), allowed or not: it was spent already."""
        if amount > 0:
            self._add(client, amount, self._clock())

    def status(self, client: str, limit: int | None = None) -> tuple[int, int, float]:
        """(limit, remaining, seconds until the window is empty again) for the client."""
        limit = self.per_minute if limit is None else limit
        now = self._clock()
        hits = self._window(client, now)
        used = self._sums.get(client, 0)
        reset = hits[-1][0] + WINDOW_S - now if hits else 0.0
        return limit, max(0, limit - used), max(0.0, reset)

    def _window(self, client: str, now: float) -> deque[tuple[float, int]]:
        hits = self._hits.get(client)
        if hits is None:
            return deque()
        while hits and hits[0][0] <= now - WINDOW_S:
            self._sums[client] -= hits.popleft()[1]
        return hits

    def _blocked_for(self, client: str, limit: int, now: float) -> float | None:
        hits = self._window(client, now)
        used = self._sums.get(client, 0)
        if used < limit:
            return None
        # Wait until enough of the oldest use leaves the window.
        for at, amount in hits:
            used -= amount
            if used < limit:
                return max(at + WINDOW_S - now, 0.001)
        return 0.001  # not reached: the loop empties the window

    def _add(self, client: str, amount: int, now: float) -> None:
        self._hits.setdefault(client, deque()).append((now, amount))
        self._sums[client] = self._sums.get(client, 0) + amount
        if len(self._hits) > MAX_IDLE_CLIENTS:  # so the table cannot grow forever
            for name in [k for k, v in self._hits.items() if not self._window(k, now)]:
                del self._hits[name]
                del self._sums[name]
