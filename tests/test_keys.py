"""The key file, key lookup, priority ceilings, limits' arithmetic and the usage store (pure)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.test_ratelimit import FakeClock
from wicore_cpp.config import ConfigError, load_config
from wicore_cpp.engine.queue import Priority
from wicore_cpp.errors import QuotaExceeded, RateLimited
from wicore_cpp.http.keys import Caller, KeyTable, key_digest
from wicore_cpp.http.limits import CallerLimits, format_duration
from wicore_cpp.http.quota import FILE_NAME, UsageStore

ISSUE_EXAMPLE = {"keys": [{"name": "ci-bot", "key": "sk-ci-bot-secret", "priority": "low",
                           "max_priority": "normal", "requests_per_minute": 60,
                           "tokens_per_minute": 200000, "token_quota": 5000000,
                           "admin": False}]}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_the_issues_example_file_loads(tmp_path):
    table = KeyTable.load(write(tmp_path, ISSUE_EXAMPLE))
    (key,) = table.keys
    assert (key.name, key.priority, key.max_priority) == ("ci-bot", Priority.LOW, Priority.NORMAL)
    assert (key.requests_per_minute, key.tokens_per_minute, key.token_quota) == (
        60, 200000, 5000000)
    assert not key.is_admin
    assert table.find("sk-ci-bot-secret") is key
    assert table.find("sk-ci-bot-secreT") is None and table.find("") is None
    assert "secret" not in repr(key) and "secret" not in repr(table.keys)


def test_only_name_and_a_key_are_required_and_a_digest_may_stand_for_the_key(tmp_path):
    digest = hashlib.sha256(b"sk-hashed-key-1").hexdigest()
    table = KeyTable.load(write(tmp_path, {"keys": [
        {"name": "plain", "key": "sk-plain-key-1"},
        {"name": "hashed", "key_sha256": digest.upper()}]}))
    plain, hashed = table.keys
    # Defaults: normal priority, ceiling = its own priority, no own limits, no quota.
    assert (plain.priority, plain.max_priority) == (Priority.NORMAL, Priority.NORMAL)
    assert plain.requests_per_minute is None and plain.token_quota is None
    assert table.find("sk-hashed-key-1") is hashed
    assert hashed.digest == key_digest("sk-hashed-key-1")


@pytest.mark.parametrize("entry, problem", [
    ({"name": "x"}, "exactly one of 'key' and 'key_sha256'"),
    ({"name": "x", "key": "sk-1234567", "key_sha256": "0" * 64}, "exactly one"),
    ({"name": "x", "key_sha256": "abc"}, "key_sha256"),
    ({"name": "x", "key": "short"}, "key"),
    ({"name": "x", "key": "sk-12345678", "priority": "top"}, "low, normal, high, urgent"),
    ({"name": "x", "key": "sk-12345678", "priority": "high", "max_priority": "low"},
     "above max_priority"),
    ({"name": "x", "key": "sk-12345678", "requests_per_minute": -1}, "requests_per_minute"),
    ({"name": "x", "key": "sk-12345678", "admin": "yes"}, "admin"),
    ({"name": "x", "key": "sk-12345678", "colour": "red"}, "colour"),
    ({"name": "has space", "key": "sk-12345678"}, "name"),
])
def test_bad_entries_are_refused_naming_the_problem_never_the_key(tmp_path, entry, problem):
    with pytest.raises(ConfigError, match="api_keys") as info:
        KeyTable.load(write(tmp_path, {"keys": [entry]}))
    assert problem in str(info.value)
    if "key" in entry:
        assert entry["key"] not in str(info.value)


@pytest.mark.parametrize("data, problem", [
    ("{not json", "cannot read"),
    ({"keys": []}, "no keys"),
    ({"users": []}, "keys"),
    ({"keys": [{"name": "a", "key": "sk-12345678"}, {"name": "a", "key": "sk-87654321"}]},
     "used twice"),
    ({"keys": [{"name": "a", "key": "sk-12345678"}, {"name": "b", "key": "sk-12345678"}]},
     "same key"),
])
def test_bad_files_are_refused(tmp_path, data, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        KeyTable.load(write(tmp_path, data))
    assert "sk-12345678" not in str(info.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        KeyTable.load(tmp_path / "nope.json")


def test_ceilings_and_default_priority(tmp_path):
    (key,) = KeyTable.load(write(tmp_path, ISSUE_EXAMPLE)).keys
    caller = Caller(key, "127.0.0.1")
    assert caller.grant(None) == (Priority.LOW, False)  # the key's own priority
    assert caller.grant(Priority.NORMAL) == (Priority.NORMAL, False)
    assert caller.grant(Priority.URGENT) == (Priority.NORMAL, True)  # capped, and said so
    assert caller.grant(Priority.LOW) == (Priority.LOW, False)
    anonymous = Caller(None, "127.0.0.1")  # keys off: as before
    assert anonymous.grant(None) == (Priority.NORMAL, False)
    assert anonymous.grant(Priority.URGENT) == (Priority.URGENT, False)
    assert caller.tenant == "ci-bot" and anonymous.tenant is None
    assert caller.limit_id != anonymous.limit_id


@pytest.mark.parametrize("seconds, text", [
    (0.0, "0ms"), (0.02, "20ms"), (0.999, "999ms"), (1.0, "1s"), (1.5, "1.5s"), (59.25, "59.25s"),
    (60.0, "1m0s"), (360.0, "6m0s"), (3599.6, "60m0s"),
])
def test_reset_durations_in_openais_format(seconds, text):
    assert format_duration(seconds) == text


def limits_for(tmp_path, clock, usage=None, **config):
    return CallerLimits(load_config(environ={}, flags=config), usage, clock=clock)


def test_limits_per_key_fall_back_to_the_server_wide_ones(tmp_path):
    clock = FakeClock()
    table = KeyTable.load(write(tmp_path, {"keys": [
        {"name": "own", "key": "sk-own-12345", "requests_per_minute": 2,
         "tokens_per_minute": 100},
        {"name": "default", "key": "sk-default-1"}]}))
    limits = limits_for(tmp_path, clock, rate_limit_per_minute=5,
                        rate_limit_tokens_per_minute=50)
    own, default = (Caller(k, "1.2.3.4") for k in table.keys)
    assert (limits.request_limit(own), limits.token_limit(own)) == (2, 100)
    assert (limits.request_limit(default), limits.token_limit(default)) == (5, 50)
    limits.admit(own)
    limits.admit(own)
    with pytest.raises(RateLimited, match="2 requests a minute"):
        limits.admit(own)
    limits.admit(default)  # its own window
    limits.charge(default, 60)
    with pytest.raises(RateLimited, match="50 tokens a minute") as info:
        limits.admit(default)
    assert info.value.retry_after == pytest.approx(60.0)
    clock.advance(60.0)
    limits.admit(default)


def test_headers_count_down_and_reset(tmp_path):
    clock = FakeClock()
    limits = limits_for(tmp_path, clock, rate_limit_per_minute=3,
                        rate_limit_tokens_per_minute=1000)
    caller = Caller(None, "10.0.0.1")
    limits.admit(caller)
    limits.charge(caller, 120)
    clock.advance(15)
    limits.admit(caller)
    h = limits.headers(caller)
    assert h == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",  # until the newest request leaves the window
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "880",
        "x-ratelimit-reset-tokens": "45s",
    }
    off = limits_for(tmp_path, clock, rate_limit_per_minute=0)
    assert off.headers(caller) == {}


def test_spent_quota_is_insufficient_quota(tmp_path):
    table = KeyTable.load(write(tmp_path, {"keys": [
        {"name": "q", "key": "sk-quota-123", "token_quota": 100}]}))
    usage = UsageStore(tmp_path / "data")
    limits = limits_for(tmp_path, FakeClock(), usage, rate_limit_per_minute=0)
    caller = Caller(table.keys[0], "x")
    limits.admit(caller)
    limits.charge(caller, 99)
    limits.admit(caller)  # 99 < 100: admitted (its tokens count when it ends)
    limits.charge(caller, 5)
    with pytest.raises(QuotaExceeded) as info:
        limits.admit(caller)
    assert info.value.to_dict()["error"]["code"] == "insufficient_quota"
    assert info.value.status == 429 and info.value.retry_after is None


async def test_usage_store_writes_every_second_and_reads_back(tmp_path):
    store = UsageStore(tmp_path / "data")
    store.start()
    store.add("a", 10)
    store.add("a", 5)
    store.add("b", 1)
    db = tmp_path / "data" / FILE_NAME
    for _ in range(100):  # written by the background writer, not by close()
        await asyncio.sleep(0.05)
        with sqlite3.connect(db) as conn:
            rows = dict(conn.execute("SELECT key_name, tokens FROM key_usage"))
        if rows == {"a": 15, "b": 1}:
            break
    assert rows == {"a": 15, "b": 1}
    store.add("b", 2)
    await store.close()
    again = UsageStore(tmp_path / "data")
    assert (again.used("a"), again.used("b"), again.used("c")) == (15, 3, 0)
    await again.close()


def test_usage_store_in_an_unusable_place_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="data_dir"):
        UsageStore(blocker / "data")
