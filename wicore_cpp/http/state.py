"""What the HTTP layer shares: the app's state under one typed application key, and what a
request carries from one layer to the next under typed request keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from wicore_cpp.config import Config
from wicore_cpp.engine.client import EngineClient, Generation
from wicore_cpp.http.keys import Caller, KeyTable
from wicore_cpp.http.limits import CallerLimits

if TYPE_CHECKING:
    from wicore_cpp.http.metrics import Metrics


@dataclass(slots=True)
class AppState:
    config: Config
    engine: EngineClient
    keys: KeyTable | None  # None: API keys are off
    limits: CallerLimits
    metrics: Metrics


STATE = web.AppKey("wicore_state", AppState)

# Per request: who is asking (set by the API-key middleware), its generation once the engine
# accepted it, and the priority it got when it asked above its key's ceiling.
CALLER = web.RequestKey("wicore_caller", Caller)
GENERATION = web.RequestKey("wicore_generation", Generation)
PRIORITY_CEILING = web.RequestKey("wicore_priority_ceiling", str)
