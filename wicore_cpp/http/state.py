"""What the HTTP layer shares between handlers, under one typed application key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from wicore_cpp.config import Config
from wicore_cpp.engine.client import EngineClient
from wicore_cpp.http.ratelimit import RateLimiter


@dataclass(slots=True)
class AppState:
    config: Config
    engine: EngineClient
    rate_limiter: RateLimiter


STATE = web.AppKey("wicore_state", AppState)
