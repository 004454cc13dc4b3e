"""PriorityRequestQueue: levels, FIFO within a level, aging, bounds and cancellation (pure)."""

from __future__ import annotations

import random

import pytest

from wicore_cpp.engine.queue import Priority, PriorityRequestQueue, QueueFull

AGING_S = 5.0


def make_queue(max_size: int = 100, aging_s: float = AGING_S) -> PriorityRequestQueue[str]:
    return PriorityRequestQueue(max_size=max_size, aging_s=aging_s)


def drain(queue: PriorityRequestQueue[str]) -> list[str]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def push(queue: PriorityRequestQueue[str], item_id: str, level: Priority, arrival: float) -> None:
    """Items are their own ids, so a pop says which request came out."""
    queue.push(item_id, item_id, level, arrival)


# -- ordering --------------------------------------------------------------------------------


def test_levels_order_urgent_high_normal_low():
    q = make_queue()
    # Pushed lowest first and all at the same instant: only the level decides.
    for level in (Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.URGENT):
        push(q, level.name.lower(), level, arrival=100.0)
    assert drain(q) == ["urgent", "high", "normal", "low"]


def test_fifo_within_a_level_by_arrival():
    q = make_queue()
    for i in range(10):
        push(q, f"n{i}", Priority.NORMAL, arrival=100.0 + i * 0.01)
    assert drain(q) == [f"n{i}" for i in range(10)]


def test_fifo_within_a_level_when_arrivals_tie():
    q = make_queue()
    for i in range(10):
        push(q, f"n{i}", Priority.HIGH, arrival=100.0)
    assert drain(q) == [f"n{i}" for i in range(10)]


def test_higher_level_arriving_later_still_goes_first_within_aging_window():
    q = make_queue()
    push(q, "normal", Priority.NORMAL, arrival=100.0)
    push(q, "high", Priority.HIGH, arrival=100.0 + AGING_S * 0.9)
    assert drain(q) == ["high", "normal"]


def test_aging_low_that_waited_over_three_aging_periods_beats_later_urgent():
    q = make_queue()
    push(q, "low", Priority.LOW, arrival=0.0)
    push(q, "urgent", Priority.URGENT, arrival=3 * AGING_S + 0.001)
    assert drain(q) == ["low", "urgent"]


def test_aging_urgent_arriving_within_three_aging_periods_beats_low():
    q = make_queue()
    push(q, "low", Priority.LOW, arrival=0.0)
    push(q, "urgent", Priority.URGENT, arrival=3 * AGING_S - 0.001)
    assert drain(q) == ["urgent", "low"]


def test_aging_one_level_per_aging_period():
    q = make_queue()
    # normal waited 2 aging periods longer than high: effectively one level above it.
    push(q, "normal", Priority.NORMAL, arrival=0.0)
    push(q, "high", Priority.HIGH, arrival=2 * AGING_S)
    # a normal that waited half a period longer than the high one is not enough to overtake it.
    push(q, "normal-late", Priority.NORMAL, arrival=2 * AGING_S - AGING_S / 2)
    assert drain(q) == ["normal", "high", "normal-late"]


def test_requeued_item_with_original_arrival_goes_ahead_of_later_ones():
    q = make_queue()
    push(q, "a", Priority.NORMAL, arrival=10.0)
    push(q, "b", Priority.NORMAL, arrival=11.0)
    assert q.pop() == "a"  # a worker takes "a" ...
    push(q, "c", Priority.NORMAL, arrival=12.0)
    push(q, "a", Priority.NORMAL, arrival=10.0)  # ... dies, and "a" is put back
    assert drain(q) == ["a", "b", "c"]


def test_pop_on_empty_returns_none():
    q = make_queue()
    assert q.pop() is None
    push(q, "x", Priority.LOW, arrival=0.0)
    assert q.pop() == "x"
    assert q.pop() is None
    assert len(q) == 0


# -- bounds ----------------------------------------------------------------------------------


def test_queue_full_at_max_size():
    q = make_queue(max_size=3)
    for i in range(3):
        push(q, f"r{i}", Priority.NORMAL, arrival=float(i))
    with pytest.raises(QueueFull):
        push(q, "r3", Priority.URGENT, arrival=3.0)
    assert len(q) == 3
    assert "r3" not in q
    assert q.lengths()[Priority.URGENT] == 0


def test_pop_frees_a_slot():
    q = make_queue(max_size=2)
    push(q, "a", Priority.NORMAL, arrival=0.0)
    push(q, "b", Priority.NORMAL, arrival=1.0)
    assert q.pop() == "a"
    push(q, "c", Priority.NORMAL, arrival=2.0)
    assert drain(q) == ["b", "c"]


def test_remove_frees_a_slot():
    q = make_queue(max_size=2)
    push(q, "a", Priority.NORMAL, arrival=0.0)
    push(q, "b", Priority.NORMAL, arrival=1.0)
    assert q.remove("a") == "a"
    push(q, "c", Priority.NORMAL, arrival=2.0)
    with pytest.raises(QueueFull):
        push(q, "d", Priority.NORMAL, arrival=3.0)
    assert drain(q) == ["b", "c"]


@pytest.mark.parametrize("max_size, aging_s", [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_constructor_rejects_bad_bounds(max_size, aging_s):
    with pytest.raises(ValueError):
        PriorityRequestQueue(max_size=max_size, aging_s=aging_s)


def test_duplicate_id_rejected():
    q = make_queue()
    push(q, "a", Priority.NORMAL, arrival=0.0)
    with pytest.raises(ValueError, match="already queued"):
        q.push("a", "other", Priority.URGENT, arrival=1.0)
    assert len(q) == 1
    assert q.lengths()[Priority.URGENT] == 0
    assert drain(q) == ["a"]


# -- removal / cancellation ------------------------------------------------------------------


def test_removed_items_never_pop():
    q = make_queue()
    for i in range(6):
        push(q, f"r{i}", Priority.NORMAL, arrival=float(i))
    assert q.remove("r1") == "r1"
    assert q.remove("r4") == "r4"
    assert "r1" not in q and "r4" not in q
    assert len(q) == 4
    assert drain(q) == ["r0", "r2", "r3", "r5"]


def test_remove_unknown_or_already_taken_returns_none():
    q = make_queue()
    assert q.remove("nope") is None
    push(q, "a", Priority.NORMAL, arrival=0.0)
    assert q.pop() == "a"
    assert q.remove("a") is None  # already handed to a worker
    push(q, "b", Priority.NORMAL, arrival=1.0)
    assert q.remove("b") == "b"
    assert q.remove("b") is None  # removing twice
    assert len(q) == 0
    assert all(n == 0 for n in q.lengths().values())


def test_lengths_per_level_track_push_pop_remove():
    q = make_queue()
    assert list(q.lengths()) == [Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.URGENT]
    push(q, "l1", Priority.LOW, arrival=0.0)
    push(q, "l2", Priority.LOW, arrival=1.0)
    push(q, "n1", Priority.NORMAL, arrival=2.0)
    push(q, "u1", Priority.URGENT, arrival=3.0)
    assert list(q.lengths().values()) == [2, 1, 0, 1]  # low, normal, high, urgent
    q.remove("l1")
    assert q.lengths()[Priority.LOW] == 1
    assert q.pop() == "u1"
    assert list(q.lengths().values()) == [1, 1, 0, 0]
    q.remove("missing")
    assert sum(q.lengths().values()) == len(q) == 2


def test_lengths_count_requested_level_not_aged_level():
    q = make_queue()
    push(q, "old-low", Priority.LOW, arrival=0.0)
    push(q, "urgent", Priority.URGENT, arrival=100 * AGING_S)
    # "old-low" is effectively far above urgent now, but is still reported as low.
    assert q.lengths()[Priority.LOW] == 1
    assert q.lengths()[Priority.URGENT] == 1
    assert q.pop() == "old-low"


def test_an_id_can_be_queued_again_after_removal():
    q = make_queue()
    push(q, "a", Priority.LOW, arrival=0.0)
    push(q, "b", Priority.NORMAL, arrival=1.0)
    q.remove("a")
    push(q, "a", Priority.URGENT, arrival=2.0)
    assert q.lengths()[Priority.LOW] == 0
    assert q.lengths()[Priority.URGENT] == 1
    assert drain(q) == ["a", "b"]


def test_heavy_cancellation_compaction_keeps_order_and_bounds_heap():
    q = make_queue(max_size=10_000)
    levels = list(Priority)
    rng = random.Random(7)
    expected_keys = {}
    for i in range(2_000):
        level = rng.choice(levels)
        arrival = i * 0.01
        push(q, f"r{i}", level, arrival)
        expected_keys[f"r{i}"] = (arrival - level * AGING_S, i)
    # Cancel 95%: many compactions happen along the way.
    survivors = {f"r{i}" for i in range(0, 2_000, 20)}
    for i in rng.sample(range(2_000), 2_000):
        if f"r{i}" not in survivors:
            assert q.remove(f"r{i}") == f"r{i}"
    assert len(q) == len(survivors)
    # Tombstones are compacted away, so the heaps stay proportional to what is waiting.
    assert sum(level.num_entries() for level in q._levels) <= 4 * len(q) + 64 + 2
    assert drain(q) == sorted(survivors, key=expected_keys.__getitem__)


# -- Priority.parse ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, level",
    [("low", Priority.LOW), ("NORMAL", Priority.NORMAL), ("High", Priority.HIGH),
     ("uRgEnT", Priority.URGENT), ("URGENT", Priority.URGENT)],
)
def test_priority_parse_any_case(text, level):
    assert Priority.parse(text) is level


@pytest.mark.parametrize("text", ["", "medium", "critical", "0", "3", "lowest", None, 1,
                                  " low", "urgent ", " urgent ", "high\n", "\tnormal"])
def test_priority_parse_rejects_others(text):
    """Any letter case is one of the four names; surrounding spaces are not (a header's are
    trimmed by HTTP before it gets here)."""
    with pytest.raises(ValueError, match="low, normal, high, urgent"):
        Priority.parse(text)


def test_priority_parse_error_quotes_a_long_value_cut_short():
    with pytest.raises(ValueError) as info:
        Priority.parse("x" * 8000)
    message = str(info.value)
    assert len(message) < 200
    assert "8000 characters" in message


# -- property test against a reference model -------------------------------------------------


class ReferenceQueue:
    """The specification: order by (arrival - level * aging_s, insertion order)."""

    def __init__(self, max_size: int, aging_s: float):
        self.max_size = max_size
        self.aging_s = aging_s
        self.items: dict[str, tuple[float, int, Priority]] = {}
        self.next_seq = 0

    def push(self, item_id: str, level: Priority, arrival: float) -> bool:
        if len(self.items) >= self.max_size:
            return False
        self.items[item_id] = (arrival - level * self.aging_s, self.next_seq, level)
        self.next_seq += 1
        return True

    def pop(self) -> str | None:
        if not self.items:
            return None
        best = min(self.items, key=lambda k: self.items[k][:2])
        del self.items[best]
        return best

    def remove(self, item_id: str) -> str | None:
        return item_id if self.items.pop(item_id, None) is not None else None

    def lengths(self) -> dict[Priority, int]:
        out = {level: 0 for level in Priority}
        for _, _, level in self.items.values():
            out[level] += 1
        return out


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_match_reference(seed):
    rng = random.Random(seed)
    max_size = rng.choice([1, 3, 8, 50, 200])
    aging_s = rng.choice([0.5, 1.0, 5.0])
    q: PriorityRequestQueue[str] = PriorityRequestQueue(max_size, aging_s)
    ref = ReferenceQueue(max_size, aging_s)
    now = 0.0
    next_id = 0
    known: list[str] = []  # every id ever pushed, live or not
    for _ in range(400):
        now += rng.choice([0.0, 0.25, 1.0, 3.0])
        op = rng.random()
        if op < 0.45:
            item_id = f"r{next_id}"
            next_id += 1
            level = rng.choice(list(Priority))
            # Sometimes a requeue-like push with an arrival in the past.
            arrival = now - rng.choice([0.0, 0.0, 0.0, 2.0, 20.0])
            if ref.push(item_id, level, arrival):
                push(q, item_id, level, arrival)
                known.append(item_id)
            else:
                with pytest.raises(QueueFull):
                    push(q, item_id, level, arrival)
        elif op < 0.75:
            assert q.pop() == ref.pop()
        else:
            victim = rng.choice(known) if known and rng.random() < 0.9 else "never-pushed"
            assert q.remove(victim) == ref.remove(victim)
        assert len(q) == len(ref.items)
        assert q.lengths() == ref.lengths()
    for item_id in known[-20:]:
        assert (item_id in q) == (item_id in ref.items)
    while ref.items:
        assert q.pop() == ref.pop()
    assert q.pop() is None


def test_pop_level_takes_the_oldest_of_that_level_past_aged_requests():
    q = PriorityRequestQueue(max_size=10, aging_s=1.0)
    q.push("old-low", "old-low", Priority.LOW, arrival=0.0)  # aged far past urgent
    q.push("u1", "u1", Priority.URGENT, arrival=50.0)
    q.push("u2", "u2", Priority.URGENT, arrival=51.0)
    assert q.pop_level(Priority.URGENT) == "u1"
    assert q.lengths()[Priority.URGENT] == 1 and len(q) == 2
    assert q.pop() == "old-low"  # the head itself is unchanged
    assert q.pop_level(Priority.HIGH) is None
    assert q.pop_level(Priority.URGENT) == "u2" and len(q) == 0


# -- fair share between tenants ---------------------------------------------------------------


def tpush(q, item_id: str, tenant: str, level: Priority = Priority.NORMAL,
          arrival: float = 100.0) -> None:
    q.push(item_id, item_id, level, arrival, tenant)


def test_one_tenant_flooding_a_level_does_not_starve_another():
    q = make_queue()
    for i in range(10):
        tpush(q, f"a{i}", "flood", arrival=100.0 + i * 0.01)
    for i in range(2):  # two of the flood's requests are served (prompt + completion)
        assert q.pop() == f"a{i}"
        q.charge("flood", 20)
    tpush(q, "b0", "polite", arrival=100.5)
    # The polite tenant has had no turn: its request takes the level's next place.
    assert q.pop() == "b0"
    assert drain(q) == [f"a{i}" for i in range(2, 10)]  # the flood keeps its own order


def test_turns_are_by_tokens_served_not_by_requests():
    q = make_queue()
    for i in range(3):
        tpush(q, f"long{i}", "long", arrival=100.0 + i * 0.01)
        tpush(q, f"short{i}", "short", arrival=100.0 + i * 0.01 + 0.001)
    order = []
    cost = {"long": 100, "short": 10}  # tokens each request of the tenant turns out to cost
    while (item := q.pop()) is not None:
        order.append(item)
        q.charge(item.rstrip("0123456789"), cost[item.rstrip("0123456789")])
    # long0 costs 100 tokens, so the short tenant gets turns until it has used as many.
    assert order == ["long0", "short0", "short1", "short2", "long1", "long2"]


def test_time_away_is_neither_credit_nor_debt():
    q = make_queue()
    tpush(q, "a0", "a")
    assert q.pop() == "a0"
    q.charge("a", 1000)  # "a" alone: nobody else wanted anything meanwhile
    for i in range(5):
        tpush(q, f"b{i}", "b", arrival=101.0 + i * 0.01)
    assert q.pop() == "b0"
    q.charge("b", 10)
    tpush(q, "a1", "a", arrival=102.0)
    # "a" is set level with "b" (10 tokens), not 990 tokens behind it; the tie goes to the
    # tenant whose last turn is longer ago.
    assert q.pop() == "a1"
    assert drain(q) == [f"b{i}" for i in range(1, 5)]
    # ... and a tenant that comes back to a waiting flood gets no credit for its absence:
    for i in range(3):
        tpush(q, f"f{i}", "flood", arrival=200.0 + i)
    assert q.pop() == "f0"
    q.charge("flood", 5)
    tpush(q, "idle0", "idle", arrival=201.5)
    tpush(q, "idle1", "idle", arrival=201.6)
    assert q.pop() == "idle0"  # level with the flood, and its last turn is longer ago
    q.charge("idle", 500)
    assert q.pop() == "f1"  # now "idle" has been served more


def test_fair_share_keeps_each_levels_places_so_aging_still_bounds_other_levels():
    q = PriorityRequestQueue(max_size=100, aging_s=1.0)
    tpush(q, "low-a", "a", Priority.LOW, arrival=0.0)  # the low level's place: 0 - 0
    tpush(q, "normal", "c", Priority.NORMAL, arrival=1.5)  # its place: 1.5 - 1 = 0.5
    tpush(q, "low-b", "b", Priority.LOW, arrival=1.0)  # place 1.0
    q.charge("a", 50)
    # "b" is less served, so it fills the low level's first place; "a" keeps the next low
    # place (1.0) behind the normal request's 0.5: the normal request waits for one low
    # request, as it would without tenants.
    assert drain(q) == ["low-b", "normal", "low-a"]


def test_pop_level_takes_fair_turns_too():
    q = make_queue()
    tpush(q, "a0", "a", Priority.URGENT, arrival=1.0)
    tpush(q, "a1", "a", Priority.URGENT, arrival=1.1)
    tpush(q, "b0", "b", Priority.URGENT, arrival=1.2)
    q.charge("a", 5)
    assert q.pop_level(Priority.URGENT) == "b0"
    assert q.pop_level(Priority.URGENT) == "a0"


def test_lone_tenant_is_fifo_like_no_tenant():
    q = make_queue()
    for i in range(5):
        tpush(q, f"r{i}", "only", arrival=100.0 + i)
        q.charge("only", 1000)
    assert drain(q) == [f"r{i}" for i in range(5)]


@pytest.mark.parametrize("seed", range(30))
def test_random_operations_with_tenants_keep_every_request_and_the_counts(seed):
    rng = random.Random(seed)
    q: PriorityRequestQueue[str] = PriorityRequestQueue(60, rng.choice([0.5, 5.0]))
    waiting: dict[str, Priority] = {}
    popped: list[str] = []
    now = 0.0
    for i in range(500):
        now += rng.choice([0.0, 0.1, 1.0])
        op = rng.random()
        if op < 0.5 and len(waiting) < 60:
            level = rng.choice(list(Priority))
            q.push(f"r{i}", f"r{i}", level, now - rng.choice([0.0, 0.0, 5.0]),
                   rng.choice(["a", "b", "c", None]))
            waiting[f"r{i}"] = level
        elif op < 0.7:
            level = None if rng.random() < 0.8 else Priority.URGENT
            peeked = q.peek(level)  # what the scheduler looks at before it takes
            item = q.pop() if level is None else q.pop_level(level)
            assert item == peeked
            if item is not None:
                popped.append(item)
                del waiting[item]
                q.charge(rng.choice(["a", "b", "c", None]), rng.randint(1, 50))
        elif waiting:
            victim = rng.choice(sorted(waiting))
            assert q.remove(victim) == victim
            del waiting[victim]
        assert len(q) == len(waiting)
        assert q.lengths() == {lv: sum(1 for v in waiting.values() if v is lv) for lv in Priority}
    rest = drain(q)
    assert sorted(rest) == sorted(waiting)
    assert len(set(popped + rest)) == len(popped) + len(rest)  # nothing served twice
