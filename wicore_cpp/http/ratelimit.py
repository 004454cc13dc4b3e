"""Requests-per-minute limit per client address (sliding 60 s window)."""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 60.0


class RateLimiter:
    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}

    def check(self, client: str) -> float | None:
        """Record a request; None if allowed, else seconds until the client may retry."""
        if self.per_minute <= 0:
            return None
        now = self._clock()
        hits = self._hits.setdefault(client, deque())
        while hits and hits[0] <= now - WINDOW_S:
            hits.popleft()
        if len(hits) >= self.per_minute:
            return max(hits[0] + WINDOW_S - now, 0.001)
        hits.append(now)
        if len(self._hits) > 10_000:  # forget idle clients so the table cannot grow forever
            self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - WINDOW_S}
        return None
