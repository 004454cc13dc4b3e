"""RateLimiter with a fake clock, and the request helpers resolve_priority / new_request_id."""

from __future__ import annotations

import re

import pytest

from wicore_cpp.engine.queue import Priority
from wicore_cpp.engine.request import new_request_id
from wicore_cpp.errors import InvalidRequest
from wicore_cpp.http.lifecycle import resolve_priority
from wicore_cpp.http.ratelimit import WINDOW_S, RateLimiter


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_window_is_one_minute():
    assert WINDOW_S == 60.0


def test_allows_per_minute_then_retry_after(clock):
    limiter = RateLimiter(3, clock=clock)
    assert limiter.check("a") is None  # t = 1000
    clock.advance(10)
    assert limiter.check("a") is None  # t = 1010
    clock.advance(5)
    assert limiter.check("a") is None  # t = 1015
    clock.advance(5)  # t = 1020: the oldest hit (1000) leaves the window at 1060
    retry = limiter.check("a")
    assert retry == pytest.approx(40.0)
    clock.advance(15)  # t = 1035: rejected requests are not counted, still the same oldest hit
    assert limiter.check("a") == pytest.approx(25.0)


def test_retry_after_is_exact_the_client_may_retry_then(clock):
    limiter = RateLimiter(2, clock=clock)
    assert limiter.check("a") is None
    clock.advance(1)
    assert limiter.check("a") is None
    retry = limiter.check("a")
    assert retry == 59.0
    clock.advance(retry - 0.5)
    assert limiter.check("a") is not None  # a little too early
    clock.advance(0.5)
    assert limiter.check("a") is None  # exactly when told


def test_burst_at_one_instant(clock):
    limiter = RateLimiter(5, clock=clock)
    assert [limiter.check("a") for _ in range(5)] == [None] * 5
    for _ in range(3):
        assert limiter.check("a") == pytest.approx(60.0)


def test_clients_are_independent(clock):
    limiter = RateLimiter(2, clock=clock)
    assert limiter.check("10.0.0.1") is None
    assert limiter.check("10.0.0.1") is None
    assert limiter.check("10.0.0.1") is not None
    assert limiter.check("10.0.0.2") is None
    assert limiter.check("10.0.0.2") is None
    assert limiter.check("10.0.0.2") is not None
    assert limiter.check("::1") is None


def test_zero_per_minute_disables(clock):
    limiter = RateLimiter(0, clock=clock)
    assert all(limiter.check("a") is None for _ in range(10_000))


def test_window_slides(clock):
    limiter = RateLimiter(3, clock=clock)
    for _ in range(3):
        assert limiter.check("a") is None
        clock.advance(20)  # hits at 1000, 1020, 1040; now 1060
    # 1000 has just left the window (it is exactly 60 s old): one slot.
    assert limiter.check("a") is None  # hit at 1060
    assert limiter.check("a") == pytest.approx(20.0)  # 1020 leaves at 1080
    clock.advance(20)
    assert limiter.check("a") is None  # 1020 left; hit at 1080
    assert limiter.check("a") is not None
    clock.advance(60)  # everything has left
    assert [limiter.check("a") for _ in range(3)] == [None] * 3
    assert limiter.check("a") is not None


def test_many_clients_do_not_break_limits(clock):
    limiter = RateLimiter(1, clock=clock)
    assert limiter.check("busy") is None
    for i in range(10_050):  # past the idle-client clean-up threshold
        assert limiter.check(f"c{i}") is None
    assert limiter.check("busy") is not None  # still limited after the clean-up


# -- resolve_priority ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, header, expected",
    [
        (None, None, Priority.NORMAL),
        ("high", None, Priority.HIGH),
        (None, "urgent", Priority.URGENT),
        (None, "LOW", Priority.LOW),
        ("low", "urgent", Priority.LOW),  # body wins over header
    ],
)
def test_resolve_priority(body, header, expected):
    assert resolve_priority(body, header) is expected


@pytest.mark.parametrize(
    "body, header, param",
    [("critical", None, "priority"), ("", "high", "priority"), (None, "max", "X-Priority"),
     # A bad header is refused also when the body's priority decides: nothing sent is
     # ignored unchecked (and the OpenAPI document's header pattern holds).
     ("urgent", "bogus", "X-Priority")],
)
def test_resolve_priority_bad_value(body, header, param):
    with pytest.raises(InvalidRequest) as info:
        resolve_priority(body, header)
    assert info.value.param == param
    assert info.value.status == 400
    assert "low, normal, high, urgent" in info.value.message


# -- new_request_id --------------------------------------------------------------------------


def test_new_request_id_format():
    request_id = new_request_id()
    assert re.fullmatch(r"req_\d{13}[0-9a-f]{12}", request_id), request_id


def test_new_request_id_unique():
    ids = [new_request_id() for _ in range(10_000)]
    assert all(i.startswith("req_") for i in ids)
    assert len(set(ids)) == len(ids)


def test_token_window_counts_amounts(clock):
    limiter = RateLimiter(100, clock=clock)
    assert limiter.blocked_for("k") is None
    limiter.add("k", 70)
    clock.advance(10)
    limiter.add("k", 40)
    # 110 used: blocked until the first 70 leave the window (40 < 100 then).
    assert limiter.blocked_for("k") == pytest.approx(50.0)
    assert limiter.status("k") == (100, 0, pytest.approx(60.0))
    clock.advance(50)
    assert limiter.blocked_for("k") is None
    assert limiter.status("k") == (100, 60, pytest.approx(10.0))
    assert limiter.blocked_for("k", limit=0) is None  # 0: no limit


def test_per_call_limit_overrides_the_default(clock):
    limiter = RateLimiter(1, clock=clock)
    assert limiter.check("a", limit=3) is None
    assert limiter.check("a", limit=3) is None
    assert limiter.check("a") is not None  # the default of 1 is already used up
    assert limiter.check("a", limit=3) is None
    assert limiter.check("a", limit=3) is not None
