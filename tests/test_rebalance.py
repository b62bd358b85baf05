"""
The rebalancer's walks over the store yield to the reactor by time as well as by count, so that a pass over
a large store (cold code on PyPy, a slow machine) does not hold requests up.
"""

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from kvresponder.rebalance import CHECK_EVERY, CHUNK, MAX_REST, SLICE, _Slices


class _Ticking:
    """A clock that moves ``step`` seconds every time it is read: a walk doing slow work per entry."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def seconds(self) -> float:
        self.now += self.step
        return self.now


def _yield_points(clock, entries: int):
    slices = _Slices(clock)
    return [index for index in range(1, entries + 1) if slices.due()]


def test_a_fast_walk_yields_only_every_chunk_of_entries():
    assert _yield_points(Clock(), 3 * CHUNK + 5) == [CHUNK, 2 * CHUNK, 3 * CHUNK]


def test_a_slow_walk_yields_once_its_slice_of_time_is_spent():
    # Each look at the clock finds 0.6 of a slice more gone: the walk yields at the second look.
    points = _yield_points(_Ticking(SLICE * 0.6), 10 * CHECK_EVERY)
    assert points[0] == 2 * CHECK_EVERY
    assert points[0] < CHUNK


def test_the_slice_restarts_after_a_pause():
    clock = Clock()
    slices = _Slices(clock)
    clock.advance(SLICE * 2)
    assert [slices.due() for _ in range(CHECK_EVERY)][-1] is True
    d = ensureDeferred(slices.pause())
    clock.advance(0)
    assert d.called
    assert not any(slices.due() for _ in range(CHECK_EVERY))


def test_a_background_walk_rests_after_each_slice_to_keep_to_its_share():
    """
    If a walk goes in the background (a quarter of the reactor's time), then after a slice of work it rests
    three times that slice before it goes on.
    """
    clock = Clock()
    slices = _Slices(clock, background=True)
    clock.advance(SLICE)
    d = ensureDeferred(slices.pause())
    clock.advance(3 * SLICE - 0.0001)
    assert not d.called
    clock.advance(0.0001)
    assert d.called


def test_a_background_walk_rests_at_most_max_rest_after_a_long_slice():
    """
    If one slice ran long (a collection, the JIT compiling), then the rest after it is cut to MAX_REST.
    """
    clock = Clock()
    slices = _Slices(clock, background=True)
    clock.advance(10.0)
    d = ensureDeferred(slices.pause())
    clock.advance(MAX_REST)
    assert d.called


def test_a_walk_at_full_share_yields_one_turn_only():
    clock = Clock()
    slices = _Slices(clock)
    clock.advance(SLICE * 2)
    d = ensureDeferred(slices.pause())
    clock.advance(0)
    assert d.called


# -- which walks go in the background ---------------------------------------------------------------------

from kvresponder.hlc import HybridLogicalClock  # noqa: E402
from kvresponder.metrics import Metrics  # noqa: E402
from kvresponder.rebalance import ANTI_ENTROPY, Rebalancer  # noqa: E402
from kvresponder.ring import HashRing  # noqa: E402
from kvresponder.store import ApplyResult, Entry, Store  # noqa: E402


class _Peer:
    def __init__(self, node_id: str) -> None:
        self.node_id, self.address, self.port = node_id, "127.0.0.1", 1


class _AskedPeers:
    """A peer client whose peers hold everything already: it records what each sync asked for."""

    timeout = 1.0

    def __init__(self) -> None:
        self.background = []

    async def differing_buckets(self, peer, sender, buckets, background=False):
        self.background.append(background)
        return []


def _rebalancer(clock, peers, max_bytes: int = 1 << 20, ring=None) -> Rebalancer:
    store = Store(clock.seconds, max_bytes)
    hlc = HybridLogicalClock(lambda: 1_700_000_000.0, "n1")
    for index in range(20):
        store.apply(Entry("k%d" % (index,), b'"v"', hlc.now(), None))
    ring = ring if ring is not None else HashRing(["n1", "n2"])
    return Rebalancer("n1", store, lambda: ring, _Peer, peers, clock, 2, Metrics("t1"))


def test_the_periodic_pass_asks_its_peers_for_a_background_walk_and_a_re_replication_does_not():
    """
    If the periodic anti-entropy pass syncs with a co-owner, then it asks for the peer's digest in the
    background; a pass after a membership change (the replication factor is short until it is done) does not.
    """
    clock, peers = Clock(), _AskedPeers()
    rebalancer = _rebalancer(clock, peers)
    for reason in ("anti-entropy", "leave:n3"):
        done = rebalancer.run_pass(reason)
        clock.pump([0.01] * 100)
        assert done.called
    assert peers.background == [True, False]


class _HeldPeers(_AskedPeers):
    """As _AskedPeers, but the first sync's answer waits until ``release``: a pass kept running."""

    def __init__(self) -> None:
        _AskedPeers.__init__(self)
        self.held = Deferred()

    async def differing_buckets(self, peer, sender, buckets, background=False):
        self.background.append(background)
        if len(self.background) == 1:
            await self.held
        return []


def test_a_pass_asked_for_after_the_periodic_one_was_queued_goes_at_full_speed():
    """
    If the periodic anti-entropy pass is queued behind a running pass, and then a pass that must not wait in
    the background is asked for (a drain's, a membership change's), then the one pass that runs next is that
    one: it asks its peers for a full-speed walk, not the periodic pass's background one.
    """
    clock, peers = Clock(), _HeldPeers()
    rebalancer = _rebalancer(clock, peers)
    first = rebalancer.run_pass("leave:n3")
    clock.pump([0.01] * 10)
    periodic = rebalancer.run_pass(ANTI_ENTROPY)
    urgent = rebalancer.run_pass("leave:n4")
    peers.held.callback(None)
    clock.pump([0.01] * 100)
    assert first.called and periodic.called and urgent.called
    assert peers.background == [False, False]


def test_the_periodic_tick_that_comes_while_a_membership_changes_pass_is_scheduled_runs_that_pass_at_full_speed():
    """
    If the periodic tick asks for its pass while a membership change's pass waits out its debounce, then the one
    pass that runs is the change's: it asks its peers for a full-speed walk (and its sync leaves out nothing
    recent), not the periodic pass's background one, which kept copies missing after a death for longer.
    """
    clock, peers = Clock(), _AskedPeers()
    rebalancer = _rebalancer(clock, peers)
    rebalancer.trigger("dead:n3")
    clock.advance(rebalancer.debounce / 2)
    done = rebalancer.run_pass(ANTI_ENTROPY)
    clock.pump([0.01] * 100)
    assert done.called
    assert peers.background == [False]


class _SlowClock(Clock):
    """A reactor clock that moves ``step`` seconds every time it is read: a walk doing slow work per entry."""

    def __init__(self, step: float) -> None:
        Clock.__init__(self)
        self.step = step

    def seconds(self) -> float:
        self.rightNow += self.step
        return self.rightNow


class _TakingPeers(_AskedPeers):
    async def apply(self, peer, entries, timeout=None):
        return [ApplyResult(True, False)] * len(entries)


def _pass_seconds(reason: str, leaving: bool) -> float:
    clock, peers = _SlowClock(SLICE / CHECK_EVERY), _TakingPeers()
    store = Store(clock.seconds, 64 << 20)
    hlc = HybridLogicalClock(lambda: 1_700_000_000.0, "n1")
    for index in range(4 * CHUNK):
        store.apply(Entry("k%d" % (index,), b'"v"', hlc.now(), None))
    ring = HashRing(["n1", "n2", "n3"])
    rebalancer = Rebalancer("n1", store, lambda: ring, _Peer, peers, clock, 2, Metrics("t1"))
    rebalancer.leaving = leaving
    start = clock.rightNow
    done = rebalancer.run_pass(reason)
    while not done.called:
        clock.advance(0.001)
    return clock.rightNow - start


def test_a_leaving_node_walks_its_store_at_full_speed_even_in_a_periodic_pass():
    """
    If a node that has begun leaving runs the periodic anti-entropy pass (its timer goes on while it drains),
    then that pass walks the store, handing off every entry, as fast as a drain's own pass: not in the
    background, at a quarter of the reactor's time, which held a drain's hand-off back.
    """
    drain = _pass_seconds("drain", leaving=True)
    periodic = _pass_seconds(ANTI_ENTROPY, leaving=True)
    background = _pass_seconds(ANTI_ENTROPY, leaving=False)
    assert background > 2 * drain
    assert periodic < 1.5 * drain


def test_a_peers_periodic_pass_is_answered_from_the_last_pass_however_many_writes_came_since():
    """
    If a peer's periodic pass asks for this node's digest within MAX_DIGEST_AGE of this node's last pass, on
    the same ring, then it gets that pass's digest even after many writes; a re-replication's request, or one
    after MAX_DIGEST_AGE, gets a digest of what the store holds now.
    """
    from kvresponder.rebalance import MAX_DIGEST_AGE
    clock, peers = Clock(), _AskedPeers()
    rebalancer = _rebalancer(clock, peers)
    rebalancer.run_pass("anti-entropy")
    clock.pump([0.01] * 100)
    before = _result(rebalancer.shared_digest("n2", background=True), clock)
    hlc = HybridLogicalClock(lambda: 1_700_000_100.0, "n1")
    for round_ in range(3):
        for index in range(1000):
            rebalancer.store.apply(Entry("k%d" % (index,), b'"w%d"' % (round_,), hlc.now(), None))
    assert _result(rebalancer.shared_digest("n2", background=True), clock) == before
    fresh = _result(rebalancer.shared_digest("n2"), clock)
    assert fresh != before
    clock.advance(MAX_DIGEST_AGE + 1)
    assert _result(rebalancer.shared_digest("n2", background=True), clock) == fresh


def test_walks_over_the_store_leave_the_keys_the_ring_remembers_alone():
    """
    If every stored key is placed by a walk over the store (a periodic pass, a pass after a membership change,
    a digest a peer asks for), then the ring remembers none of them: the places it keeps (``PLACED_KEYS`` at
    most) stay those of the keys clients looked up.
    """
    clock, peers = Clock(), _AskedPeers()
    ring = HashRing(["n1", "n2", "n3"])
    rebalancer = _rebalancer(clock, peers, ring=ring)
    ring.preference_list("a client's key", 2)
    # First, before any pass has left a digest to answer from: a walk of its own.
    _result(rebalancer.shared_digest("n2"), clock)
    for reason in ("anti-entropy", "leave:n4"):
        done = rebalancer.run_pass(reason)
        clock.pump([0.01] * 100)
        assert done.called
    _result(rebalancer.shared_digest("n2"), clock)
    assert list(ring._placed) == ["a client's key"]


def _result(coroutine, clock):
    d = ensureDeferred(coroutine)
    clock.pump([0.01] * 100)
    return d.result


def test_a_keys_bucket_hash_is_the_8_byte_blake2b_that_every_version_uses():
    """
    If a key is hashed for its anti-entropy bucket, then the hash is ``hashlib.blake2b(digest_size=8)`` of its
    UTF-8 bytes, as it always was: peers of other versions or interpreters find the same buckets.
    """
    from hashlib import blake2b

    from kvresponder.rebalance import key_hash
    for key in ("k", "user:42/\u00e9", "x" * 300):
        assert key_hash(key) == int.from_bytes(blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class _LackingPeers(_AskedPeers):
    """A peer client whose peer holds nothing: every bucket differs, and it wants every key it is offered."""

    def __init__(self) -> None:
        _AskedPeers.__init__(self)
        self.offered = []
        self.applied = []

    async def differing_buckets(self, peer, sender, buckets, background=False):
        return sorted(int(bucket) for bucket in buckets)

    async def wanted(self, peer, versions):
        self.offered.append(len(versions))
        return list(versions), set()

    async def apply(self, peer, entries, timeout=None):
        self.applied.extend(entry.key for entry in entries)


def test_a_sync_offers_its_versions_in_calls_of_at_most_versions_per_call():
    """
    If a co-owner lacks more keys than one ``sync/versions`` call carries, then a re-replication offers them in
    calls of at most VERSIONS_PER_CALL versions (each handled by the peer in one reactor turn), and still sends
    every one of them.
    """
    from kvresponder.rebalance import VERSIONS_PER_CALL
    clock, peers = Clock(), _LackingPeers()
    rebalancer = _rebalancer(clock, peers, max_bytes=1 << 30)
    hlc = HybridLogicalClock(lambda: 1_700_000_000.0, "n1")
    keys = 2 * VERSIONS_PER_CALL + 500
    for index in range(keys):
        rebalancer.store.apply(Entry("many%d" % (index,), b'"v"', hlc.now(), None))
    done = rebalancer.run_pass("leave:n3")
    clock.pump([0.01] * 1000)
    assert done.called
    shared = 20 + keys  # two nodes, two replicas: every key is shared with n2
    assert len(rebalancer.store) == shared  # nothing evicted
    assert max(peers.offered) == VERSIONS_PER_CALL
    assert sum(peers.offered) == shared
    assert sorted(peers.applied) == sorted(entry.key for entry in rebalancer.store.entries())


def _store_of_three():
    """
    A store whose budget holds three entries, holding ``a``, ``b`` and ``c`` (written in that order), then
    read by a client: ``a``. The least recently used is ``b``.
    """
    from kvresponder.store import Entry, Store
    clock = Clock()
    entries = [Entry(key, b'"value"', (1, 0, "n1")) for key in "abc"]
    store = Store(clock.seconds, sum(entry.size for entry in entries))
    for entry in entries:
        store.apply(entry)
    assert store.get("a") is not None
    return store, clock


def test_an_anti_entropy_version_check_is_no_use_of_a_key_for_eviction():
    """
    If a co-owner's anti-entropy pass asks this node which of its keys it lacks (every shared key of each
    bucket whose digest differs: a write since the digest was made is enough), then the keys it compares are not made
    the most recently used: a write that needs room still evicts the key clients used least (``b``), not the
    one a client read last (``a``).
    """
    from kvresponder.rebalance import Rebalancer
    from kvresponder.store import Entry
    store, clock = _store_of_three()
    rebalancer = Rebalancer("n1", store, lambda: None, lambda node: None, None, clock, 2, None)
    assert rebalancer.wanted({"c": (1, 0, "n1"), "b": (1, 0, "n1")}) == ([], [])
    store.apply(Entry("d", b'"value"', (2, 0, "n1")))
    assert [key for key in "abcd" if store.get(key) is not None] == ["a", "c", "d"]


def test_sending_a_peer_the_entries_it_lacks_is_no_use_of_them_for_eviction():
    """
    If this node's anti-entropy pass sends a co-owner the entries it lacks, then reading them for that is not
    a use: a write that needs room still evicts the key clients used least.
    """
    from kvresponder.rebalance import Rebalancer
    from kvresponder.store import Entry
    store, clock = _store_of_three()

    class Peers:
        timeout = 1.0

        async def wanted(self, peer, versions):
            return list(versions), set()

        async def apply(self, peer, batch, timeout=None):
            return None

    rebalancer = Rebalancer("n1", store, lambda: None, lambda node: None, Peers(), clock, 2, None)
    sent = [0]
    d = ensureDeferred(rebalancer._send_wanted(object(), {"c": (1, 0, "n1"), "b": (1, 0, "n1")}, sent))
    assert d.called and sent == [2]
    store.apply(Entry("d", b'"value"', (2, 0, "n1")))
    assert [key for key in "abcd" if store.get(key) is not None] == ["a", "c", "d"]


class _RefusingPeers(_AskedPeers):
    async def apply(self, peer, entries, timeout=None):
        from kvresponder.peertransport import PeerError
        raise PeerError("n2 unreachable for apply: ConnectionRefusedError")


class _RefusingOneBatch(_AskedPeers):
    """A peer client whose peers refuse (400) any batch holding ``bad``, and take every other."""

    def __init__(self, bad: str) -> None:
        _AskedPeers.__init__(self)
        self.bad, self.calls = bad, 0

    async def apply(self, peer, entries, timeout=None):
        from kvresponder.peertransport import PeerError
        self.calls += 1
        if any(entry.key == self.bad for entry in entries):
            raise PeerError("n2 answered 400 to apply", 400, "entry_too_large")
        return [ApplyResult(True, False)] * len(entries)


def test_a_batch_an_owner_refuses_holds_back_only_itself_not_the_batches_after_it():
    """
    If an owner answers one hand-off batch with a refusal (a 4xx: an entry its budget cannot hold, during a rolling
    change of memory limits), then the batches after it are still sent and their entries dropped here, and only the
    refused batch's entries stay, pending: stopping at the refusal held back, pass after pass, every entry walked
    after it. An owner that does not answer is still sent nothing more in the pass.
    """
    metrics = Metrics("t1")
    store, peers, done = _drain_pass(1000, lambda store: _RefusingOneBatch(next(iter(store.entries())).key),
                                     nodes=("n1", "n2"), replicas=1, metrics=metrics)
    bad = peers.bad
    assert done.called and done.result == {"handed_off": 900, "repaired": 0, "pending": 100}
    assert peers.calls == 10 and len(store) == 100 and store.current(bad) is not None
    assert 'kv_handoff_entries_total{result="failed",tenant="t1"} 100.0' in metrics.exposition().decode()


def test_a_hand_off_the_owner_refuses_is_a_failed_action_with_the_reason():
    """
    If a hand-off's call to the new owner fails, then its ``rebalance:handoff`` action ends failed, naming the
    reason (the runbook of KVResponderHandoffBacklog looks for these), the entry stays, and it is counted failed.
    """
    from eliot import add_destinations, remove_destination

    clock = Clock()
    store = Store(clock.seconds, 1 << 20)
    store.apply(Entry("k", b'"v"', (1, 0, "n1"), None))
    ring = HashRing(["n2"])
    rebalancer = Rebalancer("n1", store, lambda: ring, _Peer, _RefusingPeers(), clock, 1, Metrics("t1"))
    messages = []
    add_destinations(messages.append)
    # Eliot hands a first destination what was logged before there was one: not this test's.
    del messages[:]
    try:
        done = rebalancer.run_pass("leave:n1")
        clock.pump([0.01] * 20)
    finally:
        remove_destination(messages.append)
    assert done.called and done.result["handed_off"] == 0 and len(store) == 1
    ends = [m for m in messages if m.get("action_type") == "kvresponder:rebalance:handoff"
            and m.get("action_status") != "started"]
    assert [m["action_status"] for m in ends] == ["failed"]
    assert "ConnectionRefusedError" in ends[0]["reason"]


class _FailingSecondApply(_AskedPeers):
    """A co-owner that lacks everything, and takes the first batch sent to it, then fails."""

    def __init__(self) -> None:
        _AskedPeers.__init__(self)
        self.applied = 0

    async def differing_buckets(self, peer, sender, buckets, background=False):
        return [int(bucket) for bucket in buckets]

    async def wanted(self, peer, versions):
        return list(versions), set()

    async def apply(self, peer, entries, timeout=None):
        from kvresponder.peertransport import PeerError
        if self.applied:
            raise PeerError("n2 unreachable for apply: ConnectionRefusedError")
        self.applied += len(entries)
        return [ApplyResult(True, False)] * len(entries)


def test_entries_an_anti_entropy_round_sent_before_it_failed_are_counted_as_repairs(eliot_logger):
    """
    If an anti-entropy round sends a co-owner one batch of the entries it lacks and then fails, then the round is
    counted failed and the entries it did send are counted as repairs (they were not); its ``rebalance:sync``
    action says it broke off (``failed``), where one filtering the log for failed exchanges looks.
    """
    clock, peers = Clock(), _FailingSecondApply()
    clock.advance(100_000)  # the entries were written long ago: the periodic pass skips the last few seconds'
    store = Store(clock.seconds, 1 << 20)
    for index in range(20):
        store.apply(Entry("k%d" % (index,), b'"v"', (1_000, index, "n1"), None))
    ring = HashRing(["n1", "n2"])
    metrics = Metrics("t1")
    rebalancer = Rebalancer("n1", store, lambda: ring, _Peer, peers, clock, 2, metrics, batch_entries=5)
    done = rebalancer.run_pass(ANTI_ENTROPY)
    clock.pump([0.1] * 100)
    assert done.called and peers.applied == 5
    text = metrics.exposition().decode()
    assert 'kv_antientropy_rounds_total{result="failed",tenant="t1"} 1.0' in text
    assert 'kv_antientropy_repairs_total{tenant="t1"} 5.0' in text
    ends = [m for m in eliot_logger.messages
            if m.get("action_type") == "kvresponder:rebalance:sync" and m.get("action_status") == "succeeded"]
    assert [(m["sent"], m["failed"]) for m in ends] == [(5, True)]


class _SecondOwnerUnreachable(_AskedPeers):
    """A peer client whose n3 is unreachable, and whose other peers take every entry sent to them."""

    def __init__(self) -> None:
        _AskedPeers.__init__(self)
        self.taken = {}

    async def apply(self, peer, entries, timeout=None):
        from kvresponder.peertransport import PeerError
        if peer.node_id == "n3":
            raise PeerError("n3 unreachable for apply: ConnectionRefusedError")
        self.taken.setdefault(peer.node_id, []).extend(entry.key for entry in entries)
        return [ApplyResult(True, False)] * len(entries)


def test_a_hint_is_kept_and_counted_pending_until_every_owner_has_taken_it():
    """
    If a node holds a key it does not own (a hint for a failed owner), and of the key's two owners one takes it
    and the other is unreachable, then the node keeps its copy and the pass counts it pending: dropped after one
    owner's acknowledgement, it would be one copy short.
    """
    clock, peers = Clock(), _SecondOwnerUnreachable()
    store = Store(clock.seconds, 1 << 20)
    ring = HashRing(["n1", "n2", "n3"])
    key = next(key for key in ("k%d" % (index,) for index in range(1000))
               if ring.preference_list(key, 2) == ["n2", "n3"])
    store.apply(Entry(key, b'"v"', (1, 0, "n1"), None))
    rebalancer = Rebalancer("n1", store, lambda: ring, _Peer, peers, clock, 2, Metrics("t1"))
    done = rebalancer.run_pass("leave:n4")
    clock.pump([0.01] * 20)
    assert done.called and done.result == {"handed_off": 0, "repaired": 0, "pending": 1}
    assert rebalancer.pending == 1 and store.current(key) is not None
    assert peers.taken == {"n2": [key]}


class _RingChangingPeers(_AskedPeers):
    """A peer client whose peers take every entry sent, and whose ``apply`` to n3 changes the ring as it answers."""

    def __init__(self, change) -> None:
        _AskedPeers.__init__(self)
        self.change = change

    async def apply(self, peer, entries, timeout=None):
        if peer.node_id == "n3":
            self.change()
        return [ApplyResult(True, False)] * len(entries)


def test_a_handed_off_key_this_node_owns_again_by_the_end_of_the_hand_off_is_kept():
    """
    If a node hands a key it does not own to its two owners, and before the hand-off ends one of them leaves, so
    that the node owns the key again (in a ring of two, both nodes own every key), then the node keeps its copy:
    dropped, the key would be on one node, and the leaver's drain, which sent the same version here, would have
    changed nothing. With the ring unchanged, the same hand-off drops it.
    """
    for leaves in (True, False):
        clock = Clock()
        rings = {"now": HashRing(["n1", "n2", "n3"])}
        key = next(key for key in ("k%d" % (index,) for index in range(1000))
                   if rings["now"].preference_list(key, 2) == ["n2", "n3"])
        store = Store(clock.seconds, 1 << 20)
        store.apply(Entry(key, b'"v"', (1, 0, "n1"), None))

        def change():
            if leaves:
                rings["now"] = HashRing(["n1", "n2"])

        rebalancer = Rebalancer("n1", store, lambda: rings["now"], _Peer, _RingChangingPeers(change), clock, 2,
                                Metrics("t1"))
        done = rebalancer.run_pass("hint")
        clock.pump([0.01] * 20)
        assert done.called
        assert (store.current(key) is not None) is leaves, leaves
        assert done.result["handed_off"] == (0 if leaves else 1)


class _CountingPeers(_AskedPeers):
    """A peer client whose peers take every entry sent, except n3 if it is ``down``; it records, at each call,
    the peer and how many entries the sender's store still holds."""

    def __init__(self, store, down=False) -> None:
        _AskedPeers.__init__(self)
        self.store, self.down, self.calls = store, down, []

    async def apply(self, peer, entries, timeout=None):
        from kvresponder.peertransport import PeerError
        self.calls.append((peer.node_id, len(self.store)))
        if self.down and peer.node_id == "n3":
            raise PeerError("n3 unreachable for apply: ConnectionRefusedError")
        return [ApplyResult(True, False)] * len(entries)


def _drain_pass(count: int, make_peers, nodes=("n1", "n2", "n3"), replicas: int = 2, metrics=None):
    """
    A leaving n1 holding ``count`` keys runs a drain's pass to the other ``nodes`` through ``make_peers(store)``,
    in batches of 100: its store, the peers, and the pass's Deferred, once the clock has run it.
    """
    clock = Clock()
    store = Store(clock.seconds, 64 << 20)
    hlc = HybridLogicalClock(lambda: 1_700_000_000.0, "n1")
    for index in range(count):
        store.apply(Entry("k%d" % (index,), b'"v"', hlc.now(), None))
    peers = make_peers(store)
    rebalancer = Rebalancer("n1", store, lambda: HashRing(list(nodes)), _Peer, peers, clock, replicas,
                            metrics or Metrics("t1"), batch_entries=100)
    rebalancer.leaving = True
    done = rebalancer.run_pass("drain")
    clock.pump([0.001] * 100)
    return store, peers, done


def test_a_drain_sends_and_drops_what_it_hands_off_a_batch_at_a_time_as_its_walk_finds_it():
    """
    If a leaving node hands off its whole store, then each batch is sent as the walk finds it and dropped once
    both owners have it, before the next is sent: the store shrinks from call to call, and the pass never holds
    more than a batch of entries (with copies of their values) besides it. Held until the walk's end, a drain
    took more memory again than the store, just as the node was being stopped.
    """
    store, peers, done = _drain_pass(2000, _CountingPeers)
    assert done.called and done.result == {"handed_off": 2000, "repaired": 0, "pending": 0}
    held = [count for node, count in peers.calls if node == "n2"]
    assert len(held) == 20 and held == sorted(held, reverse=True) and held[0] == 2000 and held[-1] == 100
    assert len(store) == 0


def test_an_owner_that_fails_once_in_a_pass_is_sent_nothing_more_in_it():
    """
    If one of the owners fails a hand-off call (unreachable, not yet noticed), then the rest of the pass sends it
    nothing (each call would wait for its timeout, batch after batch), the other owner still gets every batch,
    and every entry is kept, pending.
    """
    store, peers, done = _drain_pass(1000, lambda store: _CountingPeers(store, down=True))
    assert done.called and done.result == {"handed_off": 0, "repaired": 0, "pending": 1000}
    assert [node for node, _ in peers.calls].count("n3") == 1
    assert [node for node, _ in peers.calls].count("n2") == 10
    assert len(store) == 1000


def test_anti_entropy_sends_no_tombstone_to_a_replica_that_holds_nothing_of_its_key():
    """
    If one replica holds a delete's tombstone and the other nothing of that key (it collected its own tombstone
    first, having applied the delete earlier), then anti-entropy leaves it so: sent, the tombstone would start a
    new grace period there, and the two would send it back and forth for good, each to the other just after it
    collected its own. A replica that holds an older value of the key still gets the tombstone, which deletes it.
    """
    from .support import MemoryCluster
    cluster = MemoryCluster(2)
    n1, n2 = cluster.nodes
    cluster.run(seconds=1.0)
    for key in ("gone", "stale"):
        assert cluster.request("PUT", n1, "/kv/" + key, {"value": 1})[0] in (200, 201)
        assert cluster.request("DELETE", n1, "/kv/" + key)[0] == 200
    tombstones = {key: n1.store.current(key) for key in ("gone", "stale")}
    assert all(entry is not None and entry.value is None for entry in tombstones.values())
    for key, entry in tombstones.items():
        assert n2.store.forget(key, entry.version)
    older = (tombstones["stale"].version[0] - 1, 0, "n2")
    n2.store.apply(Entry("stale", b'"old"', older, None))
    cluster.run(n1.rebalancer.run_pass("dead:n3"), seconds=2.0)
    assert n2.store.current("gone") is None
    stale = n2.store.current("stale")
    assert stale is not None and stale.value is None and stale.version == tombstones["stale"].version


def test_a_failed_hand_off_keeps_the_ring_settling_and_shows_in_kv_handoff_pending():
    """
    If a node cannot hand a hint to one of its owners (n3 is down and not yet noticed), then long after the ring
    last changed the node's ring is still settling (so reads still ask around, and find the key where it sits),
    and its ``kv_handoff_pending`` gauge shows the entry waiting.
    """
    from .support import MemoryCluster
    cluster = MemoryCluster(3)
    n1, n2, n3 = cluster.nodes
    cluster.run(seconds=1.0)
    assert all(node.state == "ready" for node in cluster.nodes)
    key = next(key for key in ("k%d" % (index,) for index in range(1000))
               if n1.ring().preference_list(key, 2) == ["n2", "n3"])
    n1.store.apply(Entry(key, b'"v"', n1.hlc.now(), None))
    cluster.kill(n3)
    cluster.run(n1.rebalancer.run_pass("hint"), seconds=1.0)
    assert n1.rebalancer.pending == 1 and n2.store.current(key) is not None
    n1.ring_changed_at -= 3600
    assert n1.ring_settling()
    assert 'kv_handoff_pending{tenant="t1"} 1.0' in n1.metrics.exposition().decode()


def test_hand_offs_waiting_alone_leave_an_owner_answering_its_reads_from_its_own_copy():
    """
    If a node's ring settles only because it holds an entry it cannot hand off (n3 down and not yet noticed),
    long after the ring last changed, then the ring has not changed recently, and a key the node owns and holds
    is read from its own copy without asking its peers: the waiting hint says nothing of its own copies.
    """
    from .support import MemoryCluster
    cluster = MemoryCluster(3)
    n1, n2, n3 = cluster.nodes
    cluster.run(seconds=1.0)
    hinted = next(key for key in ("k%d" % (index,) for index in range(1000))
                  if n1.ring().preference_list(key, 2) == ["n2", "n3"])
    owned = next(key for key in ("k%d" % (index,) for index in range(1000))
                 if n1.ring().preference_list(key, 2) == ["n1", "n2"])
    n1.store.apply(Entry(hinted, b'"v"', n1.hlc.now(), None))
    n1.store.apply(Entry(owned, b'"own"', n1.hlc.now(), None))
    cluster.kill(n3)
    cluster.run(n1.rebalancer.run_pass("hint"), seconds=1.0)
    assert n1.rebalancer.pending == 1
    n1.ring_changed_at -= 3600
    assert n1.ring_settling() and not n1.ring_changed_recently()
    asked = []
    original = n1.peers.get_coalesced

    def counting(peer, key):
        asked.append((peer.node_id, key))
        return original(peer, key)
    n1.peers.get_coalesced = counting
    assert cluster.run(n1.coordinator.get(owned), seconds=1.0).value == b'"own"'
    assert asked == []


class _OneBrokenPeer(_AskedPeers):
    """Co-owners that lack everything; the sync with n3 breaks with an error no peer call should raise."""

    def __init__(self) -> None:
        _AskedPeers.__init__(self)
        self.applied = 0

    async def differing_buckets(self, peer, sender, buckets, background=False):
        if peer.node_id == "n3":
            raise RuntimeError("a bug")
        return [int(bucket) for bucket in buckets]

    async def wanted(self, peer, versions):
        return list(versions), set()

    async def apply(self, peer, entries, timeout=None):
        self.applied += len(entries)
        return [ApplyResult(True, False)] * len(entries)


def test_a_sync_that_breaks_unexpectedly_leaves_the_pass_and_the_other_syncs_counted():
    """
    If one co-owner's sync fails with an unexpected error, then the pass still ends as a pass: it is counted,
    and so are the repairs the other co-owner's sync made (the error is logged).
    """
    from eliot import add_destinations, remove_destination

    messages = []
    add_destinations(messages.append)
    try:
        clock, peers = Clock(), _OneBrokenPeer()
        clock.advance(100_000)
        store = Store(clock.seconds, 1 << 20)
        for index in range(30):
            store.apply(Entry("k%d" % (index,), b'"v"', (1_000, index, "n1"), None))
        ring = HashRing(["n1", "n2", "n3"])
        rebalancer = Rebalancer("n1", store, lambda: ring, _Peer, peers, clock, 3, Metrics("t1"))
        done = rebalancer.run_pass("leave:n4")
        clock.pump([0.1] * 100)
    finally:
        remove_destination(messages.append)
    counts = []
    done.addCallback(counts.append)
    assert rebalancer.passes == 1 and counts and counts[0]["repaired"] == peers.applied == 30, counts
    assert [message["reason"] for message in messages
            if message.get("message_type") == "eliot:traceback"] == ["a bug"]


def test_a_stopped_rebalancer_runs_no_pass_a_change_scheduled():
    """
    If a membership change schedules a pass and the node stops before it runs, then no pass runs.
    """
    from kvresponder.node import Node

    from .support import make_settings

    clock = Clock()
    node = Node(make_settings(), clock, http=None)
    node.rebalancer.trigger("joined:n2")
    assert clock.getDelayedCalls()
    node.stop()
    clock.advance(60)
    assert node.rebalancer.passes == 0


def test_a_stopped_rebalancer_starts_no_queued_pass_and_its_waiters_get_the_running_ones_counts():
    """
    If a pass is queued behind a running one and the rebalancer stops, then once the running pass ends no other
    starts, and whoever waited for the queued one is answered with the ended pass's counts.
    """
    clock, peers = Clock(), _HeldPeers()
    rebalancer = _rebalancer(clock, peers)
    first = rebalancer.run_pass("leave:n3")
    clock.pump([0.01] * 10)
    queued = rebalancer.run_pass("join:n4")
    rebalancer.stop()
    peers.held.callback(None)
    clock.pump([0.01] * 100)
    answers = []
    queued.addCallback(answers.append)
    assert first.called and answers and rebalancer.passes == 1 and len(peers.background) == 1
