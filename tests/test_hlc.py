"""
Tests for :mod:`kvresponder.hlc`.
"""

import json

import pytest
from hypothesis import given, settings, strategies as st

from kvresponder.hlc import (MAX_COUNTER, NODE_ID_PATTERN, RESTAMP_BASE, RESTAMP_MILLISECONDS, HybridLogicalClock,
                             format_version, version_from_wire)


class ManualWall:
    """
    A wall clock a test sets by hand, so that it can stand still or go backwards (``task.Clock`` only moves
    forwards).
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_versions_strictly_increase_when_wall_clock_stands_still():
    """
    If the wall clock does not move between writes, then each version is still strictly greater than the
    one before, by its counter.
    """
    clock = HybridLogicalClock(ManualWall(1000.0), "n1")
    versions = [clock.now() for _ in range(5)]
    assert versions == sorted(set(versions))
    assert [v[1] for v in versions] == [0, 1, 2, 3, 4]
    assert {v[0] for v in versions} == {1000000}


def test_versions_strictly_increase_when_wall_clock_goes_backwards():
    """
    If the wall clock steps backwards (an NTP correction), then the next version still orders after every
    earlier one, and the wall part never goes back.
    """
    wall = ManualWall(1000.0)
    clock = HybridLogicalClock(wall, "n1")
    before = clock.now()
    wall.now = 900.0
    after = clock.now()
    assert after > before
    assert after[0] == before[0]


def test_counter_resets_when_wall_clock_moves_forward():
    """
    If the wall clock moves past the last issued wall time, then the next version takes the new wall time
    with counter 0.
    """
    wall = ManualWall(1000.0)
    clock = HybridLogicalClock(wall, "n1")
    clock.now()
    clock.now()
    wall.now = 1000.5
    assert clock.now() == (1000500, 0, "n1")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("wall"), st.floats(min_value=0, max_value=1e10, allow_nan=False)),
    st.tuples(st.just("now"), st.none()),
    st.tuples(st.just("now_many"), st.integers(0, 5)),
    st.tuples(st.just("observe"), st.tuples(st.integers(0, 10 ** 13), st.integers(0, 1000),
                                            st.sampled_from(["a", "n1", "zz"]))),
), max_size=60))
def test_every_version_is_greater_than_everything_issued_or_observed_before(steps):
    """
    If the wall clock jumps anywhere and remote versions are observed in any order, then every version the
    clock issues is strictly greater than every version it issued or observed before.
    """
    wall = ManualWall(0.0)
    clock = HybridLogicalClock(wall, "n1")
    highest = None
    for kind, argument in steps:
        if kind == "wall":
            wall.now = argument
        elif kind == "observe":
            clock.observe(argument)
            highest = argument if highest is None else max(highest, argument)
        elif kind == "now_many":
            for version in clock.now_many(argument):
                assert highest is None or version > highest
                highest = version
        else:
            version = clock.now()
            assert highest is None or version > highest
            highest = version


@pytest.mark.parametrize("counter", [0, 7, MAX_COUNTER - 3])
def test_if_a_batch_is_stamped_then_its_versions_are_those_as_many_calls_of_now_give(counter):
    """
    If a batch of writes is stamped at once while the wall clock stands still, then it gets the versions that
    as many calls of ``now`` give, one after the other, also when the millisecond's counter runs out within
    the batch; and the clock goes on from the last of them.
    """
    batch = HybridLogicalClock(lambda: 5.0, "n1")
    single = HybridLogicalClock(lambda: 5.0, "n1")
    for clock in (batch, single):
        clock.now()
        # As if this many writes had been stamped in this millisecond already (2**32 calls would take minutes).
        clock._counter = counter
    assert batch.now_many(6) == [single.now() for _ in range(6)]
    assert batch.now() == single.now()
    assert batch.now_many(0) == []


def test_observed_future_version_orders_next_local_version_after_it():
    """
    If a node observes a remote version from far in its future (the remote clock runs ahead), then its next
    local version orders after the remote one.
    """
    wall = ManualWall(1000.0)
    clock = HybridLogicalClock(wall, "a")
    remote = (5000000, 7, "z")
    clock.observe(remote)
    local = clock.now()
    assert local > remote
    assert local == (5000000, 8, "a")


def test_observed_equal_version_from_higher_node_id_is_overtaken():
    """
    If the remote version has the same wall time and counter as the local clock but a higher node id, then
    the next local version still orders after it (by the counter).
    """
    clock = HybridLogicalClock(ManualWall(1.0), "a")
    last = clock.now()
    remote = (last[0], last[1], "zzz")
    clock.observe(remote)
    assert clock.now() > remote


def test_observing_an_older_version_does_not_change_the_next_version():
    """
    If the observed version is older than the local clock, then the next local version is the one the
    clock would have issued anyway.
    """
    observing = HybridLogicalClock(ManualWall(1000.0), "n1")
    control = HybridLogicalClock(ManualWall(1000.0), "n1")
    observing.now()
    control.now()
    observing.observe((999000, 50, "z"))
    assert observing.now() == control.now()


def test_tie_on_wall_time_and_counter_is_broken_by_node_id_the_same_way_everywhere():
    """
    If two nodes issue versions at the same millisecond with the same counter, then the one with the higher
    node id wins on every node, whatever order the node sees them in.
    """
    first = HybridLogicalClock(ManualWall(42.0), "node-a").now()
    second = HybridLogicalClock(ManualWall(42.0), "node-b").now()
    assert first[:2] == second[:2]
    assert max(first, second) == max(second, first) == second
    assert sorted([second, first]) == sorted([first, second]) == [first, second]


def test_format_version_renders_wall_counter_and_node():
    """
    If a version is formatted for clients, then it reads ``<wall_ms>.<counter>.<node_id>``.
    """
    assert format_version((1700000000123, 4, "pod-1.x")) == "1700000000123.4.pod-1.x"


@given(st.tuples(st.integers(0, 2 ** 63 - 1), st.integers(0, 2 ** 32 - 1),
                 st.from_regex(NODE_ID_PATTERN, fullmatch=True)))
def test_version_survives_the_json_wire_round_trip(version):
    """
    If a version is sent to a peer as a JSON list, then the peer parses back the same version.
    """
    assert version_from_wire(json.loads(json.dumps(list(version)))) == version


@pytest.mark.parametrize("value", [
    None,
    "1.2.n1",
    (1, 2, "n1"),
    [1, 2],
    [1, 2, "n1", 4],
    [],
    [True, 2, "n1"],
    [1, False, "n1"],
    [1.0, 2, "n1"],
    [1, 2.5, "n1"],
    ["1", 2, "n1"],
    [-1, 2, "n1"],
    [1, -2, "n1"],
    [2 ** 63, 2, "n1"],
    [1, 2 ** 32, "n1"],
    [1, 2, 3],
    [1, 2, None],
    [1, 2, ""],
    [1, 2, "n1\n"],
    [1, 2, 'n"1'],
    [1, 2, "n\u00e9"],
    [1, 2, "-n1"],
    [1, 2, "n" * 64],
    {"wall": 1, "counter": 2, "node": "n1"},
])
def test_malformed_wire_version_is_rejected(value):
    """
    If a peer sends anything but ``[non-negative int, non-negative int, node id]`` within the wire format's
    ranges (a node id as a node's own must be: it is written into JSON answers unescaped), then parsing raises
    ``ValueError`` naming the value.
    """
    with pytest.raises(ValueError) as raised:
        version_from_wire(value)
    assert "malformed version" in str(raised.value)


def test_the_largest_counter_a_clock_adopts_still_gives_a_greater_version_that_fits_the_wire():
    """
    If the clock observed a version whose counter is the largest it adopts (just below the re-stamp space),
    then the next local version is still greater and still fits the wire format; a version with a counter in
    the re-stamp space (up to the largest the wire carries) is not adopted at all.
    """
    from kvresponder.hlc import MAX_COUNTER, RESTAMP_BASE
    from kvresponder.store import Entry
    from kvresponder.wire import decode_batch, encode_batch
    clock = HybridLogicalClock(lambda: 1.0, "n1")
    assert clock.observe((1000, MAX_COUNTER, "n2"))
    assert clock.now() == (1000, 0, "n1")
    clock.observe((1000, RESTAMP_BASE - 1, "n2"))
    version = clock.now()
    assert version > (1000, RESTAMP_BASE - 1, "n2")
    [entry] = decode_batch(encode_batch([Entry("k", b"1", version)], 1.0), 1.0)
    assert entry.version == version


def test_a_write_restamped_above_the_last_version_the_wire_carries_still_fits_the_wire():
    """
    If a corrupt peer's version is the last the wire format carries, then a write re-stamped above it gets the
    last version the format carries (it cannot win, but it travels and compares), not one past the format that
    no batch or answer could encode; just below the end, a re-stamp is above the version and fits.
    """
    from kvresponder.hlc import MAX_WALL
    from kvresponder.store import Entry
    from kvresponder.wire import decode_batch, encode_batch

    clock = HybridLogicalClock(lambda: 1.0, "n1")
    for held in ([MAX_WALL, MAX_COUNTER, "zzz"], [MAX_WALL - 1, MAX_COUNTER, "zzz"], [MAX_WALL, MAX_COUNTER - 1, "a"]):
        restamped = clock.above(version_from_wire(held))
        [entry] = decode_batch(encode_batch([Entry("k", b"1", restamped)], 1.0), 1.0)
        assert entry.version == restamped == version_from_wire(list(restamped))
        assert restamped > tuple(held) or restamped == (MAX_WALL, MAX_COUNTER, "n1"), (held, restamped)


# -- re-stamps above a version ahead of the clock --------------------------------------------------------

def test_two_restamps_above_one_version_never_share_a_version_even_after_many_others():
    """
    If two overlapping writes to one key are re-stamped above the same future version, and between the two
    this node re-stamped writes to more other keys than it keeps a counter apiece for (a node whose clock
    jumped ahead wrote them, each in a millisecond of its own), then the second still gets a version of its
    own, above the first's: two values under one version would never be reconciled (each replica keeps the
    one it got first).
    """
    now = [1_700_000_000.0]
    clock = HybridLogicalClock(lambda: now[0], "n1", max_ahead=0.5)
    future = int((now[0] + 3600) * 1000)
    first = clock.above((future, 4, "n3"))
    for ms in range(1, RESTAMP_MILLISECONDS + 1):
        clock.above((future + ms, 0, "n3"))
    second = clock.above((future, 4, "n3"))
    assert second != first, (first, second)
    assert second > first
    assert second[0] == first[0] == future


def test_the_record_of_restamps_stays_bounded_however_many_future_milliseconds_are_restamped():
    """
    If a node re-stamps writes above versions in ever more milliseconds ahead of its clock, then what it keeps
    to tell their counters apart stays within ``RESTAMP_MILLISECONDS`` milliseconds, and each re-stamp still
    lands in its version's millisecond.
    """
    clock = HybridLogicalClock(lambda: 1000.0, "n1")
    future = 5_000_000
    for ms in range(5 * RESTAMP_MILLISECONDS):
        restamped = clock.above((future + ms, 3, "n3"))
        assert restamped[0] == future + ms and restamped > (future + ms, 3, "n3")
        assert len(clock._above) <= RESTAMP_MILLISECONDS


def test_once_the_clock_passes_the_restamped_milliseconds_later_restamps_start_afresh():
    """
    If the clock passes every millisecond it re-stamped writes in (even after their counters were folded
    into one floor), then later re-stamps ahead of it start again from the lowest re-stamp counter: the
    counters, which a version carries in 32 bits, are not used up over a node's life.
    """
    wall = ManualWall(1000.0)
    clock = HybridLogicalClock(wall, "n1")
    future = 2_000_000
    for ms in range(RESTAMP_MILLISECONDS + 1):
        for _ in range(3):
            clock.above((future + ms, 0, "n3"))
    wall.now = 3000.0
    later = 4_000_000
    for ms in range(RESTAMP_MILLISECONDS + 1):
        assert clock.above((later + ms, 0, "n3")) == (later + ms, RESTAMP_BASE, "n1")
    assert clock.above((later + 1, 0, "n3")) == (later + 1, RESTAMP_BASE + 1, "n1")


def test_restamps_in_the_millisecond_the_clock_is_in_stay_apart_when_older_milliseconds_are_forgotten():
    """
    If the record of re-stamps is cleared of the milliseconds the clock has passed, then it still keeps the
    one the clock is in: a write re-stamped there again (above a version with a counter this clock has not
    reached in that millisecond) still gets a version of its own.
    """
    wall = ManualWall(1000.0)
    clock = HybridLogicalClock(wall, "n1")
    start = 1_000_000
    for ms in range(1, RESTAMP_MILLISECONDS):
        clock.above((start + ms, 0, "n3"))
    wall.now = (start + RESTAMP_MILLISECONDS - 1) / 1000  # every one of them behind the clock but the last
    current = start + RESTAMP_MILLISECONDS - 1
    first = clock.above((current, RESTAMP_BASE - 1, "n3"))
    for ms in range(1, 4):
        clock.above((current + ms, 0, "n3"))  # the record is full: the milliseconds behind are forgotten
    second = clock.above((current, RESTAMP_BASE - 1, "n3"))
    assert first[0] == second[0] == current
    assert second > first


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.lists(st.one_of(
    st.tuples(st.just("wall"), st.integers(-3, 8)),
    st.tuples(st.just("now"), st.none()),
    st.tuples(st.just("above"), st.tuples(
        st.integers(-2, 8),
        st.sampled_from([0, 7, RESTAMP_BASE - 1, RESTAMP_BASE, RESTAMP_BASE + 2, MAX_COUNTER - 1, MAX_COUNTER]),
        st.sampled_from(["a", "n1", "z"]))),
), max_size=120))
def test_no_version_is_issued_twice_and_each_restamp_orders_after_its_version(limit, steps):
    """
    If the clock moves either way, versions are issued, and writes are re-stamped above versions at, behind
    and ahead of the clock (repeated ones, ones with the largest counters, more milliseconds than the record
    of re-stamps keeps), then no version is issued twice, each re-stamp orders after its version and after
    every version :meth:`now` issued before it, and each fits the wire format.
    """
    import kvresponder.hlc as hlc_module
    saved = hlc_module.RESTAMP_MILLISECONDS
    hlc_module.RESTAMP_MILLISECONDS = limit  # a small record, so that it is folded and cleared often
    try:
        wall = ManualWall(1000.0)
        clock = HybridLogicalClock(wall, "n1")
        issued = set()
        latest_now = None
        for kind, argument in steps:
            if kind == "wall":
                wall.now += argument / 1000
                continue
            if kind == "now":
                version = clock.now()
                latest_now = version
            else:
                offset, counter, node = argument
                target = (int(wall.now * 1000) + offset, counter, node)
                version = clock.above(target)
                assert version > target
                assert latest_now is None or version > latest_now
                if version[1] < RESTAMP_BASE:
                    latest_now = version  # not re-stamped: the clock's own next version
            assert version not in issued, version
            assert 0 <= version[1] <= MAX_COUNTER
            issued.add(version)
    finally:
        hlc_module.RESTAMP_MILLISECONDS = saved
