"""API keys: the key file, finding the key a request presents, and what a key may ask for.

The file (`api_keys` setting) is JSON: `{"keys": [{"name": "ci-bot", "key": "sk-...",
"priority": "low", "max_priority": "normal", "requests_per_minute": 60,
"tokens_per_minute": 200000, "token_quota": 5000000, "admin": false}]}`. Every field but
`name` and one of `key` / `key_sha256` is optional; `key_sha256` (the hex SHA-256 of the key)
lets the file hold no secret at all. Only the digests are kept in memory.

A request presents its key as `Authorization: Bearer KEY` (what the `openai` clients send) or
`x-api-key: KEY`. The presented key is hashed and compared with every known digest in
constant time, so neither the comparison nor the position of a match leaks timing. A key's
name is what logs, metrics and errors show; the key itself never appears anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wicore_cpp.config import ConfigError
from wicore_cpp.engine.client import Priority
from wicore_cpp.errors import InvalidApiKey

# Paths answered without a key; monitoring paths need one only with admin_only_monitoring.
OPEN_PATHS = frozenset({"/health", "/"})
MONITORING_PATHS = frozenset({"/status", "/metrics"})


def needs_key(path: str, admin_only_monitoring: bool) -> bool:
    """Whether a request to `path` must present an API key (when keys are on)."""
    return path not in OPEN_PATHS and (path not in MONITORING_PATHS or admin_only_monitoring)



class _KeyEntry(BaseModel):
    """One entry of the key file, validated once at start-up."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@:/+-]+$")
    key: str | None = Field(None, min_length=8)
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    priority: str = "normal"
    max_priority: str | None = None
    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    token_quota: int | None = Field(None, ge=0)
    admin: bool = False

    @model_validator(mode="after")
    def _check(self) -> _KeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' and 'key_sha256'")
        for value in (self.priority, self.max_priority):
            if value is not None:
                Priority.parse(value)  # ValueError names the allowed levels
        if Priority.parse(self.priority) > Priority.parse(self.max_priority or self.priority):
            raise ValueError("priority is above max_priority")
        return self


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    keys: list[_KeyEntry]


@dataclass(slots=True, frozen=True)
class ApiKey:
    """A key as the server keeps it: its name, the digest of the secret, and its terms.

    `priority` is what its requests get when they ask for none; `max_priority` is its
    ceiling (by default its own priority: a key asks above it only when the file says so).
    Limits left out fall back to the server-wide ones; a quota left out is no quota.
    """

    name: str
    digest: bytes
    priority: Priority = Priority.NORMAL
    max_priority: Priority = Priority.NORMAL
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_quota: int | None = None
    is_admin: bool = False

    def __repr__(self) -> str:  # never show the digest either
        return f"ApiKey({self.name!r})"


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyTable:
    """The known keys; finds the one a request presents."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = list(keys)
        self.by_name = {k.name: k for k in keys}

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose digest matches, comparing against every key without stopping early."""
        digest = key_digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    @classmethod
    def load(cls, path: str | Path) -> KeyTable:
        """Read and check the key file. Raises ConfigError naming the problem (never a key)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"api_keys: cannot read {path}: {exc}") from None
        try:
            parsed = _KeyFile.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "file"
            # pydantic's message never holds the input value; `input` is left out on purpose.
            raise ConfigError(f"api_keys: {path}: {where}: {err['msg']}") from None
        keys: list[ApiKey] = []
        for entry in parsed.keys:
            priority = Priority.parse(entry.priority)
            keys.append(ApiKey(
                name=entry.name,
                digest=(key_digest(entry.key) if entry.key is not None
                        else bytes.fromhex(entry.key_sha256 or "")),
                priority=priority,
                max_priority=(Priority.parse(entry.max_priority) if entry.max_priority
                              else priority),
                requests_per_minute=entry.requests_per_minute,
                tokens_per_minute=entry.tokens_per_minute,
                token_quota=entry.token_quota,
                is_admin=entry.admin,
            ))
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"api_keys: {path}: the name {dup!r} is used twice")
        digests = [k.digest for k in keys]
        if len(set(digests)) != len(digests):
            raise ConfigError(f"api_keys: {path}: two entries have the same key")
        if not keys:
            raise ConfigError(f"api_keys: {path}: no keys (leave api_keys unset to need none)")
        return cls(keys)


def presented_key(request: web.Request) -> str | None:
    """The key from `Authorization: Bearer KEY` or `x-api-key: KEY`; None if neither is sent.

    Raises InvalidApiKey for an Authorization header of another scheme (Basic, ...).
    """
    auth = request.headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise InvalidApiKey("the Authorization header must be 'Bearer <API key>'")
        return value.strip()
    value = request.headers.get("x-api-key")
    return value.strip() if value is not None and value.strip() else None


@dataclass(slots=True, frozen=True)
class Caller:
    """Who is asking: an API key, or (keys off) a client address. The limits apply to it."""

    key: ApiKey | None
    address: str

    @property
    def tenant(self) -> str | None:
        """The key's name: whose fair share, figures and log lines; None with keys off."""
        return self.key.name if self.key is not None else None

    @property
    def limit_id(self) -> str:
        """What the per-minute limits count against: the key, else the client address."""
        return "key:" + self.key.name if self.key is not None else "addr:" + self.address

    def grant(self, asked: Priority | None) -> tuple[Priority, bool]:
        """The priority to run at, and whether `asked` was above the key's ceiling."""
        if self.key is None:
            return (Priority.NORMAL if asked is None else asked), False
        if asked is None:
            return self.key.priority, False
        if asked > self.key.max_priority:
            return self.key.max_priority, True
        return asked, False
