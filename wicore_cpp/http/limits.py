"""What a caller may still ask for: requests and tokens a minute, and a key's token quota.

With API keys on, the limits count per key (a key's own `requests_per_minute` and
`tokens_per_minute`, else the server-wide settings); with keys off, per client address. A
request is admitted while the caller is under both per-minute limits and has quota left; its
tokens (prompt and completion) are counted when it ends, so a request already running is
never cut short by a limit. The state is reported on every response with OpenAI's
`x-ratelimit-*` headers.
"""

from __future__ import annotations

from wicore_cpp.config import Config
from wicore_cpp.errors import QuotaExceeded, RateLimited
from wicore_cpp.http.keys import Caller
from wicore_cpp.http.quota import UsageStore
from wicore_cpp.http.ratelimit import RateLimiter


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


class CallerLimits:
    """Per-minute windows per caller, and the usage store behind the keys' quotas."""

    def __init__(self, config: Config, usage: UsageStore | None, clock=None):
        extra = {} if clock is None else {"clock": clock}
        self._requests = RateLimiter(config.rate_limit_per_minute, **extra)
        self._tokens = RateLimiter(config.rate_limit_tokens_per_minute, **extra)
        self.usage = usage

    def request_limit(self, caller: Caller) -> int:
        own = caller.key.requests_per_minute if caller.key is not None else None
        return self._requests.per_minute if own is None else own

    def token_limit(self, caller: Caller) -> int:
        own = caller.key.tokens_per_minute if caller.key is not None else None
        return self._tokens.per_minute if own is None else own

    def admit(self, caller: Caller) -> None:
        """Count one request, or raise: 429 `insufficient_quota` when the key's quota is
        spent, 429 `rate_limit_exceeded` (with Retry-After) when over a per-minute limit."""
        key = caller.key
        if key is not None and key.token_quota is not None and self.usage is not None:
            if self.usage.used(key.name) >= key.token_quota:
                raise QuotaExceeded(
                    f"the API key '{key.name}' has used its quota of {key.token_quota} tokens")
        who = f"the API key '{key.name}'" if key is not None else "this client"
        token_limit = self.token_limit(caller)
        retry = self._tokens.blocked_for(caller.limit_id, token_limit)
        if retry is not None:
            raise RateLimited(f"{who} is over its limit of {token_limit} tokens a minute",
                              retry_after=retry)
        request_limit = self.request_limit(caller)
        retry = self._requests.check(caller.limit_id, request_limit)
        if retry is not None:
            raise RateLimited(f"{who} is over its limit of {request_limit} requests a minute",
                              retry_after=retry)

    def charge(self, caller: Caller, num_tokens: int) -> None:
        """A request of `caller` ended having cost `num_tokens` (prompt and completion)."""
        self._tokens.add(caller.limit_id, num_tokens)
        if caller.key is not None and self.usage is not None:
            self.usage.add(caller.key.name, num_tokens)

    def headers(self, caller: Caller) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for each limit that is on."""
        out: dict[str, str] = {}
        for kind, limiter, limit in (
            ("requests", self._requests, self.request_limit(caller)),
            ("tokens", self._tokens, self.token_limit(caller)),
        ):
            if limit <= 0:
                continue
            limit, remaining, reset = limiter.status(caller.limit_id, limit)
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = format_duration(reset)
        return out
