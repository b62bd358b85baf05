"""
Time safety with injected wall clocks: measuring the peers' clock offsets, the bound that makes a node with a
wrong clock stop coordinating writes, the clock that never adopts a time too far ahead, the re-stamp that lets
a later acknowledged write win whatever the clocks say, and TTLs that travel as the time they have left.

The same properties are checked with real processes under libfaketime in ``tests/test_chaos.py``.
"""

import json
import re
import unittest
from contextlib import contextmanager

from eliot import add_destinations, remove_destination
from eliot.testing import LoggedMessage, capture_logging
from twisted.internet.task import Clock

from kvresponder.clockskew import ClockOffsets, _own_offset
from kvresponder.coordinator import ClockSkewed
from kvresponder.discovery import DiscoveryProtocol, HeartbeatCodec, derive_key
from kvresponder.hlc import MAX_COUNTER, RESTAMP_BASE, HybridLogicalClock
from kvresponder.log.discovery import CLOCK_RECOVERED, CLOCK_SKEWED
from kvresponder.log.replication import CLOCK_REJECTED
from kvresponder.membership import ALIVE, Heartbeat, Membership
from kvresponder.store import Entry
from kvresponder.wire import decode_batch, encode_batch, entry_from_wire, entry_to_wire

from .support import MemoryCluster, PartitionedCluster

NOW = 1_700_000_000.0
YEAR = 365 * 24 * 3600.0


@contextmanager
def capture(messages: list):
    """
    Every Eliot message logged meanwhile, whatever its level, appended to ``messages``.
    """
    add_destinations(messages.append)
    try:
        yield
    finally:
        remove_destination(messages.append)


def offsets(max_offset=0.5, forget_after=15.0):
    clock = Clock()
    clock.advance(NOW)
    return ClockOffsets(clock.seconds, max_offset, forget_after), clock


# -- measuring ------------------------------------------------------------------------------------------

def test_a_peers_offset_is_the_median_of_its_recent_samples():
    """
    If one of a peer's heartbeats arrives late, then its offset does not move: it is the median of the last
    samples, not their mean or the last one.
    """
    clock_offsets, _ = offsets()
    for sample in (2.0, 2.1, 40.0, 1.9):
        clock_offsets.heard("n2", 1, sample)
    assert clock_offsets.offset("n2") == 2.05
    clock_offsets.heard("n2", 1, 2.0)
    assert clock_offsets.offset("n2") == 2.0


def test_a_stepped_clock_shows_within_a_few_samples():
    """
    If a peer's clock steps by 30 s, then its measured offset follows within three heartbeats.
    """
    clock_offsets, _ = offsets()
    for _ in range(5):
        clock_offsets.heard("n2", 1, 0.0)
    for _ in range(3):
        clock_offsets.heard("n2", 1, 30.0)
    assert clock_offsets.offset("n2") == 30.0


def test_a_restarted_peer_is_measured_afresh():
    """
    If a peer restarts (a new incarnation), then its old samples are dropped: its clock may have been fixed.
    """
    clock_offsets, _ = offsets()
    for _ in range(5):
        clock_offsets.heard("n2", 1, 30.0)
    clock_offsets.heard("n2", 2, 0.01)
    assert clock_offsets.offset("n2") == 0.01


def test_a_silent_peer_is_forgotten_after_the_timeout():
    """
    If a peer is not heard from for the peer timeout, then it has no offset any more.
    """
    clock_offsets, clock = offsets(forget_after=15.0)
    clock_offsets.heard("n2", 1, 3.0)
    clock.advance(14.0)
    clock_offsets.evaluate()
    assert clock_offsets.offset("n2") == 3.0
    clock.advance(2.0)
    clock_offsets.evaluate()
    assert clock_offsets.offset("n2") is None
    assert clock_offsets.offsets() == {}


def test_a_quick_round_trip_measures_the_peer_against_the_middle_of_the_call():
    """
    If a call took 20 ms and the peer's clock read 10.0 s past our send time plus 10 ms, then the sample is
    10.0 s: the peer's time against the middle of the call, which removes the network delay.
    """
    clock_offsets, clock = offsets(max_offset=0.5)
    clock_offsets.heard("n2", 1, 10.3)
    sent = NOW
    clock_offsets.round_trip("n2", sent, sent + 0.010 + 10.0, sent + 0.020)
    # Two samples now: 10.3 from the heartbeat, 10.0 from the round trip.
    assert round(clock_offsets.offset("n2"), 6) == 10.15


def test_a_slow_round_trip_is_not_a_sample():
    """
    If a call took longer than the bound allows for (half of it could be wrong), then it is not a sample.
    """
    clock_offsets, _ = offsets(max_offset=0.5)
    clock_offsets.heard("n2", 1, 0.0)
    clock_offsets.round_trip("n2", NOW, NOW + 30.0, NOW + 0.4)
    assert clock_offsets.offset("n2") == 0.0


# -- the bound --------------------------------------------------------------------------------------------

def test_the_node_whose_clock_is_off_the_majority_is_the_skewed_one():
    """
    If one node of three runs 30 s ahead, then it finds itself 30 s ahead of the cluster, and each of the two
    others finds itself on time (the one peer that disagrees with it is the minority).
    """
    assert _own_offset([-30.0, -30.0]) == 30.0
    assert _own_offset([0.0, 30.0]) == 0.0
    assert _own_offset([30.0, 30.0]) == -30.0
    # Four nodes, one of them off: the same.
    assert _own_offset([-30.0, -30.0, -30.0]) == 30.0
    assert _own_offset([0.0, 0.0, 30.0]) == 0.0


def test_with_no_majority_no_node_is_skewed():
    """
    If there are two nodes, or two against two, then no node can tell whose clock is wrong, and none is
    marked skewed (the per-peer offsets still show the difference).
    """
    assert _own_offset([30.0]) == 0.0
    assert _own_offset([-30.0]) == 0.0
    assert _own_offset([0.0, 30.0, 30.0]) == 0.0
    clock_offsets, _ = offsets()
    clock_offsets.heard("n2", 1, 30.0)
    assert not clock_offsets.skewed
    assert clock_offsets.offset("n2") == 30.0


class SkewStateTests(unittest.TestCase):

    @capture_logging(None)
    def test_a_node_past_the_bound_is_skewed_logs_it_and_recovers_by_itself(self, logger):
        """
        If this node's clock is 2 s behind both its peers with a bound of 0.5 s, then it is skewed and logs a
        ``clock-skewed`` error; once its peers' clocks agree with it again, it recovers and says so.
        """
        clock_offsets, _ = offsets(max_offset=0.5)
        clock_offsets.heard("n2", 1, 2.0)
        assert not clock_offsets.skewed
        clock_offsets.heard("n3", 1, 2.1)
        assert clock_offsets.skewed
        assert clock_offsets.skew == -2.0
        [skewed] = LoggedMessage.of_type(logger.messages, CLOCK_SKEWED)
        assert skewed.message["skew"] == -2.0 and skewed.message["max_offset"] == 0.5
        for _ in range(5):
            clock_offsets.heard("n2", 1, 0.01)
            clock_offsets.heard("n3", 1, 0.02)
        assert not clock_offsets.skewed
        assert len(LoggedMessage.of_type(logger.messages, CLOCK_RECOVERED)) == 1

    def test_a_skewed_node_recovers_only_once_well_within_the_bound(self):
        """
        If a skewed node's offset comes back to just within the bound (0.45 s of 0.5 s), then it stays skewed: a
        clock hovering at the bound would flap the node in and out of service. Within 80 % of it, it recovers.
        """
        clock_offsets, _ = offsets(max_offset=0.5)
        for peer in ("n2", "n3"):
            clock_offsets.heard(peer, 1, 2.0)
        assert clock_offsets.skewed
        for _ in range(5):
            for peer in ("n2", "n3"):
                clock_offsets.heard(peer, 1, 0.45)
        assert clock_offsets.skewed and clock_offsets.skew == -0.45
        for _ in range(5):
            for peer in ("n2", "n3"):
                clock_offsets.heard(peer, 1, 0.39)
        assert not clock_offsets.skewed

    def test_a_heartbeat_of_an_older_incarnation_adds_no_sample(self):
        """
        If a peer's heartbeat from before its restart arrives late (or is resent), then it says nothing of the
        peer's clock now: its offset stays what the current incarnation's heartbeats say.
        """
        clock_offsets, _ = offsets(max_offset=0.5)
        for _ in range(3):
            clock_offsets.heard("n2", 7, 0.01)
        for _ in range(5):
            clock_offsets.heard("n2", 6, 30.0)
        assert clock_offsets.offset("n2") == 0.01


# -- the clock never adopts a time too far ahead -----------------------------------------------------------

def test_the_clock_adopts_a_version_within_the_bound_and_not_one_past_it():
    """
    If a peer's version is 0.3 s ahead with a bound of 0.5 s, then the clock moves past it; if it is a year
    ahead, then the clock ignores it and says so, and its next version is stamped on its own wall clock.
    """
    hlc = HybridLogicalClock(lambda: NOW, "n1", max_ahead=0.5)
    assert hlc.observe((int(NOW * 1000) + 300, 0, "n2"))
    assert hlc.now() == (int(NOW * 1000) + 300, 1, "n1")
    assert not hlc.observe((int((NOW + YEAR) * 1000), 0, "n2"))
    assert hlc.now() == (int(NOW * 1000) + 300, 2, "n1")


def test_a_version_just_above_a_future_one_does_not_move_the_clock():
    """
    If a write must order after a version stamped a year ahead, then it is stamped just above that version,
    and the clock's own next version is still on its wall clock.
    """
    hlc = HybridLogicalClock(lambda: NOW, "n1", max_ahead=0.5)
    future = (int((NOW + YEAR) * 1000), 7, "n3")
    assert hlc.above(future) == (future[0], RESTAMP_BASE, "n1")
    assert hlc.above((future[0] + 5, MAX_COUNTER, "n3")) == (future[0] + 6, RESTAMP_BASE, "n1")
    assert hlc.now()[0] == int(NOW * 1000)
    # A version in the past needs nothing special: the clock's own next version is already above it.
    assert hlc.above((1, 0, "n3"))[0] == int(NOW * 1000)


class ReplicaClockTests(unittest.TestCase):

    @capture_logging(None)
    def test_a_copy_stamped_a_year_ahead_is_stored_but_its_time_not_adopted(self, logger):
        """
        If a replica is sent a copy whose version is a year ahead, then it stores it (by version order, as
        always), counts and logs the timestamp, and its own next write is still stamped near real time.
        """
        cluster = MemoryCluster(1)
        # Past its join: a clustered node that hears no peer refuses requests for a heartbeat interval.
        cluster.run(seconds=1.5)
        node = cluster.nodes[0]
        future = (int((cluster.clock.seconds() + YEAR) * 1000), 0, "n9")
        node.coordinator.apply_copies([Entry("k", b"1", future)], [])
        assert node.store.get("k").version == future
        assert node.metrics.clock_rejections.labels("t1", "entry")._value.get() == 1
        [rejected] = LoggedMessage.of_type(logger.messages, CLOCK_REJECTED)
        assert rejected.message["key"] == "k"
        code, body = cluster.request("PUT", node, "/kv/other", {"value": 2})
        assert code == 201
        wall_ms = int(json.loads(body)["version"].split(".")[0])
        assert abs(wall_ms / 1000 - cluster.clock.seconds()) < 1.0

    @capture_logging(None)
    def test_copies_from_a_peer_ahead_are_each_counted_and_logged_once_every_ten_seconds(self, logger):
        """
        If a replica is sent copy after copy whose versions are ahead of its clock by more than the bound (a peer
        within the bound of the cluster on one side, this node on the other), then each is counted, and a
        warning is logged at most once every 10 s, counting the copies since the last (a warning a copy was one a
        write through the cluster); those of a burst's end are logged by the node's once-a-second tick, without
        waiting for another copy.
        """
        cluster = MemoryCluster(1)
        cluster.run(seconds=1.5)
        node = cluster.nodes[0]
        for index in range(50):
            ahead = (int((cluster.clock.seconds() + 0.8) * 1000), 0, "n9")
            node.coordinator.apply_copies([Entry("k%d" % index, b"1", ahead)], [])
            cluster.clock.advance(0.1)
        assert node.metrics.clock_rejections.labels("t1", "entry")._value.get() == 50
        counts = [m.message["count"] for m in LoggedMessage.of_type(logger.messages, CLOCK_REJECTED)]
        assert counts == [1], counts
        cluster.run(seconds=6)
        counts = [m.message["count"] for m in LoggedMessage.of_type(logger.messages, CLOCK_REJECTED)]
        assert counts == [1, 49], counts


# -- heartbeats ------------------------------------------------------------------------------------------

class _Metrics:
    def __init__(self):
        self.results = []
        self.rejected = []

    def discovery(self, result):
        self.results.append(result)

    def clock_rejected(self, source, count=1):
        self.rejected.append(source)


def _protocol(key=None):
    clock = Clock()
    clock.advance(NOW)
    membership = Membership(clock.seconds, "n1", 15.0)
    clock_offsets = ClockOffsets(clock.seconds, 0.5, 15.0)
    metrics = _Metrics()
    protocol = DiscoveryProtocol(HeartbeatCodec("t1", key), membership, clock, clock.seconds,
                                 lambda: Heartbeat("n1", 1, "10.0.0.1", 3000, ALIVE, 1), None, "10.0.0.1", 9999,
                                 metrics=metrics, clock_offsets=clock_offsets, max_clock_offset=0.5)
    return protocol, membership, clock_offsets, metrics


def test_a_heartbeat_from_a_clock_ahead_is_refused_but_measured():
    """
    If a signed heartbeat's time is 30 s ahead of ours, then its sender is not taken into the membership
    (``clock_ahead``), and its offset is still measured, so that it shows.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    beat = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    protocol.datagramReceived(HeartbeatCodec("t1", key).encode(beat, False, NOW + 30.0), ("10.0.0.2", 9999))
    assert membership.peers() == []
    assert metrics.results == ["clock_ahead"] and metrics.rejected == ["heartbeat"]
    assert round(clock_offsets.offset("n2"), 3) == 30.0


def test_a_peer_refused_for_a_clock_ahead_is_taken_in_again_only_well_below_the_line():
    """
    If a peer's heartbeat is refused for a clock more than twice the bound ahead, then its next ones are refused
    until their offset is below 80 % of that line (as the skew check recovers), not as soon as one comes in a
    little under it: a clock near the line would otherwise have the peer leave the ring and join it again as the
    delays of its datagrams varied, each time with a pass. A peer never refused is taken in up to the line.
    """
    protocol, membership, _, metrics = _protocol()
    codec = HeartbeatCodec("t1")
    n2, n3 = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1), Heartbeat("n3", 1, "10.0.0.3", 3000, ALIVE, 1)
    for ahead in (1.05, 0.95, 0.85, 0.75, 0.95):
        protocol.datagramReceived(codec.encode(n2, False, NOW + ahead), ("10.0.0.2", 9999))
    assert metrics.results == ["clock_ahead"] * 3 + ["accepted"] * 2
    del metrics.results[:]
    protocol.datagramReceived(codec.encode(n3, False, NOW + 0.95), ("10.0.0.3", 9999))
    assert metrics.results == ["accepted"]
    assert [peer.node_id for peer in membership.peers()] == ["n2", "n3"]


def test_a_heartbeat_from_a_clock_behind_is_measured_and_taken_in_within_the_replay_window():
    """
    If a peer's clock is 2 s behind, then its heartbeat is accepted and its offset is -2 s; unsigned
    heartbeats carry the time too.
    """
    protocol, membership, clock_offsets, metrics = _protocol()
    beat = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    protocol.datagramReceived(HeartbeatCodec("t1").encode(beat, False, NOW - 2.0), ("10.0.0.2", 9999))
    assert [peer.node_id for peer in membership.peers()] == ["n2"]
    assert metrics.results == ["accepted"]
    assert round(clock_offsets.offset("n2"), 3) == -2.0


# -- writes ----------------------------------------------------------------------------------------------

def _owned_by(cluster, first: str, second: str) -> str:
    ring = cluster.nodes[0].ring()
    return next(key for key in ("key-%d" % i for i in range(10000))
                if ring.preference_list(key, 2) == [first, second])


def test_a_skewed_node_refuses_to_coordinate_writes_and_is_not_ready():
    """
    If one node of three runs 30 s ahead, then it answers writes (puts and deletes, single and bulk) with 503
    ``clock_skew`` naming its offset, and readiness with 503 ``clock-skew``; the healthy nodes take writes and
    stay ready.
    """
    cluster = MemoryCluster(3, wall_offsets={3: 30.0})
    cluster.run(seconds=2.0)
    skewed = cluster.nodes[2]
    assert cluster.request("PUT", cluster.nodes[0], "/kv/held", {"value": 0})[0] == 201
    code, body = cluster.request("PUT", skewed, "/kv/k", {"value": 1})
    assert code == 503
    error = json.loads(body)
    assert error["error"] == "clock_skew" and "30.000 s ahead" in error["message"]
    for method, path, body in (("POST", "/bulk", {"put": [{"key": "a", "value": 1}]}),
                               ("DELETE", "/kv/held", None), ("POST", "/bulk", {"delete": ["held"]})):
        code, answer = cluster.request(method, skewed, path, body)
        assert (code, json.loads(answer)["error"]) == (503, "clock_skew"), (method, body)
    # A delete it took would have been stamped 30 s ahead, beating every write of the next 30 s.
    assert json.loads(cluster.request("GET", cluster.nodes[0], "/kv/held")[1])["value"] == 0
    # Nor does it answer reads: it may see no peer, and its own store would say "absent".
    for method, path in (("GET", "/kv/k"), ("HEAD", "/kv/k"), ("GET", "/kv"), ("POST", "/bulk")):
        code, body = cluster.request(method, skewed, path, {"get": ["k"]} if method == "POST" else None)
        assert code == 503, (method, path)
        if method != "HEAD":
            assert json.loads(body)["error"] == "clock_skew"
    code, body = cluster.request("GET", skewed, "/health/ready")
    assert (code, json.loads(body)["status"]) == (503, "clock-skew")
    health = json.loads(cluster.request("GET", skewed, "/health")[1])
    assert health["state"] == "clock-skew" and health["clock_skew_s"] == 30.0
    for node in cluster.nodes[:2]:
        assert cluster.request("GET", node, "/health/ready")[0] == 200
        assert cluster.request("PUT", node, "/kv/k", {"value": 2})[0] in (200, 201)
    peers = json.loads(cluster.request("GET", cluster.nodes[0], "/peers")[1])
    assert {peer["id"]: peer["clock_offset_s"] for peer in peers} == {"n2": 0.0, "n3": 30.0}
    metrics = cluster.request("GET", cluster.nodes[0], "/metrics")[1].decode()
    assert 'kv_clock_offset_seconds{peer="n3",tenant="t1"} 30.0' in metrics
    assert 'kv_clock_skewed{tenant="t1"} 0.0' in metrics


def test_a_bulk_request_whose_node_turns_skewed_between_its_groups_answers_what_it_did_and_refuses_the_rest():
    """
    If a node's clock is found skewed after a bulk request's writes were stored and before its deletes ran (a
    heartbeat, or the evaluation each second, between the two), then the request is answered 200 with each
    write's version and each delete refused 503 on its own: answered 503 as a whole, it told the client that
    nothing was done, and lost the versions of writes that were acknowledged. A node already skewed refuses the
    whole request, as before, and stores nothing.
    """
    from unittest import mock
    from twisted.internet.defer import fail

    cluster = MemoryCluster(2)
    cluster.run(seconds=1.0)
    n1 = cluster.nodes[0]
    body = {"put": [{"key": "a", "value": 1}], "delete": ["b"]}
    with mock.patch.object(n1.coordinator, "delete_many", lambda keys: fail(ClockSkewed(0.8, 0.5))):
        code, answer = cluster.request("POST", n1, "/bulk", body)
    assert code == 200, answer
    answer = json.loads(answer)
    assert [(item["key"], item["status"]) for item in answer["put"]] == [("a", 201)]
    assert answer["put"][0]["version"]
    assert [(item["key"], item["status"], item["error"]) for item in answer["delete"]] == [("b", 503, "unavailable")]
    assert "0.800 s ahead" in answer["delete"][0]["message"]
    with mock.patch.object(n1.coordinator, "_check_clock", mock.Mock(side_effect=ClockSkewed(0.8, 0.5))):
        code, answer = cluster.request("POST", n1, "/bulk", {"put": [{"key": "c", "value": 1}]})
    assert (code, json.loads(answer)["error"]) == (503, "clock_skew")
    assert all(node.store.current("c") is None for node in cluster.nodes)


def test_a_later_write_wins_over_an_earlier_one_stamped_in_the_future():
    """
    If a key was written with a version 30 s in the future (a node whose clock ran ahead), then a write
    that starts after it through a healthy node still wins on every replica: it is stamped just above the
    future version, the answer carries the version stored, and no healthy clock moves into the future.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    key = _owned_by(cluster, "n1", "n2")
    future = (int((cluster.clock.seconds() + 30.0) * 1000), 4, "n3")
    for node in cluster.nodes[:2]:
        node.store.apply(Entry(key, b'"early"', future))
    for coordinator in (cluster.nodes[2], cluster.nodes[0]):
        code, body = cluster.request("PUT", coordinator, "/kv/" + key, {"value": "late"})
        assert code == 200
        version = json.loads(body)["version"]
        wall, counter, node_id = version.split(".")
        assert (int(wall), node_id) == (future[0], coordinator.node_id)
        assert int(counter) > future[1]
        for node in cluster.nodes[:2]:
            entry = node.store.get(key)
            assert entry.value == b'"late"' and "%d.%d.%s" % entry.version == version
        future = (int(wall), int(counter), node_id)
    for node in cluster.nodes:
        assert node.hlc.now()[0] < int((cluster.clock.seconds() + 1.0) * 1000)


def test_a_later_delete_and_a_later_bulk_write_win_over_a_future_version():
    """
    If a key holds a version stamped in the future, then a later delete removes it and a later bulk write
    replaces it, on every replica.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    key = _owned_by(cluster, "n2", "n3")
    future = (int((cluster.clock.seconds() + YEAR) * 1000), 0, "n9")
    for node in cluster.nodes[1:]:
        node.store.apply(Entry(key, b'"early"', future))
    code, body = cluster.request("POST", cluster.nodes[0], "/bulk", {"put": [{"key": key, "value": "bulk"}]})
    assert code == 200
    [put] = json.loads(body)["put"]
    assert put["status"] == 200 and put["version"].endswith(".n1")
    for node in cluster.nodes[1:]:
        assert node.store.get(key).value == b'"bulk"'
    code, _ = cluster.request("DELETE", cluster.nodes[0], "/kv/" + key)
    assert code == 200
    for node in cluster.nodes[1:]:
        assert node.store.get(key) is None
    assert cluster.request("GET", cluster.nodes[0], "/kv/" + key)[0] == 404


def test_a_single_node_restamps_its_own_write_above_a_future_version():
    """
    If a single node holds a future version of a key (handed to it earlier), then a new write to the key
    wins and is stamped just above it.
    """
    cluster = MemoryCluster(1)
    # Past its join: a clustered node that hears no peer refuses requests for a heartbeat interval.
    cluster.run(seconds=1.5)
    node = cluster.nodes[0]
    future = (int((cluster.clock.seconds() + 30.0) * 1000), 0, "n9")
    node.store.apply(Entry("k", b'"early"', future))
    code, body = cluster.request("PUT", node, "/kv/k", {"value": "late"})
    assert code == 200
    assert json.loads(body)["version"] == "%d.%d.n1" % (future[0], RESTAMP_BASE)
    assert node.store.get("k").value == b'"late"'


def test_writes_restamped_above_one_version_never_share_a_version():
    """
    If two writes are stamped again above the same future version (overlapping writes to one key through one
    node), then they get different versions, and neither equals one the clock issues once real time reaches
    that millisecond.
    """
    now = [NOW]
    hlc = HybridLogicalClock(lambda: now[0], "n1", max_ahead=0.5)
    future = (int((NOW + 30) * 1000), 4, "n3")
    first, second = hlc.above(future), hlc.above(future)
    assert future < first < second
    # Real time reaches that millisecond: the clock's own versions stay below the re-stamped ones.
    now[0] = NOW + 30
    issued = [hlc.now() for _ in range(100)]
    assert all(version[0] == future[0] and version < first for version in issued)
    # A re-stamped version is not a clock fault: it is not adopted, and not counted as one.
    assert hlc.observe(second)
    assert hlc.now() < first


def test_two_overlapping_writes_to_a_future_stamped_key_both_land_with_distinct_versions():
    """
    If two writes to a key that holds a future version overlap through one node (one bulk request naming the key
    twice), then each gets its own version and the replicas agree on the last one.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    key = _owned_by(cluster, "n1", "n2")
    future = (int((cluster.clock.seconds() + 30.0) * 1000), 4, "n9")
    for node in cluster.nodes[:2]:
        node.store.apply(Entry(key, b'"early"', future))
    code, body = cluster.request("POST", cluster.nodes[2], "/bulk",
                                 {"put": [{"key": key, "value": "A"}, {"key": key, "value": "B"}]})
    assert code == 200
    versions = [put["version"] for put in json.loads(body)["put"]]
    assert len(set(versions)) == 2
    held = {node.node_id: (node.store.get(key).value, "%d.%d.%s" % node.store.get(key).version)
            for node in cluster.nodes[:2]}
    assert len(set(held.values())) == 1
    value, version = held["n1"]
    assert version == max(versions, key=lambda text: tuple(int(part) for part in text.split(".")[:2]))
    assert value == (b'"A"' if version == versions[0] else b'"B"')


def test_a_resent_signed_heartbeat_does_not_move_the_clock_estimate():
    """
    If a signed heartbeat captured on the network is sent again later, then it is dropped as replayed before it
    is measured, so it cannot make a healthy node look skewed; and an older incarnation's heartbeat is not
    measured either.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    codec = HeartbeatCodec("t1", key)
    captured = {}
    for node_id in ("n2", "n3"):
        beat = Heartbeat(node_id, 2, "10.0.0.2", 3000, ALIVE, 1)
        captured[node_id] = codec.encode(beat, False, NOW)
        protocol.datagramReceived(captured[node_id], ("10.0.0.2", 9999))
    assert not clock_offsets.skewed
    protocol.clock.advance(5.0)
    for _ in range(5):
        for node_id, data in captured.items():
            protocol.datagramReceived(data, ("10.0.0.2", 9999))
    old = codec.encode(Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1), False, NOW - 4.0)
    protocol.datagramReceived(old, ("10.0.0.2", 9999))
    assert not clock_offsets.skewed
    assert round(clock_offsets.offset("n2"), 3) == 0.0 and round(clock_offsets.offset("n3"), 3) == 0.0


def test_nodes_within_the_bound_of_the_cluster_keep_each_other():
    """
    If two nodes are 0.6 s apart with a bound of 0.5 s (each 0.3 s from the cluster's middle), then the one
    behind still takes in the one ahead: a heartbeat is refused only past twice the bound.
    """
    protocol, membership, clock_offsets, metrics = _protocol()
    beat = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    protocol.datagramReceived(HeartbeatCodec("t1").encode(beat, False, NOW + 0.6), ("10.0.0.2", 9999))
    assert [peer.node_id for peer in membership.peers()] == ["n2"]
    beat = Heartbeat("n3", 1, "10.0.0.3", 3000, ALIVE, 1)
    protocol.datagramReceived(HeartbeatCodec("t1").encode(beat, False, NOW + 1.1), ("10.0.0.3", 9999))
    assert [peer.node_id for peer in membership.peers()] == ["n2"] and metrics.results[-1] == "clock_ahead"


def test_a_skewed_node_left_with_one_peer_or_none_stays_skewed_until_a_majority_says_otherwise():
    """
    If a skewed node stops hearing one of its two peers, then it stays skewed (one peer is no majority), and so
    it does once it hears no peer at all; a majority that agrees with its clock clears it.
    """
    clock_offsets, clock = offsets(max_offset=0.5, forget_after=15.0)
    for _ in range(3):
        clock_offsets.heard("n2", 1, 30.0)
        clock_offsets.heard("n3", 1, 30.0)
    assert clock_offsets.skewed
    for _ in range(3):
        clock.advance(10.0)
        clock_offsets.heard("n2", 1, 30.0)
    clock_offsets.evaluate()
    assert clock_offsets.offsets().keys() == {"n2"}
    assert clock_offsets.skewed
    clock.advance(20.0)
    clock_offsets.evaluate()
    assert clock_offsets.offsets() == {} and clock_offsets.skewed
    for _ in range(3):
        clock.advance(1.0)
        clock_offsets.heard("n2", 2, 0.0)
        clock_offsets.heard("n3", 2, 0.0)
    assert not clock_offsets.skewed


def test_clock_skewed_names_the_offset_and_the_bound():
    """
    If the error is rendered, then it says by how much and which way, and the bound.
    """
    message = str(ClockSkewed(-2.25, 0.5))
    assert "2.250 s behind" in message and "MAX_CLOCK_OFFSET (0.5 s)" in message


# -- TTLs -----------------------------------------------------------------------------------------------

def test_a_ttl_travels_as_the_time_it_has_left():
    """
    If a node whose clock is 30 s ahead sends an entry expiring in 3 s by its clock, then a receiver whose
    clock is right expires it 3 s from its own now, not 33 s; in the binary batch and in JSON alike.
    """
    sender_now, receiver_now = NOW + 30.0, NOW
    entry = Entry("k", b"1", (1, 0, "n3"), sender_now + 3.0)
    [received] = decode_batch(encode_batch([entry], sender_now), receiver_now)
    assert received.expires_at == receiver_now + 3.0
    again = entry_from_wire(json.loads(json.dumps(entry_to_wire(entry, sender_now))), receiver_now)
    assert again.expires_at == receiver_now + 3.0
    none = Entry("k", b"1", (1, 0, "n3"))
    assert decode_batch(encode_batch([none], sender_now), receiver_now)[0].expires_at is None


def test_an_absolute_expiry_from_an_older_node_is_still_read():
    """
    If an older node sends an absolute expiry (a Unix time), then it is taken as it is.
    """
    data = {"k": "k", "v": "1", "ver": [1, 0, "n3"], "exp": NOW + 3.0}
    assert entry_from_wire(data, NOW + 100.0).expires_at == NOW + 3.0


def test_a_ttl_written_through_a_skewed_node_ends_on_time_on_every_replica():
    """
    If a write with a 3 s TTL goes through a node whose clock is 15 s ahead (within a bound raised to 20 s,
    the most it may be, so that it still coordinates), then after 3.5 s no replica holds it.
    """
    cluster = MemoryCluster(3, wall_offsets={3: 15.0}, max_clock_offset=20)
    cluster.run(seconds=1.0)
    key = _owned_by(cluster, "n1", "n2")
    code, _ = cluster.request("PUT", cluster.nodes[2], "/kv/" + key, {"value": 1, "ttl": 3})
    assert code == 201
    for node in cluster.nodes[:2]:
        assert node.store.get(key) is not None
        assert abs(node.store.get(key).expires_at - (node.wall() + 3.0)) < 0.5
    cluster.run(seconds=3.5)
    for node in cluster.nodes:
        assert node.store.get(key) is None


# -- a peer's wall clock stepped (NTP setting it right) ------------------------------------------------------


def test_the_reactors_clock_starts_at_the_wall_clock_and_moves_only_with_the_monotonic_one():
    """
    If the wall clock steps after the node started (either way), then the reactor's clock (``steady_seconds``),
    which times every timer, does not: it started at the wall clock's reading and advances as the monotonic
    clock does.
    """
    from kvresponder.tap import steady_seconds

    wall, monotonic = [1000.0], [5.0]
    seconds = steady_seconds(lambda: wall[0], lambda: monotonic[0])
    assert seconds() == 1000.0
    monotonic[0], wall[0] = 7.5, 900.0
    assert seconds() == 1002.5
    wall[0] = 5000.0
    assert seconds() == 1002.5



def test_the_reactors_clock_never_goes_back_even_when_its_monotonic_source_does():
    """
    If the monotonic clock it reads steps back (libfaketime fakes it with the wall clock), then the reactor's clock
    goes on from where it was, at the monotonic clock's pace: a timer due before the step (the end of the turn that
    sends the answers) is not held for as long as the step.
    """
    from twisted.internet.task import Clock

    from kvresponder.tap import steady_seconds

    monotonic = [5.0]
    seconds = steady_seconds(lambda: 1000.0, lambda: monotonic[0])
    assert seconds() == 1000.0
    monotonic[0] = 6.0
    assert seconds() == 1001.0
    monotonic[0] = -4.0  # stepped back 10 s
    assert seconds() == 1001.0
    monotonic[0] = -3.5
    assert seconds() == 1001.5

    class Reactor(Clock):
        def seconds(self):
            return steady()

    monotonic[0] = 5.0
    steady = steady_seconds(lambda: 1000.0, lambda: monotonic[0])
    reactor = Reactor()
    ran = []
    reactor.callLater(0, ran.append, "end of turn")
    monotonic[0] = -5.0
    reactor.advance(0)
    assert ran == ["end of turn"]

def test_a_peer_whose_clock_ran_ahead_is_taken_back_in_once_its_clock_is_corrected():
    """
    If a signed peer's heartbeats come an hour ahead (refused, ``clock_ahead``), and its clock is then set right
    (its heartbeats carry the real time again, same incarnation, their sequence numbers still rising), then its
    next heartbeat is accepted: the refused future timestamps are no floor for the replay check.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    codec = HeartbeatCodec("t1", key)
    beat = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    for sequence in range(1, 4):
        protocol.clock.advance(1.0)
        protocol.datagramReceived(codec.encode(beat, False, protocol.clock.seconds() + 3600.0, sequence),
                                  ("10.0.0.2", 9999))
    assert membership.peers() == [] and metrics.results == ["clock_ahead"] * 3
    # NTP steps n2's clock back to the real time.
    for sequence in range(4, 7):
        protocol.clock.advance(1.0)
        protocol.datagramReceived(codec.encode(beat, False, protocol.clock.seconds(), sequence), ("10.0.0.2", 9999))
    assert metrics.results[3:] == ["accepted"] * 3, metrics.results
    assert [peer.node_id for peer in membership.peers()] == ["n2"]


def test_a_heartbeat_refused_for_its_time_and_sent_again_is_neither_measured_again_nor_taken_in_later():
    """
    If a signed heartbeat is refused because its clock is far ahead, and the same datagram is sent again (once
    at once, once when real time has come within the bound of its time), then each resend is dropped as
    replayed: it is not measured again (one captured datagram cannot weigh in the skew vote over and over), and
    it never brings its node into the ring.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    codec = HeartbeatCodec("t1", key)
    data = codec.encode(Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1), False, protocol.clock.seconds() + 20.0, 1)
    measured = []
    clock_offsets.heard = lambda *args: measured.append(args)
    protocol.datagramReceived(data, ("10.0.0.2", 9999))
    protocol.clock.advance(1.0)
    protocol.datagramReceived(data, ("10.0.0.2", 9999))
    protocol.clock.advance(19.5)
    protocol.datagramReceived(data, ("10.0.0.2", 9999))
    assert metrics.results == ["clock_ahead", "replayed", "replayed"], metrics.results
    assert len(measured) == 1 and membership.peers() == []


def test_a_peer_whose_clock_ran_past_the_replay_window_is_taken_back_in_once_its_clock_is_corrected():
    """
    The same for a peer a minute behind (refused as outside the replay window), whose clock is then set right:
    nothing about it is stuck.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    codec = HeartbeatCodec("t1", key)
    beat = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    protocol.clock.advance(1.0)
    protocol.datagramReceived(codec.encode(beat, False, protocol.clock.seconds() - 60.0), ("10.0.0.2", 9999))
    protocol.clock.advance(1.0)
    protocol.datagramReceived(codec.encode(beat, False, protocol.clock.seconds()), ("10.0.0.2", 9999))
    assert metrics.results == ["replayed", "accepted"]


def test_a_signed_heartbeat_sent_again_is_refused_as_replayed():
    """
    If an accepted signed heartbeat is sent again, then it is dropped as replayed, and not measured again.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    codec = HeartbeatCodec("t1", key)
    data = codec.encode(Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1), False, NOW)
    protocol.datagramReceived(data, ("10.0.0.2", 9999))
    protocol.clock.advance(2.0)
    protocol.datagramReceived(data, ("10.0.0.2", 9999))
    assert metrics.results == ["accepted", "replayed"]


def test_a_peer_whose_clock_steps_back_is_still_taken_in():
    """
    If a signed peer's wall clock steps back 10 s (within the replay window) while it runs, then its next
    heartbeats are still accepted, told apart from replays by their sequence numbers, and a resent one is not
    taken in again (the last one taken, sent again, is a ``duplicate``).
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    own = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    sender, _, _, _ = _protocol(key)
    sender.own_heartbeat = lambda: own
    sender.membership.node_id = "n2"
    sent = []

    class Transport:
        def write(self, data, address):
            sent.append(data)
    sender.transport = Transport()
    sender.use_seeds({"10.0.0.1"})
    sender.announce()
    protocol.datagramReceived(sent[-1], ("10.0.0.2", 9999))
    sender.wall = lambda: protocol.clock.seconds() - 10.0
    for _ in range(3):
        protocol.clock.advance(0.5)
        sender.announce()
        protocol.datagramReceived(sent[-1], ("10.0.0.2", 9999))
    assert metrics.results == ["accepted"] * 4, metrics.results
    protocol.datagramReceived(sent[-1], ("10.0.0.2", 9999))
    assert metrics.results[-1] == "duplicate"
    protocol.datagramReceived(sent[-2], ("10.0.0.2", 9999))
    assert metrics.results[-1] == "replayed"


def test_a_skewed_node_cut_off_from_its_peers_stays_skewed_so_a_later_quorum_write_survives_the_heal():
    """
    If a node 10 s ahead is found skewed and then cut off from its peers, then it stays skewed and refuses
    writes alone (they would be stamped 10 s ahead), so a write acknowledged by the others after it is still the
    value once the partition heals. It used to clear its skew once it heard no peer, acknowledge such a write,
    and hand it to the owners at the heal, where it beat the later one.
    """
    cluster = PartitionedCluster(3, wall_offsets={3: 10.0})
    n1, n2, n3 = cluster.nodes
    cluster.run(seconds=5.0)
    assert n3.clock_offsets.skewed
    key = next(k for k in ("key-%d" % i for i in range(10000)) if n1.ring().preference_list(k, 2) == ["n1", "n2"])

    cluster.hears = lambda listener, speaker: "n3" not in (listener, speaker)
    cluster.run(seconds=5.0)
    assert set(n3.ring().nodes) == {"n3"} and n3.clock_offsets.skewed
    code, body = cluster.request("PUT", n3, "/kv/" + key, {"value": "early"})
    assert code == 503 and json.loads(body)["error"] == "clock_skew"

    cluster.run(seconds=2.0)
    assert cluster.request("PUT", n1, "/kv/" + key, {"value": "late"})[0] == 201

    cluster.hears = lambda listener, speaker: True
    cluster.run(seconds=5.0)
    for node in (n1, n2):
        code, body = cluster.request("GET", node, "/kv/" + key)
        assert code == 200 and json.loads(body)["value"] == "late", body


def test_restamps_by_two_coordinators_above_one_version_differ_in_anti_entropys_digest():
    """
    If two nodes re-stamp a write above the same future version, then their versions differ only in node id,
    and the entry digest anti-entropy compares buckets by tells them apart.
    """
    from kvresponder.rebalance import entry_digest, key_hash

    future = (1_000_030_000, 4, "n9")
    first = HybridLogicalClock(lambda: 1_000_000.0, "n1", max_ahead=0.5).above(future)
    second = HybridLogicalClock(lambda: 1_000_000.0, "n3", max_ahead=0.5).above(future)
    assert first[:2] == second[:2] and first != second
    assert entry_digest(key_hash("k"), first) != entry_digest(key_hash("k"), second)


def test_anti_entropy_repairs_replicas_holding_versions_that_differ_only_in_node_id():
    """
    If the two owners of a key hold versions that differ only in node id (two re-stamps above one version, one
    of which reached only one owner), then a pass on each brings both to the greater one. Their bucket digests
    were equal, and no pass ever compared the key.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n1, n2, _ = cluster.nodes
    ring = n1.ring()
    key = next(k for k in ("key-%d" % i for i in range(10000)) if ring.preference_list(k, 2) == ["n1", "n2"])
    wall = int((cluster.clock.seconds() + 30.0) * 1000)
    n1.store.apply(Entry(key, b'"X"', (wall, RESTAMP_BASE, "n1")))
    n2.store.apply(Entry(key, b'"Y"', (wall, RESTAMP_BASE, "n3")))
    for node in (n1, n2):
        cluster.run(node.rebalancer.run_pass("membership"), seconds=30)
    assert n1.store.get(key).value == n2.store.get(key).value == b'"Y"'


def test_a_write_stamped_with_a_version_its_coordinator_issued_before_a_restart_is_stamped_again_and_stored():
    """
    If a coordinator restarts with its clock set back (its hybrid logical clock starts afresh) and stamps a
    write with the version of an earlier write its replicas hold, then the write is stamped again above it and
    stored: it was acknowledged and stored nowhere, its replicas taking it for a copy they held.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n1 = cluster.nodes[0]
    ring = n1.ring()
    key = next(k for k in ("key-%d" % i for i in range(10000)) if ring.preference_list(k, 2) == ["n2", "n3"])
    code, body = cluster.request("PUT", n1, "/kv/" + key, {"value": "a"})
    assert code == 201
    wall = int(json.loads(body)["version"].split(".")[0])
    # The restarted process's clock: it reads that millisecond again. (Only the clock of versions matters
    # here: n1 owns nothing of this key.)
    again = HybridLogicalClock(lambda: wall / 1000.0 + 0.0004, "n1", max_ahead=n1.settings.max_clock_offset)
    assert again.now()[:2] == (wall, 0)
    n1.hlc = n1.coordinator.hlc = HybridLogicalClock(lambda: wall / 1000.0 + 0.0004, "n1",
                                                     max_ahead=n1.settings.max_clock_offset)
    code, body = cluster.request("PUT", n1, "/kv/" + key, {"value": "b"})
    assert code == 200
    assert json.loads(body)["version"] != "%d.0.n1" % (wall,)
    for node in cluster.nodes[1:]:
        code, got = cluster.request("GET", node, "/kv/" + key)
        assert json.loads(got)["value"] == "b", got


def test_a_previous_owner_holding_the_writes_version_for_another_value_counts_as_newer():
    """
    If a previous owner (asked while the ring settles) holds the very version a write carries but another value,
    then its answer names that version as newer, so the write is stamped again, as a replica's answer to a copy
    would (an equal version with the same value says nothing).
    """
    from kvresponder.coordinator import witnessed_result

    version = (1_000, 0, "n1")
    write = Entry("k", b'"b"', version)
    assert witnessed_result(Entry("k", b'"a"', version), write).newer == version
    assert witnessed_result(Entry("k", None, version), write).newer == version
    assert witnessed_result(Entry("k", b'"b"', version), write).newer is None


def test_a_node_whose_clock_ran_ahead_and_was_set_back_takes_no_write_until_its_clock_reaches_its_versions():
    """
    If a node's clock runs 30 s ahead long enough to stamp a write, and is then set right before any peer marks it
    skewed, then its versions stay 30 s ahead of its clock (they never go back): until its clock reaches them it
    answers writes 503 ``clock_skew`` naming that lead, reports itself not ready and logs
    ``discovery:versions-ahead``, while no peer sees its clock as off and it still serves reads. Once its clock has
    caught up, it takes writes again, stamped from its clock, and logs ``versions-caught-up``.
    """
    from kvresponder.log.discovery import VERSIONS_AHEAD, VERSIONS_CAUGHT_UP

    cluster = MemoryCluster(3)
    cluster.run(seconds=2.0)
    stepped = cluster.nodes[2]
    cluster.wall_offsets[3] = 30.0
    assert cluster.request("PUT", stepped, "/kv/ahead", {"value": 1})[0] == 201
    cluster.wall_offsets[3] = 0.0
    logged = []
    with capture(logged):
        cluster.run(seconds=2.0)
        code, body = cluster.request("PUT", stepped, "/kv/k", {"value": 2})
        assert code == 503
        error = json.loads(body)
        lead = float(re.search(r"versions are ([0-9.]+) s ahead of its clock", error["message"]).group(1))
        assert error["error"] == "clock_skew" and 27.0 < lead <= 28.0, error
        for method, path, body in (("DELETE", "/kv/ahead", None), ("POST", "/bulk", {"put": [{"key": "a", "value": 1}]}),
                                   ("POST", "/bulk", {"delete": ["ahead"]})):
            assert cluster.request(method, stepped, path, body)[0] == 503, (method, path)
        assert cluster.request("GET", stepped, "/kv/ahead")[0] == 200
        code, body = cluster.request("GET", stepped, "/health/ready")
        assert (code, json.loads(body)["status"]) == (503, "clock-skew")
        # /health says why: no clock is off, its versions lead.
        health = json.loads(cluster.request("GET", stepped, "/health")[1])
        assert health["clock_skew_s"] == 0.0 and 27.0 < health["clock_version_lead_s"] <= 28.0, health
        metrics = cluster.request("GET", stepped, "/metrics")[1].decode()
        assert 27.0 < float(re.search(r'kv_clock_version_lead_seconds{tenant="t1"} ([0-9.]+)', metrics).group(1)) <= 28.0
        for node in cluster.nodes:
            assert not node.clock_offsets.skewed
        cluster.run(seconds=30.0)
        assert cluster.request("GET", stepped, "/health/ready")[0] == 200
        code, body = cluster.request("PUT", stepped, "/kv/k", {"value": 3})
        assert code == 201
        assert int(json.loads(body)["version"].split(".")[0]) <= (cluster.clock.seconds() + 0.5) * 1000
    types = [message["message_type"] for message in logged if "message_type" in message]
    assert types.count(VERSIONS_AHEAD.message_type) == 1 and types.count(VERSIONS_CAUGHT_UP.message_type) == 1


def test_an_expired_write_reads_as_absent_even_when_a_replica_whose_clock_went_back_answers_first():
    """
    If one owner's clock is stepped back after it took an overwrite with a TTL, then, once the TTL has passed, a
    read through another node is a miss, whichever owner answers first: the stepped owner still holds the write
    live (its clock says it has time left), the other answers the tombstone it leaves, both of the same version,
    and the answer that says the write is over wins. It used to depend on which answer came first.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=2.0)
    reader = cluster.nodes[2]
    ring = reader.ring()
    key = next(key for key in ("ttl%d" % (i,) for i in range(200))
               if reader.node_id not in ring.preference_list(key, 2))
    first, second = ring.preference_list(key, 2)
    stepped = next(index for index, node in enumerate(cluster.nodes, 1) if node.node_id == first)
    assert cluster.request("PUT", reader, "/kv/" + key, {"value": 0})[0] == 201
    # An overwrite that expires leaves a tombstone (so that the value before it does not come back).
    assert cluster.request("PUT", reader, "/kv/" + key, {"value": 1, "ttl": 5})[0] == 200
    cluster.run(seconds=0.5)
    cluster.wall_offsets[stepped] = -3.0
    cluster.run(seconds=5.0)
    code, body = cluster.request("GET", reader, "/kv/" + key)
    assert code == 404, body
