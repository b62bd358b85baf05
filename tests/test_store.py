"""
Tests for :mod:`kvresponder.store`, on a ``task.Clock``.
"""

import platform
import time
from typing import Dict, List, Optional

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet.task import Clock

from kvresponder.store import (ENTRY_OVERHEAD, EXPIRY_OVERHEAD, TOMBSTONE_OVERHEAD, ApplyResult, Entry,
                               EntryTooLarge, Store)
from kvresponder.store import _HEADER_SIZE as HEADER_SIZE
import kvresponder.store as store_module

START = 1700000000.0


class Events:
    """
    Records the store's ``evicted(n)`` and ``expired(n)`` calls.
    """

    def __init__(self) -> None:
        self.evictions: List[int] = []
        self.tombstone_evictions: List[int] = []
        self.expirations: List[int] = []

    def evicted(self, count: int) -> None:
        self.evictions.append(count)

    def tombstones_evicted(self, count: int) -> None:
        self.tombstone_evictions.append(count)

    def expired(self, count: int) -> None:
        self.expirations.append(count)


def make_store(max_bytes: int = 1 << 20, tombstone_grace: float = 600.0):
    clock = Clock()
    clock.advance(START)
    events = Events()
    return Store(clock.seconds, max_bytes, tombstone_grace=tombstone_grace, events=events), clock, events


def put(key: str, value: bytes, wall: int, ttl: Optional[float] = None, node: str = "n1") -> Entry:
    expires_at = None if ttl is None else START + ttl
    return Entry(key, value, (wall, 0, node), expires_at)


def tomb(key: str, wall: int, node: str = "n1") -> Entry:
    return Entry(key, None, (wall, 0, node))


def all_keys(store: Store) -> List[str]:
    return store.keys(limit=10 ** 9)


# -- entries -------------------------------------------------------------------------------------------

def test_entry_size_counts_key_value_and_overhead():
    """
    If an entry is built, then its accounted size is its UTF-8 key bytes plus its value bytes plus the
    fixed overhead, and the expiry's if it has one (a tombstone: key bytes plus the tombstone overhead).
    """
    assert Entry("ab", b"xyz", (1, 0, "n")).size == 2 + 3 + ENTRY_OVERHEAD
    assert Entry("ab", b"xyz", (1, 0, "n"), START).size == 2 + 3 + ENTRY_OVERHEAD + EXPIRY_OVERHEAD
    assert Entry("ab", None, (1, 0, "n"), START).size == 2 + TOMBSTONE_OVERHEAD
    assert Entry("é", b"", (1, 0, "n")).size == 2 + ENTRY_OVERHEAD
    assert Entry("ab", None, (1, 0, "n")).size == 2 + TOMBSTONE_OVERHEAD


# -- TTL -----------------------------------------------------------------------------------------------

def test_key_is_served_until_its_expiry():
    """
    If a key has a TTL, then it is served by every read until just before the expiry time.
    """
    store, clock, _ = make_store()
    store.apply(put("k", b"1", 1, ttl=10))
    clock.advance(9.999)
    assert store.get("k").value == b"1"
    assert store.current("k").value == b"1"
    assert all_keys(store) == ["k"]
    assert [e.key for e in store.entries()] == ["k"]


@pytest.mark.parametrize("after", [10.0, 10.001, 1000.0])
@pytest.mark.parametrize("superseded", [False, True])
def test_expired_key_is_never_served(after, superseded):
    """
    If a key's TTL has passed (at or after ``expires_at``), then ``get``, ``keys`` and ``entries`` without
    tombstones report it absent, even before a sweep; ``entries`` and ``current``, which replicas compare
    versions with, report a tombstone of its version if it replaced an older version here, and nothing if not.
    """
    store, clock, _ = make_store()
    if superseded:
        store.apply(put("k", b"0", 0))
    store.apply(put("k", b"1", 1, ttl=10))
    store.apply(put("other", b"2", 1))
    clock.advance(after)
    assert all_keys(store) == ["other"]
    assert [e.key for e in store.entries(include_tombstones=False)] == ["other"]
    if superseded:
        assert sorted((e.key, e.value) for e in store.entries()) == [("k", None), ("other", b"2")]
        assert store.get("k") is None
        assert store.current("k") == tomb("k", 1)
    else:
        assert [e.key for e in store.entries()] == ["other"]
        assert store.get("k") is None
        assert store.current("k") is None


def test_get_of_an_expired_key_reclaims_and_counts_it_once():
    """
    If ``get`` finds a key expired (one that replaced nothing here), then it reclaims its bytes and counts
    one expiration, and a later sweep does not count it again.
    """
    store, clock, events = make_store()
    store.apply(put("k", b"1", 1, ttl=10))
    clock.advance(11)
    assert store.get("k") is None
    assert (store.bytes, store.expirations, events.expirations) == (0, 1, [1])
    assert store.sweep() == 0
    assert (store.expirations, events.expirations) == (1, [1])


def test_sweep_reclaims_expired_entries_and_counts_expirations():
    """
    If a sweep runs after some TTLs have passed, then it reclaims exactly the expired entries and their
    bytes, counts them, and reports them to the events object in one call.
    """
    store, clock, events = make_store()
    store.apply(put("a", b"1", 1, ttl=5))
    store.apply(put("b", b"22", 1, ttl=5))
    store.apply(put("c", b"333", 1, ttl=50))
    store.apply(put("d", b"4444", 1))
    clock.advance(6)
    assert store.sweep() == 2
    assert len(store) == 2
    assert store.tombstone_count == 0  # neither replaced anything (see the expiry tests below)
    assert store.bytes == put("c", b"333", 1, ttl=50).size + put("d", b"4444", 1).size
    assert (store.expirations, events.expirations) == (2, [2])
    assert store.sweep() == 0
    assert events.expirations == [2]


def test_a_sweep_with_a_limit_reclaims_that_many_and_the_next_goes_on_where_it_stopped():
    """
    If more entries are due than a sweep's limit (keys given one TTL expire together), then the sweep reclaims
    that many, says it is behind, and the next ones go on until every expired entry and old tombstone is gone;
    the heap is rebuilt only once the sweep has caught up.
    """
    store, clock, events = make_store(max_bytes=64 << 20, tombstone_grace=5.0)
    for index in range(250):
        store.apply(put("k%03d" % (index,), b"1", 1, ttl=5))
    for index in range(150):
        store.apply(Entry("gone%03d" % (index,), None, (START * 1000, 0, "n1")))
    clock.advance(6)
    # Each sweep takes up to 100 expired entries and up to 100 old tombstones.
    assert store.sweep(100) == 100 and store.sweep_behind and store.tombstone_count == 50
    assert store.sweep(100) == 100 and store.sweep_behind and store.tombstone_count == 0
    assert store.sweep(100) == 50 and not store.sweep_behind
    assert (len(store), store.tombstone_count, store.expirations) == (0, 0, 250)
    assert events.expirations == [100, 100, 50]
    assert store.sweep(100) == 0 and not store.sweep_behind


def test_sweep_does_not_expire_a_key_rewritten_with_a_later_ttl():
    """
    If a key with a TTL is overwritten with a longer TTL, then a sweep after the first TTL keeps it.
    """
    store, clock, _ = make_store()
    store.apply(put("k", b"old", 1, ttl=5))
    store.apply(put("k", b"new", 2, ttl=100))
    clock.advance(10)
    assert store.sweep() == 0
    assert store.get("k").value == b"new"


def test_write_that_has_already_expired_removes_the_older_value():
    """
    If a newer write arrives whose TTL has already passed, then the older value is gone, no value is
    stored, and the write's version stays as a tombstone (so that an older write cannot come back).
    """
    store, clock, _ = make_store()
    clock.advance(100)
    store.apply(put("k", b"old", 1))
    result = store.apply(put("k", b"new", 2, ttl=50))
    assert result == ApplyResult(True, True)
    assert store.get("k") is None
    assert store.current("k").is_tombstone
    assert (len(store), store.tombstone_count) == (0, 1)
    assert store.bytes == store.current("k").size


def _notice_expiry(store: Store, key: str, how: str) -> None:
    # The three ways a store finds that an entry has expired: the sweep, a read, a replica comparing versions.
    if how == "sweep":
        assert store.sweep() == 1
    elif how == "get":
        assert store.get(key) is None
    elif how == "current, not as a use":
        store.current(key, use=False)
    else:
        store.current(key)


def _hold_older(store: Store, clock: Clock, key: str, held: str) -> None:
    # What a store may hold of a key before a write with a TTL replaces it, at versions below 2.
    if held == "a value":
        store.apply(put(key, b'"old"', 1))
    elif held == "a tombstone":
        store.apply(tomb(key, 1))
    elif held == "an expired entry that leaves a tombstone":
        store.apply(put(key, b'"old"', 0))
        store.apply(put(key, b'"older ttl"', 1, ttl=clock.seconds() - START + 1))
        clock.advance(1)
    elif held == "an expired entry that leaves none":
        store.apply(put(key, b'"old ttl"', 1, ttl=clock.seconds() - START + 1))
        clock.advance(1)
    else:
        assert held == "nothing"


@pytest.mark.parametrize("how", ["sweep", "get", "current", "current, not as a use"])
@pytest.mark.parametrize("held", ["nothing", "an expired entry that leaves none"])
def test_an_expired_entry_that_replaced_nothing_leaves_no_tombstone(how, held):
    """
    If an entry with a TTL was stored when the store held no older version of its key (nothing, or only an
    expired entry that itself leaves nothing), then when it expires (found by the sweep, a read or a version
    comparison) it goes without a trace: no tombstone, and the accounted bytes back to zero.
    """
    store, clock, events = make_store()
    _hold_older(store, clock, "k", held)
    store.apply(put("k", b'"new"', 2, ttl=clock.seconds() - START + 2))
    clock.advance(3)
    _notice_expiry(store, "k", how)
    assert (len(store), store.tombstone_count, store.bytes) == (0, 0, 0)
    assert store.current("k") is None
    assert store.sweep() == 0
    assert (store.expirations, events.expirations) == (1, [1])


@pytest.mark.parametrize("how", ["sweep", "get", "current", "current, not as a use"])
@pytest.mark.parametrize("held", ["a value", "a tombstone", "an expired entry that leaves a tombstone"])
def test_an_expired_entry_that_replaced_an_older_version_leaves_a_tombstone_so_it_stays_hidden(how, held):
    """
    If an entry with a TTL replaced an older version of its key (a live value, a tombstone, or an expired
    entry that leaves one) and then expires (found by the sweep, a read or a version comparison), then it
    leaves a tombstone of its own version: the older value, arriving again from a replica or a hint that
    missed the overwrite, is refused in favour of that version, and the key stays absent. A newer write or
    delete still wins, and answers as for an absent key (nothing live was there).
    """
    store, clock, events = make_store()
    _hold_older(store, clock, "k", held)
    store.apply(put("k", b'"new"', 2, ttl=clock.seconds() - START + 2))
    expired_before = store.expirations
    clock.advance(3)
    _notice_expiry(store, "k", how)
    assert (len(store), store.tombstone_count, store.expirations - expired_before) == (0, 1, 1)
    assert store.current("k") == tomb("k", 2)
    assert store.apply(put("k", b'"old"', 1)) == ApplyResult(False, False, (2, 0, "n1"))
    assert store.get("k") is None and all_keys(store) == []
    assert store.apply(tomb("k", 3)) == ApplyResult(True, False)
    assert store.apply(put("k", b'"newer"', 4)) == ApplyResult(True, False)
    assert store.get("k").value == b'"newer"'
    assert store.bytes == put("k", b'"newer"', 4).size == accounted(store)


def test_an_expiry_tombstone_is_collected_after_the_grace_period_as_a_deletes_is():
    """
    If an entry that replaced an older version expires, then its tombstone is kept for ``tombstone_grace``
    from the sweep that found it, and collected after it, with its bytes, without counting the expiry again.
    """
    store, clock, events = make_store(tombstone_grace=60)
    store.apply(tomb("k", 0))
    store.apply(put("k", b"1", 1, ttl=5))
    clock.advance(5)
    store.sweep()
    clock.advance(59)
    store.sweep()
    assert store.current("k") == tomb("k", 1)
    clock.advance(1)
    store.sweep()
    assert store.current("k") is None
    assert (store.bytes, store.tombstone_count, events.expirations) == (0, 0, [1])


def test_expiry_tombstones_are_accounted_and_evicted_as_delete_tombstones_are():
    """
    If an expired entry's tombstone is held among deletes' tombstones, then it costs what theirs do (its
    key's bytes and the tombstone overhead, in ``tombstone_count``), and a write that needs their room
    evicts them oldest first, whichever made them.
    """
    store, clock, events = make_store()
    store.apply(tomb("d1", 1))
    store.apply(tomb("e1", 0))
    store.apply(put("e1", b"a value", 1, ttl=5))
    clock.advance(6)
    store.sweep()
    store.apply(tomb("d2", 2))
    assert store.tombstone_count == 3
    assert store.bytes == 3 * tomb("d1", 1).size == accounted(store)
    store.max_bytes = store.bytes
    big = put("big", b"x" * 150, 3)
    assert tomb("d1", 1).size < big.size <= 2 * tomb("d1", 1).size
    store.apply(big)
    assert [store.current(key) for key in ("d1", "e1", "d2")] == [None, None, tomb("d2", 2)]
    assert store.get("big") == big
    assert store.bytes == big.size + tomb("d2", 2).size == accounted(store)
    assert events.evictions == []  # tombstones dropped are not evicted keys: they are counted apart
    assert events.tombstone_evictions == [2] and store.tombstone_evictions == 2 and store.evictions == 0


def test_a_write_over_budget_reclaims_what_has_expired_before_it_evicts_so_a_marked_entry_leaves_its_tombstone():
    """
    If an entry that replaced an older value has expired (so it is marked to leave a tombstone) and no sweep has
    run yet, then a write that passes the budget reclaims it as the sweep would, leaving its tombstone, before it
    evicts a live entry: evicted as the least recently used, it left no tombstone, and an older copy of the key
    arriving next was taken (the old value back). The live entry is kept, and nothing is counted as evicted.
    """
    store, clock, events = make_store()
    store.apply(put("k", b"old", 1))
    store.apply(put("k", b'"%s"' % (b"n" * 300,), 2, ttl=5))
    store.apply(put("keep", b"a value", 3))
    clock.advance(6)
    store.max_bytes = store.bytes
    store.apply(put("more", b"v", 4))
    assert store.current("k") == Entry("k", None, (2, 0, "n1"), None)
    assert store.get("keep") == put("keep", b"a value", 3)
    assert (store.evictions, store.expirations) == (0, 1)
    assert not store.apply(put("k", b"old", 1)).applied
    assert store.bytes == accounted(store) <= store.max_bytes


def test_a_delete_over_budget_keeps_its_own_tombstone_and_evicts_the_live_entry_instead():
    """
    If a delete puts the store over its budget and the only live entry is older, then the delete's tombstone
    stays (the write acknowledged) and the live entry goes: an older copy of the deleted key arriving later
    is refused.
    """
    big = put("big", b"x" * 900, 1)
    store, _, events = make_store(max_bytes=big.size + 100)
    store.apply(big)
    assert store.apply(tomb("k", 10)).applied
    assert store.current("k") == tomb("k", 10)
    assert store.get("big") is None and events.evictions == [1] and events.tombstone_evictions == []
    assert not store.apply(put("k", b"old", 5)).applied
    assert store.bytes == tomb("k", 10).size == accounted(store)


def test_a_delete_over_a_budget_full_of_tombstones_evicts_the_oldest_counted_apart():
    """
    If a store holds only tombstones up to its budget and one more delete comes, then the oldest tombstone goes,
    counted as a tombstone eviction (not an entry's), and the new one stays.
    """
    store, _, events = make_store(max_bytes=3 * tomb("d0", 1).size)
    for index in range(3):
        store.apply(tomb("d%d" % (index,), index + 1))
    assert store.apply(tomb("d3", 9)).applied
    assert store.current("d3") == tomb("d3", 9) and store.current("d0") is None
    assert events.tombstone_evictions == [1] and store.tombstone_evictions == 1
    assert store.bytes <= store.max_bytes and store.bytes == accounted(store)


def test_tombstones_evicted_are_counted_in_their_own_metric_and_logged_at_debug():
    """
    If a node's store evicts tombstones, then ``kv_tombstone_evictions_total`` counts them, not
    ``kv_evictions_total``, and the store area at debug logs a ``tombstones-evicted`` line with the count.
    """
    from eliot import add_destinations, remove_destination

    from kvresponder.log import LogPolicy
    from kvresponder.log.store import StoreEvents
    from kvresponder.metrics import Metrics

    metrics = Metrics("t")
    clock = Clock()
    store = Store(clock.seconds, 3 * tomb("d0", 1).size, events=StoreEvents(metrics, LogPolicy("debug"), lambda: 0))
    messages = []
    add_destinations(messages.append)
    try:
        for index in range(4):
            store.apply(tomb("d%d" % (index,), index + 1))
    finally:
        remove_destination(messages.append)
    text = metrics.exposition().decode()
    assert 'kv_tombstone_evictions_total{tenant="t"} 1.0' in text and 'kv_evictions_total{tenant="t"} 0.0' in text
    assert [m["count"] for m in messages if m.get("message_type") == "kvresponder:store:tombstones-evicted"] == [1]


def test_a_burst_of_ttl_overwrites_between_sweeps_keeps_the_expiry_heap_within_its_account():
    """
    If one key with a TTL is overwritten 20k times with no sweep between (a burst within a second), then the
    expiry heap holds at most half again as many items as live entries with a TTL, and 64 (what
    EXPIRY_OVERHEAD accounts for), not an item for every write.
    """
    store, _, _ = make_store()
    for wall in range(1, 20001):
        store.apply(put("hot", b"1", wall, ttl=5000))
    assert len(store._expiries) <= 1 + 64
    store.apply(put("other", b"1", 1, ttl=10))
    assert store.get("hot") == put("hot", b"1", 20000, ttl=5000)


def test_a_large_expiry_heap_is_compacted_a_little_a_write_and_the_rest_by_sweeps_and_every_entry_still_expires():
    """
    If overwrites of keys with a TTL leave the expiry heap overgrown while it is large, then the write that passes
    the bound drops no more than a few of its dead items (all at once, a million took a PyPy node 2.7 s in that
    one write), the sweeps that follow finish the compaction (saying they are behind until then), the heap is
    back within its account, and every entry still expires at its time, the ones overwritten at their new time.
    """
    from kvresponder.store import COMPACT_AT_ONCE, COMPACT_PER_WRITE

    store, clock, _ = make_store(max_bytes=1 << 30)
    count = 3 * COMPACT_AT_ONCE
    for index in range(count):
        store.apply(put("k%d" % (index,), b"1", 1, ttl=100 + index % 50))
    written = 1
    while not store._draining:
        written += 1
        for index in range(0, count, 7):
            store.apply(put("k%d" % (index,), b"2", written, ttl=200 + index % 50))
            if store._draining:
                break
    # The write that passed the bound moved a few items, not the heap.
    assert len(store._draining) > count - COMPACT_PER_WRITE and len(store._expiries) <= COMPACT_PER_WRITE + 1
    store.sweep()
    assert store.sweep_behind
    while store.sweep_behind:
        store.sweep()
    assert not store._draining and len(store._expiries) <= count + count // 2 + 64
    clock.advance(150)
    store.sweep()
    kept = {index for index in range(count) if store.get("k%d" % (index,)) is not None}
    assert kept == set(range(0, count, 7)) | {index for index in range(count) if 100 + index % 50 > 150}
    clock.advance(100)
    while True:
        store.sweep()
        if not store.sweep_behind:
            break
    assert len(store) == 0 and not store._expiries and not store._draining


def test_a_steady_ttl_workload_of_new_keys_leaves_no_tombstones_and_its_memory_stays_flat():
    """
    If new keys are written with a TTL at a steady rate (none replacing anything), then the store holds
    only the keys whose TTL has not ended: no tombstones, the same accounted bytes from one second to the
    next once the first TTL has ended, no eviction in a budget twice the live set, and nothing at all once
    the writes stop and the last TTL ends.
    """
    rate, ttl, seconds = 200, 5, 60
    size = put("k000000", b"v", 1, ttl=ttl).size
    store, clock, events = make_store(max_bytes=2 * rate * ttl * size)
    written = 0
    held = []
    for second in range(seconds):
        for _ in range(rate):
            store.apply(put("k%06d" % (written,), b"v", second, ttl=second + ttl))
            written += 1
        clock.advance(1)
        store.sweep()
        assert store.tombstone_count == 0
        assert store.bytes == accounted(store)
        held.append(store.bytes)
    assert set(held[ttl:]) == {rate * (ttl - 1) * size}
    assert (store.evictions, events.evictions) == (0, [])
    clock.advance(ttl)
    store.sweep()
    assert (len(store), store.tombstone_count, store.bytes) == (0, 0, 0)
    assert store.expirations == written
    assert len(store._expiries) <= 64  # the heap holds no dead items either


def test_a_steady_ttl_workload_of_overwrites_holds_one_grace_periods_worth_of_tombstones_within_the_budget():
    """
    If keys that held a value are overwritten with a TTL at a steady rate, then the store holds the
    tombstones of the last ``tombstone_grace`` seconds of expiries and no more, and never exceeds its budget,
    even one too small for them (the oldest tombstones are then evicted).
    """
    rate, ttl, grace = 20, 5, 30
    for max_bytes in (1 << 20, 200 * put("k00000", b"v", 1).size):
        store, clock, _ = make_store(max_bytes=max_bytes, tombstone_grace=grace)
        written = 0
        for second in range(120):
            for _ in range(rate):
                key = "k%05d" % (written,)
                store.apply(tomb(key, 2 * second))  # what the TTL write replaces (a deleted value)
                store.apply(put(key, b"v", 2 * second + 1, ttl=second + ttl))
                written += 1
            clock.advance(1)
            store.sweep()
            assert store.bytes <= store.max_bytes and store.bytes == accounted(store)
            assert store.tombstone_count <= rate * grace
        if max_bytes == 1 << 20:
            assert store.tombstone_count == rate * grace
        else:
            assert store.tombstone_count > 0
        assert store.expirations + store.evictions == written - len(store)


def test_an_expired_entry_handed_off_before_the_sweep_is_sent_as_a_tombstone_and_forgotten_without_one():
    """
    If a rebalance pass reads an entry that replaced an older version and has expired but is not yet swept,
    then it gets the tombstone the entry leaves (so a copy whose TTL ended before its handoff still hides
    older copies on the owners), and forgetting that version once handed off leaves nothing behind.
    """
    store, clock, _ = make_store()
    store.apply(put("hint", b'"old"', 1))
    store.apply(put("hint", b'"new"', 2, ttl=2))
    clock.advance(3)
    assert list(store.entries()) == [tomb("hint", 2)]
    assert list(store.entries(include_tombstones=False)) == []
    assert store.forget("hint", (2, 0, "n1"))
    assert (len(store), store.tombstone_count, store.bytes) == (0, 0, 0)
    assert store.current("hint") is None


def test_an_expired_hint_that_replaced_nothing_is_not_handed_off_and_leaves_nothing():
    """
    If a rebalance pass reads an entry that replaced nothing here (a hint on a fallback, usually) and has
    expired but is not yet swept, then it gets nothing to send, and the sweep then drops it without a trace.
    """
    store, clock, _ = make_store()
    store.apply(put("hint", b'"new"', 2, ttl=2))
    clock.advance(3)
    assert list(store.entries()) == []
    assert store.sweep() == 1
    assert (len(store), store.tombstone_count, store.bytes) == (0, 0, 0)


# -- LRU -----------------------------------------------------------------------------------------------

def budget_for(entries: List[Entry]) -> int:
    return sum(entry.size for entry in entries)


def test_eviction_takes_the_least_recently_written_key():
    """
    If a write pushes the store over its budget, then the least recently used key is evicted, the eviction
    is counted and reported.
    """
    a, b, c = put("a", b"x" * 10, 1), put("b", b"x" * 10, 1), put("c", b"x" * 10, 1)
    store, _, events = make_store(max_bytes=budget_for([a, b]))
    store.apply(a)
    store.apply(b)
    store.apply(c)
    assert all_keys(store) == ["b", "c"]
    assert (store.evictions, events.evictions) == (1, [1])
    assert store.bytes == budget_for([b, c])


def test_get_moves_a_key_to_most_recent():
    """
    If a key is read, then it becomes the most recently used, and the next eviction takes another key.
    """
    a, b, c = put("a", b"x" * 10, 1), put("b", b"x" * 10, 1), put("c", b"x" * 10, 1)
    store, _, _ = make_store(max_bytes=budget_for([a, b]))
    store.apply(a)
    store.apply(b)
    assert store.get("a") is not None
    store.apply(c)
    assert all_keys(store) == ["a", "c"]


def test_overwrite_moves_a_key_to_most_recent():
    """
    If a key is overwritten, then it becomes the most recently used.
    """
    store, _, _ = make_store(max_bytes=budget_for([put("a", b"x", 1)] * 2))
    store.apply(put("a", b"x", 1))
    store.apply(put("b", b"x", 1))
    store.apply(put("a", b"y", 2))
    store.apply(put("c", b"x", 1))
    assert all_keys(store) == ["a", "c"]


def test_one_large_write_evicts_as_many_keys_as_needed_in_one_report():
    """
    If one write needs the room of several old keys, then they are evicted oldest first and reported as one
    ``evicted(n)`` call.
    """
    small = [put("k%d" % i, b"x" * 10, 1) for i in range(4)]
    store, _, events = make_store(max_bytes=budget_for(small))
    for entry in small:
        store.apply(entry)
    big = put("big", b"x" * (2 * small[0].size), 1)
    store.apply(big)
    assert all_keys(store) == ["big", "k3"]
    assert (store.evictions, events.evictions) == (3, [3])
    assert store.bytes <= store.max_bytes


def test_eviction_never_creates_a_tombstone():
    """
    If keys are evicted, then no tombstone is left for them, and an older copy of an evicted key (from a
    replica) may be written again.
    """
    a, b = put("a", b"x" * 10, 5), put("b", b"x" * 10, 5)
    store, _, _ = make_store(max_bytes=budget_for([a]))
    store.apply(a)
    store.apply(b)
    assert store.tombstone_count == 0
    assert store.current("a") is None
    assert store.apply(put("a", b"x" * 10, 1)).applied


def test_write_to_a_budget_full_of_tombstones_is_kept_and_the_oldest_tombstones_go():
    """
    If the budget is full of tombstones and a value is written, then the value is stored (it was reported
    applied, so it must be served) and the oldest tombstones are dropped to make room.
    """
    tombs = [tomb("t%d" % i, 1) for i in range(5)]
    store, _, events = make_store(max_bytes=budget_for(tombs))
    for entry in tombs:
        store.apply(entry)
    fresh = put("fresh", b"v" * 100, 1)
    assert store.apply(fresh).applied
    assert store.get("fresh") == fresh
    assert store.current("t0") is None
    assert store.current("t4") == tombs[4]
    assert (store.evictions, events.evictions) == (0, [])
    assert store.bytes <= store.max_bytes


# -- the byte budget -----------------------------------------------------------------------------------

def test_entry_larger_than_the_whole_budget_is_refused_and_changes_nothing():
    """
    If an entry alone is larger than the budget, then ``apply`` and ``check_fits`` raise ``EntryTooLarge``
    and the store keeps every key, byte count and counter as it was.
    """
    store, _, events = make_store(max_bytes=1000)
    store.apply(put("a", b"1", 1))
    store.apply(tomb("t", 1))
    before = (all_keys(store), store.bytes, store.tombstone_count, store.evictions, list(store.entries()))
    too_big = put("big", b"x" * (1000 - ENTRY_OVERHEAD - 2), 1)
    assert too_big.size == 1001
    with pytest.raises(EntryTooLarge):
        store.apply(too_big)
    with pytest.raises(EntryTooLarge):
        store.check_fits("big", too_big.value)
    assert (all_keys(store), store.bytes, store.tombstone_count, store.evictions,
            list(store.entries())) == before
    assert events.evictions == []


def test_entry_exactly_the_size_of_the_budget_fits():
    """
    If an entry is exactly as large as the budget, then it is stored (evicting everything else).
    """
    store, _, _ = make_store(max_bytes=1000)
    store.apply(put("a", b"1", 1))
    exact = put("big", b"x" * (1000 - ENTRY_OVERHEAD - 3), 1)
    store.check_fits("big", exact.value)
    assert store.apply(exact).applied
    assert all_keys(store) == ["big"]
    assert store.bytes == 1000


def accounted(store: Store) -> int:
    # The store's own containers (packed header, key and value, filed by slot or by key; tombstones by key):
    # the point is to check its running byte count against what it holds, expired entries not yet reclaimed
    # included.
    live = list(store._live.values()) + list(store._spill.values())
    return (sum(len(packed) - HEADER_SIZE + ENTRY_OVERHEAD
                + (EXPIRY_OVERHEAD if store_module._unpack_time(packed, 16)[0] else 0) for packed in live)
            + sum(len(key) + TOMBSTONE_OVERHEAD for key in store._tombstones))


class StoreMachine(RuleBasedStateMachine):
    """
    Random writes, deletes, reads, forgets, sweeps and clock moves against a small budget, checked against a
    model of the last applied entry of every key.
    """

    KEYS = st.sampled_from(["a", "b", "c", "d", "e", "f", "ü", "long-key-" + "x" * 40])

    @initialize(max_bytes=st.integers(ENTRY_OVERHEAD + 60, 4000))
    def start(self, max_bytes):
        self.store, self.clock, self.events = make_store(max_bytes=max_bytes, tombstone_grace=30)
        self.wall = 0
        self.newest: Dict[str, Entry] = {}

    def _apply(self, entry: Entry) -> None:
        self.wall += 1
        try:
            result = self.store.apply(entry)
        except EntryTooLarge:
            assert entry.size > self.store.max_bytes
            return
        if result.applied:
            self.newest[entry.key] = entry
        else:
            # Refused only in favour of an equal or newer version the store still holds.
            assert self.newest[entry.key].version >= entry.version

    @rule(key=KEYS, size=st.integers(0, 4000), ttl=st.none() | st.floats(0.5, 20), older=st.booleans())
    def write(self, key, size, ttl, older):
        wall = self.wall - 5 if older else self.wall
        now = self.clock.seconds()
        self._apply(Entry(key, b"v" * size, (wall, 0, "n1"), None if ttl is None else now + ttl))

    @rule(key=KEYS, older=st.booleans())
    def delete(self, key, older):
        self._apply(Entry(key, None, (self.wall - 5 if older else self.wall, 0, "n1")))

    @rule(key=KEYS)
    def read(self, key):
        entry = self.store.get(key)
        if entry is not None:
            # Never a stale value, never a deleted one: only the last write applied, if it was kept.
            assert entry == self.newest[key]
            assert entry.expires_at is None or entry.expires_at > self.clock.seconds()

    @rule(key=KEYS)
    def forget(self, key):
        entry = self.store.current(key)
        if entry is not None:
            assert self.store.forget(key, entry.version)
            assert self.store.current(key) is None

    @rule(seconds=st.floats(0, 40))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def sweep(self):
        self.store.sweep()

    @invariant()
    def bytes_stay_within_the_budget(self):
        assert 0 <= self.store.bytes <= self.store.max_bytes
        assert self.store.bytes == accounted(self.store)

    @invariant()
    def listed_keys_are_every_live_newest_write(self):
        now = self.clock.seconds()
        listed = all_keys(self.store)
        for key in listed:
            entry = self.newest[key]
            assert entry.value is not None
            assert entry.expires_at is None or entry.expires_at > now
        held = sorted(entry.key for entry in self.store.entries(include_tombstones=False)
                      if entry.expires_at is None or entry.expires_at > now)
        assert listed == sorted(held, key=lambda key: key.encode())

    @invariant()
    def counters_match_the_reports(self):
        assert self.store.evictions == sum(self.events.evictions)
        assert self.store.expirations == sum(self.events.expirations)


def test_expired_entries_are_swept_whether_filed_by_slot_or_by_key(monkeypatch):
    """
    If keys that share one slot expire, then a sweep reclaims every one of them (the expiry heap reaches only
    the slot's entry; the others are filed by key) and counts each once; each that replaced an older version
    leaves a tombstone, wherever it was filed, and the others nothing.
    """
    monkeypatch.setattr(store_module, "_SLOT_MASK", 0)
    store, clock, events = make_store()
    store.apply(put("kept", b"v", 1))
    store.apply(tomb("a", 0))
    store.apply(tomb("c", 0))
    for i, key in enumerate(("a", "b", "c")):
        store.apply(put(key, b"v", 1, ttl=5 + i))
    clock.advance(10)
    assert store.sweep() == 3
    assert all_keys(store) == ["kept"] and len(store) == 1
    assert store.bytes == accounted(store) and store.expirations == 3
    assert [store.current(key) for key in ("a", "b", "c")] == [tomb("a", 1), None, tomb("c", 1)]


class CrowdedSlotsMachine(StoreMachine):
    """
    The same model with every key in one of four slots, so that most entries are filed by key: the store
    must stay as correct as when slots never collide (its LRU order is then only approximate).
    """

    def __init__(self):
        self._mask = store_module._SLOT_MASK
        store_module._SLOT_MASK = 3
        super().__init__()

    def teardown(self):
        store_module._SLOT_MASK = self._mask


CrowdedSlotsMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_store_with_colliding_slots_never_exceeds_its_budget_or_serves_stale_values = CrowdedSlotsMachine.TestCase


def test_keys_that_share_a_slot_are_each_kept_read_listed_and_dropped(monkeypatch):
    """
    If every key hashes to one slot, then each is still stored, read, listed, replaced, deleted and forgotten
    on its own, the newest write stays the last to be evicted, and the byte count matches what is held.
    """
    monkeypatch.setattr(store_module, "_SLOT_MASK", 0)
    store, clock, _ = make_store()
    for key in ("a", "b", "c"):
        store.apply(put(key, key.encode(), 1))
    assert [store.get(key).value for key in "abc"] == [b"a", b"b", b"c"]
    assert all_keys(store) == ["a", "b", "c"] and len(store) == 3
    store.apply(tomb("b", 2))
    assert store.get("b") is None and store.get("a").value == b"a"
    assert store.forget("c", (1, 0, "n1")) and store.get("c") is None
    store.apply(put("c", b"again", 3))
    store.apply(put("a", b"newer", 3))
    assert store.get("a").value == b"newer" and store.get("c").value == b"again"
    assert sorted(e.key for e in store.entries(include_tombstones=False)) == ["a", "c"]
    assert store.bytes == accounted(store)
    # A budget for one more entry: the older entries go, the one just written stays.
    store.max_bytes = store.bytes
    store.apply(put("d", b"d", 4))
    assert store.get("d").value == b"d"
    assert store.bytes <= store.max_bytes and store.bytes == accounted(store)


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_store_state_machine_never_exceeds_its_budget_or_serves_stale_values = StoreMachine.TestCase
test_store_state_machine_never_exceeds_its_budget_or_serves_stale_values.__doc__ = (
    "If any sequence of writes, deletes, reads, forgets, sweeps and clock moves is applied, then the "
    "accounted bytes never exceed max_bytes and match what is held, and reads serve only the newest write.")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 3000)), max_size=60),
       st.integers(ENTRY_OVERHEAD + 10, 5000))
def test_accounted_bytes_never_exceed_max_bytes(writes, max_bytes):
    """
    If any sequence of writes of any sizes is applied, then after each one the accounted bytes are within
    the budget; an entry is refused only if it alone could never fit, and one taken is served.
    """
    store, _, _ = make_store(max_bytes=max_bytes)
    for wall, (key, size) in enumerate(writes):
        entry = put(key, b"x" * size, wall)
        try:
            store.apply(entry)
        except EntryTooLarge:
            assert entry.size > max_bytes
        else:
            assert store.get(key) == entry
        assert store.bytes <= max_bytes


# -- tombstones ----------------------------------------------------------------------------------------

def test_delete_leaves_a_tombstone_that_reads_skip():
    """
    If a key is deleted, then a tombstone holds its version, ``get`` and ``keys`` skip it, ``current``
    returns it, and ``entries`` includes it only when asked to.
    """
    store, _, _ = make_store()
    store.apply(put("k", b"1", 1))
    store.apply(put("other", b"2", 1))
    result = store.apply(tomb("k", 2))
    assert result == ApplyResult(True, True)
    assert store.get("k") is None
    assert all_keys(store) == ["other"]
    assert store.current("k") == tomb("k", 2)
    assert store.tombstone_count == 1
    assert sorted(e.key for e in store.entries()) == ["k", "other"]
    assert [e.key for e in store.entries(include_tombstones=False)] == ["other"]
    assert store.bytes == put("other", b"2", 1).size + tomb("k", 2).size


def test_older_write_cannot_resurrect_a_deleted_key():
    """
    If a write older than the delete arrives after it (a slow replica), then it is refused and the key stays
    deleted; a newer write brings the key back and removes the tombstone.
    """
    store, _, _ = make_store()
    store.apply(put("k", b"1", 1))
    store.apply(tomb("k", 3))
    assert store.apply(put("k", b"stale", 2)) == ApplyResult(False, False, (3, 0, "n1"))
    assert store.get("k") is None
    assert store.apply(put("k", b"new", 4)) == ApplyResult(True, False)
    assert store.get("k").value == b"new"
    assert store.tombstone_count == 0
    assert store.bytes == put("k", b"new", 4).size


def test_tombstones_are_collected_after_the_grace_period_and_not_before():
    """
    If a tombstone is older than ``tombstone_grace``, then a sweep drops it and its bytes; a younger one is
    kept.
    """
    store, clock, events = make_store(tombstone_grace=60)
    store.apply(tomb("old", 1))
    clock.advance(30)
    store.apply(tomb("young", 1))
    clock.advance(29)
    store.sweep()
    assert store.tombstone_count == 2
    clock.advance(1)
    store.sweep()
    assert store.tombstone_count == 1
    assert store.current("old") is None
    assert store.current("young") == tomb("young", 1)
    assert store.bytes == tomb("young", 1).size
    assert events.expirations == []


def test_rewritten_tombstone_gets_a_fresh_grace_period():
    """
    If a deleted key is deleted again with a newer version, then its tombstone's grace period starts again.
    """
    store, clock, _ = make_store(tombstone_grace=60)
    store.apply(tomb("k", 1))
    store.apply(tomb("other", 1))
    clock.advance(50)
    store.apply(tomb("k", 2))
    clock.advance(20)
    store.sweep()
    assert store.current("k") == tomb("k", 2)
    assert store.current("other") is None


def test_delete_of_an_unknown_key_still_records_the_tombstone():
    """
    If a delete arrives for a key the store never held, then the tombstone is kept, so that an older write
    arriving later is refused.
    """
    store, _, _ = make_store()
    assert store.apply(tomb("k", 5)) == ApplyResult(True, False)
    assert not store.apply(put("k", b"1", 4)).applied


# -- versions and order independence -------------------------------------------------------------------

def test_apply_reports_whether_it_applied_and_whether_a_live_value_existed():
    """
    If entries of various ages arrive, then ``apply`` keeps the newest and reports ``applied`` and
    ``had_live`` accordingly, and the newer version it holds when it keeps it; an equal version is not
    applied again.
    """
    store, _, _ = make_store()
    assert store.apply(put("k", b"1", 2)) == ApplyResult(True, False)
    assert store.apply(put("k", b"0", 1)) == ApplyResult(False, True, (2, 0, "n1"))
    assert store.apply(put("k", b"1", 2)) == ApplyResult(False, True)
    assert store.apply(put("k", b"2", 3)) == ApplyResult(True, True)
    assert store.get("k").value == b"2"


def snapshot(store: Store):
    return (sorted(((e.key, e.value, e.version, e.expires_at) for e in store.entries()), key=repr),
            all_keys(store), store.bytes, store.tombstone_count)


ENTRIES = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 20), st.sampled_from(["n1", "n2", "n3"]),
              st.one_of(st.none(), st.binary(max_size=8)), st.one_of(st.none(), st.floats(1, 100))),
    max_size=25,
    unique_by=lambda item: (item[0], item[1], item[2]),
)


@settings(max_examples=150, deadline=None)
@given(ENTRIES, st.randoms(use_true_random=False))
def test_applying_the_same_entries_in_any_order_gives_the_same_state(items, random):
    """
    If the same set of entries (writes with and without TTLs, deletes; one entry per version) is applied in
    two different orders, then the two stores end in the same state.
    """
    entries = [Entry(key, value, (wall, 0, node), None if ttl is None else START + ttl)
               for key, wall, node, value, ttl in items]
    shuffled = list(entries)
    random.shuffle(shuffled)
    first, _, _ = make_store()
    second, _, _ = make_store()
    for entry in entries:
        first.apply(entry)
    for entry in shuffled:
        second.apply(entry)
    assert snapshot(first) == snapshot(second)
    for key in "abcd":
        newest = max((e for e in entries if e.key == key), key=lambda e: e.version, default=None)
        assert first.current(key) == newest


def internal_state(store: Store):
    """
    Everything a store holds, in its order (the LRU order of the live entries, the order of the tombstones).
    """
    return (list(store._live.items()), list(store._spill.items()), list(store._tombstones.items()),
            store._node_ids, sorted(store._expiries), store.bytes, store.released_bytes, store.changes,
            store.evictions, store.expirations, all_keys(store))


BATCH_ENTRIES = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d", "é", "f" * 40]), st.integers(0, 20),
              st.sampled_from(["n1", "n2", "n3"]),
              st.one_of(st.none(), st.binary(max_size=8), st.binary(min_size=60, max_size=90)),
              st.sampled_from([None, None, 5.0, 50.0, -1.0]) | st.floats(-5, 100),
              st.sampled_from([0, 0, 0, 2 ** 40])),
    max_size=30)


@settings(max_examples=300, deadline=None)
@given(BATCH_ENTRIES, BATCH_ENTRIES, st.sampled_from([1 << 20, 800, 500, 300]), st.sampled_from([None, 3]),
       st.booleans())
def test_if_entries_are_applied_as_a_batch_then_results_and_state_are_those_of_one_by_one(
        before, batch, budget, mask, list_first):
    """
    If a batch of entries (new keys, replaced values, older versions, deletes, TTLs, expired writes, versions
    too wide for the header, keys sharing a slot, a budget that evicts) is applied with ``apply_many``, then
    each result, and everything the store holds after, in its order, are what ``apply`` one entry at a time
    gives.
    """
    def entries(items):
        return [Entry(key, value, (wall + wide, 0, node), None if ttl is None else START + ttl)
                for key, wall, node, value, ttl, wide in items]

    saved = store_module._SLOT_MASK
    if mask is not None:
        store_module._SLOT_MASK = mask  # a few slots: keys share them
    try:
        one, clock, _ = make_store(budget)
        many, _, _ = make_store(budget)
        many._seconds = many._monotonic = clock.seconds
        for store in (one, many):
            for entry in entries(before):
                try:
                    store.apply(entry)
                except EntryTooLarge:
                    pass
            if list_first:
                store.keys()  # a cached list of keys, which a change must drop
        clock.advance(10)
        expected = []
        try:
            for entry in entries(batch):
                expected.append(one.apply(entry))
        except EntryTooLarge:
            expected.append(EntryTooLarge)
        got = []
        try:
            got = many.apply_many(entries(batch))
        except EntryTooLarge:
            got = expected[:-1] + [EntryTooLarge]
        assert got == expected
        assert internal_state(many) == internal_state(one)
    finally:
        store_module._SLOT_MASK = saved


# -- forget --------------------------------------------------------------------------------------------

def test_forget_drops_only_the_matching_version():
    """
    If ``forget`` names an older version than the store holds, then the newer entry stays; if it names the
    held version, then the entry goes without leaving a tombstone.
    """
    store, _, _ = make_store()
    store.apply(put("k", b"2", 2))
    assert not store.forget("k", (1, 0, "n1"))
    assert not store.forget("k", (2, 0, "n2"))
    assert store.get("k").value == b"2"
    assert store.forget("k", (2, 0, "n1"))
    assert store.current("k") is None
    assert (store.tombstone_count, store.bytes, len(store)) == (0, 0, 0)
    assert not store.forget("missing", (2, 0, "n1"))


def test_forget_drops_a_tombstone_of_the_matching_version():
    """
    If ``forget`` names the version of a tombstone, then the tombstone and its bytes go.
    """
    store, _, _ = make_store()
    store.apply(tomb("k", 3))
    assert not store.forget("k", (2, 0, "n1"))
    assert store.tombstone_count == 1
    assert store.forget("k", (3, 0, "n1"))
    assert (store.tombstone_count, store.bytes) == (0, 0)


# -- keys paging ---------------------------------------------------------------------------------------

def test_keys_are_listed_in_code_point_order_with_prefix_after_and_limit():
    """
    If keys are listed with a prefix, a start key and a limit, then exactly the matching keys after the
    start key come back, in code point order, at most ``limit`` of them.
    """
    store, _, _ = make_store()
    for key in ["b", "a/2", "a/1", "a/10", "a", "ab", "Z", "é"]:
        store.apply(put(key, b"1", 1))
    assert all_keys(store) == ["Z", "a", "a/1", "a/10", "a/2", "ab", "b", "é"]
    assert store.keys(prefix="a/") == ["a/1", "a/10", "a/2"]
    assert store.keys(prefix="a/", after="a/1") == ["a/10", "a/2"]
    assert store.keys(prefix="a/", limit=2) == ["a/1", "a/10"]
    assert store.keys(prefix="a/", after="a") == ["a/1", "a/10", "a/2"]
    assert store.keys(prefix="a/", after="a/zz") == []
    assert store.keys(prefix="a", after="a") == ["a/1", "a/10", "a/2", "ab"]
    assert store.keys(after="b") == ["é"]
    assert store.keys(prefix="nothing") == []


def test_keys_listing_sees_keys_written_after_an_earlier_listing():
    """
    If a key is added, replaced or deleted after a listing, then the next listing reflects the change.
    """
    store, _, _ = make_store()
    store.apply(put("b", b"1", 1))
    assert all_keys(store) == ["b"]
    store.apply(put("a", b"1", 1))
    assert all_keys(store) == ["a", "b"]
    store.apply(tomb("b", 2))
    assert all_keys(store) == ["a"]
    store.apply(put("b", b"2", 3))
    assert all_keys(store) == ["a", "b"]


@settings(max_examples=100, deadline=None)
@given(st.sets(st.text(alphabet="ab/é", max_size=5), max_size=40), st.text(alphabet="ab/", max_size=2),
       st.integers(1, 7), st.sets(st.text(alphabet="ab/é", max_size=5), max_size=10))
def test_paging_through_keys_yields_every_matching_key_exactly_once(keys, prefix, limit, deleted):
    """
    If a client pages through the keys with a prefix (each page starting after the last key of the one
    before), then it sees every live key with that prefix exactly once, in order, and no deleted key.
    """
    store, _, _ = make_store()
    for key in keys:
        store.apply(put(key, b"1", 1))
    for key in deleted:
        store.apply(tomb(key, 2))
    seen: List[str] = []
    after = None
    while True:
        page = store.keys(prefix=prefix, after=after, limit=limit)
        assert len(page) <= limit
        if not page:
            break
        seen.extend(page)
        after = page[-1]
    assert seen == sorted(key for key in keys - deleted if key.startswith(prefix))


def test_an_already_expired_newer_write_still_hides_older_ones_in_any_order():
    """
    If a newer write arrives already expired, then an older write arriving after it does not bring the
    older value back: both orders end with the key absent.
    """
    clock = Clock()
    clock.advance(100)
    older = Entry("k", b'"old"', (50_000, 0, "a"))
    newer_expired = Entry("k", b'"new"', (60_000, 0, "b"), expires_at=90.0)
    for order in ([older, newer_expired], [newer_expired, older]):
        store = Store(clock.seconds, 1 << 20)
        for entry in order:
            store.apply(entry)
        assert store.get("k") is None
        assert store.keys() == []


# -- the packed representation -------------------------------------------------------------------------

def test_hits_keep_the_least_recently_used_order():
    """
    If keys are read in some order, then evictions take them in the order of their last use (write or read),
    oldest first, however often each was read.
    """
    entries = [put(key, b"x" * 10, 1) for key in "abcd"]
    store, _, _ = make_store(max_bytes=budget_for(entries))
    for entry in entries:
        store.apply(entry)
    for key in ["b", "a", "b", "c", "a"]:
        assert store.get(key) is not None
    # Least recently used first: d, b, c, a.
    evicted = []
    for wall, key in enumerate("efgh", start=2):
        before = set(all_keys(store))
        store.apply(put(key, b"x" * 10, wall))
        evicted.extend(sorted(before - set(all_keys(store))))
    assert evicted == ["d", "b", "c", "a"]
    assert all_keys(store) == ["e", "f", "g", "h"]


def test_eviction_from_a_large_store_takes_a_batch_and_stays_within_the_budget():
    """
    If a store of many keys is over its budget, then it evicts the oldest keys in batches of at least 1/64 of
    its keys (one ``evicted(n)`` report each), the accounted bytes never exceed ``max_bytes``, and no more
    than a batch's worth of room is left unused.
    """
    size = put("k00000", b"x" * 20, 1).size
    store, _, events = make_store(max_bytes=1000 * size)
    for i in range(5000):
        store.apply(put("k%05d" % (i,), b"x" * 20, 1))
        assert store.bytes <= store.max_bytes
        assert len(store) >= min(i + 1, 1000 - 1000 // 64 - 1)
    assert store.evictions == 5000 - len(store)
    assert min(events.evictions) >= 1000 // 64
    assert store.bytes == accounted(store)
    # The oldest went: what is left is the newest keys.
    assert all_keys(store) == ["k%05d" % (i,) for i in range(5000 - len(store), 5000)]


def test_steady_eviction_through_a_large_store_is_not_quadratic():
    """
    If many more keys are written than the budget holds, then eviction works in batches, so each write costs
    about the same however many were evicted before: 200k writes through a budget of 50k keys finish quickly
    (a walk from the front of the dict per evicted key would take minutes, not seconds).
    """
    size = put("k0000000", b"x" * 10, 1).size
    store, _, events = make_store(max_bytes=50000 * size)
    started = time.monotonic()
    for i in range(200000):
        store.apply(put("k%07d" % (i,), b"x" * 10, 1))
    elapsed = time.monotonic() - started
    assert store.bytes <= store.max_bytes
    assert store.evictions == 200000 - len(store) > 140000
    assert len(events.evictions) <= store.evictions // 500
    assert elapsed < 60


def test_entries_can_be_consumed_while_the_store_changes():
    """
    If the store changes while ``entries()`` is being consumed, then the iteration goes on: it yields the
    entries held when it was called, each at most once and as held when reached (a newer version, a
    tombstone revived meanwhile, or the tombstone an expired entry leaves), skips live entries that are gone
    (deleted, forgotten), and leaves out keys added since.
    """
    store, clock, _ = make_store()
    for i in range(10):
        store.apply(put("k%d" % (i,), b"v", 1))
    store.apply(tomb("ttl", 0))  # so that the entry below leaves a tombstone
    store.apply(put("ttl", b"v", 1, ttl=5))
    store.apply(tomb("t", 1))
    iterator = store.entries()
    first = next(iterator)
    assert first.key == "k0"
    store.apply(put("k1", b"newer", 2))
    store.apply(tomb("k2", 2))
    store.forget("k3", (1, 0, "n1"))
    store.apply(put("t", b"revived", 2))
    store.apply(put("added", b"v", 1))
    clock.advance(10)
    rest = {entry.key: entry for entry in iterator}
    keys = [first.key] + list(rest)
    assert len(keys) == len(set(keys))
    assert set(keys) == {"k0", "k1", "k4", "k5", "k6", "k7", "k8", "k9", "t", "ttl"}
    assert rest["k1"].value == b"newer"
    assert rest["t"].value == b"revived"
    assert rest["ttl"] == tomb("ttl", 1)


def test_entries_snapshot_is_taken_when_called_not_when_first_consumed():
    """
    If keys are added after ``entries()`` is called but before its first item is read, then they are not
    yielded, and a key deleted in between is not yielded either (its delete is a replicated write of its
    own).
    """
    store, _, _ = make_store()
    store.apply(put("a", b"1", 1))
    store.apply(put("b", b"1", 1))
    everything = store.entries()
    live_only = store.entries(include_tombstones=False)
    store.apply(put("c", b"1", 1))
    store.apply(tomb("b", 2))
    assert [(e.key, e.value) for e in everything] == [("a", b"1")]
    assert [e.key for e in live_only] == ["a"]


def test_non_ascii_keys_are_listed_in_code_point_order():
    """
    If keys from every range of Unicode are stored, then listing and paging give them in code point order
    (astral characters after U+FFFF, unlike UTF-16 order), with non-ASCII prefixes and start keys; a key with
    a lone surrogate, which no stored key can hold, is reported absent and still orders by code point.
    """
    keys = ["z", "é", "éa", "\u07ff", "\u0800", "\ud7ff", "\ue000", "\uffff", "\U00010000", "\U0001d11e",
            "\U0010ffff", "a\U0001f600", "a\uffff"]
    store, _, _ = make_store()
    for key in keys:
        store.apply(put(key, b"1", 1))
    assert all_keys(store) == sorted(keys)
    assert store.keys(prefix="é") == ["é", "éa"]
    assert store.keys(after="\uffff") == ["\U00010000", "\U0001d11e", "\U0010ffff"]
    assert store.keys(prefix="a", after="a\uffff") == ["a\U0001f600"]
    assert store.keys(after="\ud800") == ["\ue000", "\uffff", "\U00010000", "\U0001d11e", "\U0010ffff"]
    assert store.get("\ud800") is None
    assert store.current("\ud800") is None
    assert not store.forget("\ud800", (1, 0, "n1"))
    assert sorted(e.key for e in store.entries()) == sorted(keys)
    for key in keys:
        assert store.get(key) == put(key, b"1", 1)


VERSIONS = [
    (0, 0, ""),
    (1700000000000, 3, "n1"),
    (1700000000000, 3, "node-é-\U0001f600"),
    (2 ** 64 - 1, 2 ** 32 - 1, "n" * 300),
    # Out of the packed header's range: kept exactly all the same.
    (2 ** 64, 0, "n1"),
    (5, 2 ** 32, "n2"),
    (10 ** 30, 10 ** 30, "n3"),
    (-5, 0, "n1"),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("expires_at", [None, START + 0.123456789, float("inf")])
def test_versions_and_expiries_come_back_exactly(version, expires_at):
    """
    If an entry or a tombstone of any version (any node id, wall times and counters in and out of the packed
    range) and any expiry is stored, then every read returns exactly that version and expiry.
    """
    store, _, _ = make_store()
    entry = Entry("k", b"value", version, expires_at)
    store.apply(entry)
    assert store.get("k") == entry
    assert store.get("k").size == entry.size
    assert list(store.entries()) == [entry]
    assert store.forget("k", version)
    deleted = Entry("k", None, version, expires_at)
    store.apply(deleted)
    assert store.current("k") == deleted
    assert list(store.entries()) == [deleted]
    assert store.bytes == deleted.size == accounted(store)


def test_node_ids_compare_by_name_not_by_the_order_they_were_first_seen():
    """
    If writes with equal wall times and counters come from node ids first seen in reverse name order, then
    the node id tie-break still follows the names.
    """
    store, _, _ = make_store()
    store.apply(put("x", b"1", 1, node="c"))
    store.apply(put("y", b"1", 1, node="b"))
    store.apply(put("k", b"b", 5, node="b"))
    assert not store.apply(put("k", b"a", 5, node="a")).applied
    assert store.apply(put("k", b"c", 5, node="c")).applied
    assert store.get("k").version == (5, 0, "c")
    assert not store.forget("k", (5, 0, "b"))
    assert store.forget("k", (5, 0, "c"))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("older_arrives", ["before", "after", "never"])
def test_the_tombstone_mark_survives_packing_and_reads_for_every_version(version, older_arrives):
    """
    If an entry with a TTL of any version (in and out of the packed header's range) replaced an older version
    of its key, or an older version arrived after it and was refused, then until it expires every read
    gives back exactly that entry (key, value, version, expiry) and lists its key, and when it expires it
    leaves a tombstone of exactly its version; if no older version ever arrived, it leaves nothing.
    """
    store, clock, _ = make_store()
    older = Entry("k", b"older", (version[0] - 1, 0, "n1"))
    entry = Entry("k", b"value", version, START + 10)
    if older_arrives == "before":
        store.apply(older)
    store.apply(entry)
    if older_arrives == "after":
        assert store.apply(older) == ApplyResult(False, True, version)
    for _ in range(2):  # a read puts the entry back as the most recently used: the mark goes with it
        assert store.get("k") == entry
    assert list(store.entries()) == [entry]
    assert all_keys(store) == ["k"]
    assert store.bytes == entry.size == accounted(store)
    clock.advance(10)
    store.sweep()
    if older_arrives == "never":
        assert (store.current("k"), store.tombstone_count, store.bytes) == (None, 0, 0)
    else:
        assert store.current("k") == Entry("k", None, version)
        assert store.bytes == Entry("k", None, version).size == accounted(store)


def test_an_older_version_refused_by_a_batch_marks_the_entry_it_lost_to():
    """
    If a batch brings an older value of a key whose entry has a TTL, then the value is refused and the entry
    leaves a tombstone when it expires, as when the value comes alone.
    """
    store, clock, _ = make_store()
    store.apply(put("k", b"new", 2, ttl=5))
    assert store.apply_many([put("k", b"old", 1)]) == [ApplyResult(False, True, (2, 0, "n1"))]
    clock.advance(5)
    assert store.sweep() == 1
    assert store.current("k") == tomb("k", 2)


@settings(max_examples=150, deadline=None)
@given(ENTRIES, st.randoms(use_true_random=False))
def test_applying_the_same_entries_in_any_order_leaves_the_same_tombstones_once_they_expire(items, random):
    """
    If the same set of entries is applied in two different orders, then once every TTL has ended the two
    stores hold the same tombstones: an entry that an older version of its key reached, before it or after
    it, leaves one, whichever came first.
    """
    entries = [Entry(key, value, (wall, 0, node), None if ttl is None else START + ttl)
               for key, wall, node, value, ttl in items]
    shuffled = list(entries)
    random.shuffle(shuffled)
    first, clock, _ = make_store()
    second, _, _ = make_store()
    second._seconds = second._monotonic = clock.seconds
    for entry in entries:
        first.apply(entry)
    for entry in shuffled:
        second.apply(entry)
    clock.advance(100)
    first.sweep()
    second.sweep()
    assert snapshot(first) == snapshot(second)


def test_a_key_too_long_for_the_length_field_without_its_mark_is_refused():
    """
    If an entry's key is 32768 bytes or more (no peer or client sends one: their caps are far lower), then
    the store refuses it rather than read the length's top bit as the tombstone mark, and holds nothing.
    """
    store, _, _ = make_store(max_bytes=1 << 20)
    longest, too_long = "k" * 32767, "k" * 32768
    store.apply(tomb(too_long, 1))  # a tombstone is filed by its key: its header holds no key length
    for apply in (store.apply, lambda entry: store.apply_many([entry])):
        with pytest.raises(ValueError):
            apply(put(too_long, b"v", 2))
        assert store.current(too_long) == tomb(too_long, 1)
    assert store.apply(put(longest, b"v", 1)).applied
    assert store.get(longest).value == b"v"
    assert (len(store), store.bytes) == (1, put(longest, b"v", 1).size + tomb(too_long, 1).size)


class _SteppedWall:
    """
    A wall clock that runs with a monotonic one, plus whatever step NTP (or an operator) gives it.
    """

    def __init__(self, monotonic: Clock) -> None:
        self._monotonic = monotonic
        self.step = 0.0

    def seconds(self) -> float:
        return START + self._monotonic.seconds() + self.step


def _node_store(grace: float):
    from kvresponder.node import Node
    from tests.support import make_settings
    monotonic = Clock()
    wall = _SteppedWall(monotonic)
    node = Node(make_settings(tombstone_grace=grace), Clock(), None, wall=wall.seconds, monotonic=monotonic.seconds)
    return node.store, monotonic, wall


def test_a_forward_step_of_the_wall_clock_does_not_collect_a_tombstone_before_its_grace():
    """
    If the node's wall clock steps forward by more than TOMBSTONE_GRACE (a bad NTP source, a host clock set
    by hand) just after a delete, then the node still keeps the delete's tombstone for TOMBSTONE_GRACE seconds
    of real time: an older copy of the value, from a replica or hint that missed the delete, is refused and the
    key stays deleted.
    """
    store, monotonic, wall = _node_store(grace=600)
    store.apply(put("k", b'"old"', 1))
    store.apply(tomb("k", 2))
    monotonic.advance(1)
    wall.step = 3600.0
    store.sweep()
    monotonic.advance(1)
    wall.step = 0.0  # corrected
    store.sweep()
    assert store.current("k") == tomb("k", 2)
    assert not store.apply(put("k", b'"old"', 1)).applied
    assert store.get("k") is None
    monotonic.advance(600)
    store.sweep()
    assert store.current("k") is None and store.bytes == 0


def test_tombstones_written_while_the_wall_clock_ran_ahead_hold_back_no_later_ones():
    """
    If tombstones were written while the wall clock ran an hour ahead, and it was then set right, then the
    tombstones written after are still collected once their grace is over (not an hour later, behind the
    ones stamped ahead), and so are the ones stamped ahead: memory does not fill with tombstones, which live
    entries are evicted to keep.
    """
    store, monotonic, wall = _node_store(grace=60)
    wall.step = 3600.0
    store.apply(tomb("ahead", 1))
    monotonic.advance(1)
    wall.step = 0.0
    for second in range(120):
        store.apply(tomb("k%d" % (second,), 2))
        monotonic.advance(1)
        store.sweep()
        assert store.tombstone_count <= 62
    monotonic.advance(60)
    store.sweep()
    assert (store.tombstone_count, store.bytes) == (0, 0)


def test_a_version_check_that_is_not_a_use_gives_what_current_gives_and_leaves_the_lru_order():
    """
    If a key's newest entry is looked up without counting as a use (``current(key, use=False)``: the node's
    own anti-entropy), then it is the entry ``current`` gives, and the LRU order stays as it was.
    """
    store, clock, _ = make_store()
    for wall, key in enumerate("abc"):
        store.apply(put(key, b"1", wall))
    store.apply(tomb("t", 5))
    order = list(store._live)
    assert [store.current(key, use=False) for key in "cbatz"] == [
        put("c", b"1", 2), put("b", b"1", 1), put("a", b"1", 0), tomb("t", 5), None]
    assert list(store._live) == order
    assert [store.current(key) for key in "cbatz"] == [store.current(key, use=False) for key in "cbatz"]


def _held_by(build) -> int:
    """
    The bytes of memory what ``build()`` returns takes, by tracemalloc (CPython), while it is held.
    """
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()  # noqa: F841 (held while measured)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="tracemalloc measures CPython's allocations")
@pytest.mark.parametrize("rounds", [1, 4])
def test_the_memory_of_entries_with_a_ttl_stays_within_their_accounted_size(rounds):
    """
    If a store is filled with small entries that have a TTL (and they are then overwritten, each with a new
    TTL, ``rounds - 1`` times, with the sweep running as on a node), then the memory the store takes stays
    within its accounted bytes: MAX_MEMORY bounds the process for a TTL workload as for any other
    (docs/ARCHITECTURE.md, "Memory accounting and eviction"), the expiry each entry is tracked by included.
    """
    count = 20000

    def build():
        clock = Clock()
        clock.advance(START)
        store = Store(clock.seconds, 1 << 30)
        wall = 0
        for _ in range(rounds):
            for i in range(count):
                wall += 1
                store.apply(Entry("k%09d" % (i,), b"v" * 100, (wall, 0, "n1"), clock.seconds() + 3600))
            clock.advance(1)
            store.sweep()
        return store

    store = build()
    held = _held_by(build)
    assert held <= store.bytes, "%.0f bytes a key held, %.0f accounted" % (
        (held - 110 * count) / count, (store.bytes - 110 * count) / count)


@pytest.mark.parametrize("many", [False, True])
def test_if_another_value_arrives_with_the_version_held_then_it_is_answered_as_newer_and_not_stored(many):
    """
    If an entry arrives stamped with the very version the store holds for its key but with another value (a
    node issued one version twice: its clock set back across a restart), then it is not stored and the answer
    names the held version as newer, so that its writer stamps it again; the same entry again (a copy sent
    twice) is answered as held, with no newer version.
    """
    store, _, _ = make_store()
    version = (1_000, 0, "n1")
    store.apply(Entry("k", b'"a"', version))
    apply = (lambda entry: store.apply_many([entry])[0]) if many else store.apply
    assert apply(Entry("k", b'"b"', version)) == ApplyResult(False, True, version)
    assert apply(Entry("k", None, version)) == ApplyResult(False, True, version)
    assert apply(Entry("k", b'"a"', version)) == ApplyResult(False, True)
    assert store.get("k").value == b'"a"'


def test_if_a_value_arrives_with_the_version_of_a_tombstone_held_then_it_is_answered_as_newer():
    """
    If a value arrives stamped with the version of the tombstone the store holds, then it is answered as newer
    and the key stays deleted; the tombstone's own version again is a copy already held.
    """
    store, _, _ = make_store()
    version = (1_000, 0, "n1")
    store.apply(Entry("k", None, version))
    assert store.apply(Entry("k", b'"b"', version)) == ApplyResult(False, False, version)
    assert store.apply(Entry("k", None, version)) == ApplyResult(False, False)
    assert store.get("k") is None
