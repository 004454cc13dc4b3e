"""What the HTTP layer shares between handlers, under one typed application key."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from wicore_cpp.config import Config
from wicore_cpp.engine.scheduler import Scheduler
from wicore_cpp.http.ratelimit import RateLimiter
from wicore_cpp.http.serving import ChatService


@dataclass(slots=True)
class AppState:
    config: Config
    scheduler: Scheduler
    chat: ChatService
    rate_limiter: RateLimiter
    model_created: dict[str, int] = field(default_factory=dict)  # model id -> unix time


STATE = web.AppKey("wicore_state", AppState)
