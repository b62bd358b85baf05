"""
A node that was stalled (SIGSTOP, a frozen VM, CPU throttling) does not take the heartbeats that waited in its
socket for samples of its peers' clocks: :mod:`kvresponder.stalls`, its use by discovery, and a real node stopped
and continued.
"""

import signal
import time
import unittest

import pytest
import requests
from eliot.testing import LoggedMessage, capture_logging
from twisted.internet.task import Clock

from kvresponder.clockskew import ClockOffsets
from kvresponder.discovery import DiscoveryProtocol, DiscoveryService, HeartbeatCodec, derive_key
from kvresponder.log.discovery import STALLED
from kvresponder.membership import ALIVE, Heartbeat, Membership
from kvresponder.stalls import LOG_AFTER, StallWatch

from .harness import Cluster

NOW = 1_700_000_000.0
KEY = derive_key("a-cluster-secret-of-some-length", "discovery")


def _watch(tolerance=0.125):
    clock = Clock()
    clock.advance(NOW)
    return StallWatch(clock, tolerance), clock


def _ticking(watch, clock, seconds):
    """
    Run the reactor's timers for ``seconds``, one tick interval at a time, as a node that never stalls would.
    """
    for _ in range(int(seconds / watch.interval)):
        clock.advance(watch.interval)
        watch.tick()


def test_what_is_read_between_ticks_on_time_is_fresh():
    """
    If the watch ticks on time, then what is read at any moment between two ticks counts as fresh.
    """
    watch, clock = _watch()
    _ticking(watch, clock, 1.0)
    assert watch.fresh()
    clock.advance(watch.interval * 0.99)
    assert watch.fresh() and watch.held_for() <= watch.tolerance


def test_what_is_read_before_the_timers_run_after_a_stall_is_not_fresh():
    """
    If the node was stopped while waiting for its sockets (the reactor reads what waited before it runs the late
    timers), then what it reads then may have waited as long as the stall: not fresh.
    """
    watch, clock = _watch()
    _ticking(watch, clock, 1.0)
    clock.advance(14.0)
    assert not watch.fresh() and watch.held_for() == pytest.approx(14.0)


def test_what_is_read_after_a_late_tick_is_not_fresh_until_the_next_tick_on_time():
    """
    If the node was stopped while running its own code, so that it runs its timers (a late tick) before it reads
    what waited, then what it reads after that tick is not fresh; after the next tick, on time, it is.
    """
    watch, clock = _watch()
    _ticking(watch, clock, 1.0)
    clock.advance(14.0)
    watch.tick()
    assert not watch.fresh() and watch.held_for() == pytest.approx(14.0)
    clock.advance(watch.interval * 0.9)
    assert not watch.fresh()
    clock.advance(watch.interval * 0.1)
    watch.tick()
    assert watch.fresh()


class StallLogTests(unittest.TestCase):
    @capture_logging(None)
    def test_a_stall_of_a_second_or_more_is_logged_and_a_long_turn_is_not(self, logger):
        """
        If the node stalled for a second or more, then ``kvresponder:discovery:stalled`` says how long; a turn a
        few tenths of a second long only costs the samples it held, without a line.
        """
        watch, clock = _watch()
        _ticking(watch, clock, 1.0)
        clock.advance(0.4)
        watch.tick()
        self.assertEqual(LoggedMessage.of_type(logger.messages, STALLED), [])
        clock.advance(LOG_AFTER + 2.0)
        watch.tick()
        [message] = LoggedMessage.of_type(logger.messages, STALLED)
        self.assertAlmostEqual(message.message["seconds"], LOG_AFTER + 2.0, places=2)


def _protocol(stalls):
    clock = stalls.clock
    membership = Membership(clock.seconds, "n1", 15.0)
    clock_offsets = ClockOffsets(clock.seconds, 0.5, 15.0)
    protocol = DiscoveryProtocol(HeartbeatCodec("t1", KEY), membership, clock, clock.seconds,
                                 lambda: Heartbeat("n1", 1, "10.0.0.1", 3000, ALIVE, 1), None, "10.0.0.1", 9999,
                                 clock_offsets=clock_offsets, max_clock_offset=0.5, stalls=stalls)
    return protocol, membership, clock_offsets


class _Port:
    def stopListening(self):
        pass


def _started_service(protocol, interval: float) -> DiscoveryService:
    """
    ``protocol``'s discovery service, started on a port that sends nothing (the test hands the protocol datagrams).
    """
    service = DiscoveryService(protocol, lambda proto: _Port(), interval)
    protocol.transport = None
    service.startService()
    return service


def test_heartbeats_that_waited_through_a_stall_keep_their_senders_in_but_are_no_clock_samples():
    """
    If a node stalls for 14 s while two peers go on sending a heartbeat a second (clocks right), and it then reads
    them all at once, then the peers stay in its membership, their offsets stay those measured before the stall,
    and the node does not take its own clock for skewed; the first heartbeat read on time is a sample again.
    """
    watch, clock = _watch()
    protocol, membership, clock_offsets = _protocol(watch)
    codec = HeartbeatCodec("t1", KEY)
    sequence = {"n2": 0, "n3": 0}

    def heartbeat(node_id, sent_at):
        sequence[node_id] += 1
        beat = Heartbeat(node_id, 1, "10.0.0.%s" % (node_id[1],), 3000, ALIVE, 1)
        return codec.encode(beat, False, sent_at, sequence[node_id])

    for _ in range(3):
        for node_id in sequence:
            protocol.datagramReceived(heartbeat(node_id, clock.seconds()), ("10.0.0.2", 9999))
        _ticking(watch, clock, 1.0)
    stalled_at = clock.seconds()
    waited = [heartbeat(node_id, stalled_at + second) for second in range(14) for node_id in sequence]
    clock.advance(14.0)
    for data in waited:
        protocol.datagramReceived(data, ("10.0.0.2", 9999))
    watch.tick()
    assert sorted(peer.node_id for peer in membership.peers()) == ["n2", "n3"]
    assert clock_offsets.offsets() == {"n2": pytest.approx(0.0), "n3": pytest.approx(0.0)}
    assert not clock_offsets.skewed
    _ticking(watch, clock, 0.5)
    protocol.datagramReceived(heartbeat("n2", clock.seconds() + 0.2), ("10.0.0.2", 9999))
    assert sorted(clock_offsets._peers["n2"].samples)[-1] == pytest.approx(0.2)


def test_the_discovery_service_ticks_the_watch():
    """
    If the discovery service runs, then it ticks its protocol's watch on the reactor, at the watch's interval:
    a node that never stalls reads everything fresh.
    """
    watch, clock = _watch()
    protocol, membership, clock_offsets = _protocol(watch)


    service = _started_service(protocol, 5.0)
    try:
        for _ in range(100):
            clock.advance(watch.interval)
            assert watch.fresh()
    finally:
        service.stopService()


# -- a real node, stopped and continued -------------------------------------------------------------------


@pytest.fixture
def slow_heartbeat_cluster(log_dir):
    # A peer timeout far longer than the stall: the stalled node stays in its peers' rings, and they in its.
    nodes = Cluster("stalls", log_dir, env={"HEARTBEAT_INTERVAL": "0.5", "PEER_TIMEOUT": "20"})
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.mark.e2e
def test_a_node_stopped_for_seconds_and_continued_does_not_take_its_clock_for_skewed(slow_heartbeat_cluster):
    """
    If one node of three is stopped (SIGSTOP) for 6 s, while its peers send it twelve heartbeats each, and is then
    continued, then it stays ready and serves writes: it does not read the heartbeats that waited in its socket as
    its peers' clocks being 6 s behind; and it logs that it stalled.
    """
    cluster = slow_heartbeat_cluster
    for _ in range(3):
        cluster.add()
    stalled = cluster.nodes[2]
    assert stalled.put("before", 1).status_code in (200, 201)
    stalled.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(6.0)
    finally:
        stalled.process.send_signal(signal.SIGCONT)
    answers = []
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        ready = requests.get(stalled.url + "/health/ready", timeout=5)
        written = stalled.put("after", 2)
        answers.append((ready.status_code, written.status_code, written.text[:120]))
        time.sleep(0.2)
    assert all(ready == 200 and written in (200, 201) for ready, written, _ in answers), answers
    types = [message.get("message_type") for message in stalled.log_messages()]
    assert "kvresponder:discovery:clock-skewed" not in types
    stalls = [message["seconds"] for message in stalled.log_messages()
              if message.get("message_type") == "kvresponder:discovery:stalled"]
    assert max(stalls, default=0.0) >= 5.0, stalls


def test_after_a_stall_the_service_expires_no_peer_before_it_has_read_what_waited():
    """
    If this node was stalled longer than the peer timeout, then the expiry round that runs first (timers run before
    the sockets are read) forgets no peer: their heartbeats may be waiting unread. Once read, the peer stays; a
    peer that sent none during the stall is forgotten at the next round on time.
    """
    watch, clock = _watch()
    protocol, membership, _ = _protocol(watch)


    codec = HeartbeatCodec("t1", KEY)
    sent = {"n2": 0, "n3": 0}

    def heartbeat(node_id, sent_at):
        sent[node_id] += 1
        beat = Heartbeat(node_id, 1, "10.0.0.%s" % (node_id[1],), 3000, ALIVE, 1)
        return codec.encode(beat, False, sent_at, sent[node_id])

    service = _started_service(protocol, 1.0)
    try:
        protocol.datagramReceived(heartbeat("n2", clock.seconds()), ("10.0.0.2", 9999))
        protocol.datagramReceived(heartbeat("n3", clock.seconds()), ("10.0.0.3", 9999))
        clock.advance(membership.peer_timeout * 3)  # stalled: every timer runs late, at once
        assert {peer.node_id for peer in membership.peers()} == {"n2", "n3"}
        protocol.datagramReceived(heartbeat("n2", clock.seconds()), ("10.0.0.2", 9999))  # what waited for it
        for _ in range(int(1.0 / watch.interval) + 2):
            clock.advance(watch.interval)
        assert [peer.node_id for peer in membership.peers()] == ["n2"]
    finally:
        service.stopService()


def test_a_node_whose_turns_are_long_but_shorter_than_a_heartbeat_still_expires_the_dead():
    """
    If this node's turns are long (load: each tick late), but none as long as a heartbeat interval, then a peer
    silent for the peer timeout is still forgotten: only a stall that could make a live peer look dead holds
    expiry back.
    """
    watch, clock = _watch()
    protocol, membership, _ = _protocol(watch)


    codec = HeartbeatCodec("t1", KEY)
    service = _started_service(protocol, 1.0)
    try:
        protocol.datagramReceived(codec.encode(Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1), False, clock.seconds(),
                                               1), ("10.0.0.2", 9999))
        for _ in range(int((membership.peer_timeout + 2) / 0.4)):
            clock.advance(0.4)  # every turn 0.4 s: each tick late, over the watch's tolerance
        assert membership.peers() == []
    finally:
        service.stopService()


@pytest.fixture
def fast_timeout_cluster(log_dir):
    # A peer timeout (three heartbeats: 1.5 s) far shorter than the stall: the stalled node's peers time it out.
    nodes = Cluster("stalls2", log_dir, env={"HEARTBEAT_INTERVAL": "0.5"})
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.mark.e2e
def test_writes_a_node_takes_as_it_comes_back_from_a_long_stall_are_on_two_nodes(fast_timeout_cluster):
    """
    If a node busy with writes is stopped (SIGSTOP) for longer than the peer timeout, and then continued (three
    times), then it times out no peer, and each write it acknowledges is stored on two nodes: killed a second
    later, its writes are all read from the others.
    Before, a node stopped in the middle of its work ran its peer expiry before reading the heartbeats that waited
    in its socket, declared every peer dead, and acknowledged the writes it read meanwhile with its one copy, lost
    with it.
    """
    import threading

    cluster = fast_timeout_cluster
    for _ in range(3):
        cluster.add()
    stalled, others = cluster.nodes[2], cluster.nodes[:2]
    acknowledged = []
    running = threading.Event()
    running.set()

    def write(writer):
        session = requests.Session()
        count = 0
        while running.is_set():
            key = "w%d-%d" % (writer, count)
            count += 1
            try:
                answer = session.put(stalled.url + "/kv/" + key, json={"value": count}, timeout=30)
            except requests.RequestException:
                continue
            if answer.status_code in (200, 201):
                acknowledged.append(key)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(12)]
    for writer in writers:
        writer.start()
    try:
        for _ in range(3):
            # Three times: stopped while busy, it is more often in the middle of its work than waiting for events.
            time.sleep(1.0)
            stalled.process.send_signal(signal.SIGSTOP)
            try:
                time.sleep(2.5)  # the peers time it out; writes wait in its socket
            finally:
                stalled.process.send_signal(signal.SIGCONT)
        time.sleep(1.0)
    finally:
        running.clear()
        for writer in writers:
            writer.join(30)
    changes = [message.get("change") for message in stalled.log_messages()
               if message.get("action_type") == "kvresponder:discovery:peer-changed"]
    stalled.kill()
    assert len(acknowledged) > 50, len(acknowledged)
    cluster.wait_for(lambda: all(node.metric("kv_ring_members") == 2 for node in others), 20, "a ring of two")
    session = requests.Session()
    missing = [key for key in acknowledged
               if session.get(others[0].url + "/kv/" + key, timeout=10).status_code != 200]
    assert missing == [], (len(missing), len(acknowledged), changes)
    assert "dead" not in changes, changes


def test_with_a_tiny_clock_bound_heartbeats_read_on_time_still_count():
    """
    If MAX_CLOCK_OFFSET is tiny (a tolerance below two of the shortest ticks), then the watch still ticks twice
    within its tolerance: what a reactor that never stalls reads counts as fresh.
    """
    watch, clock = _watch(tolerance=0.001)
    for _ in range(100):
        clock.advance(watch.interval * 0.99)
        assert watch.fresh()
        watch.tick()


class StartTests(unittest.TestCase):
    @capture_logging(None)
    def test_a_watch_started_seconds_after_it_was_made_sees_no_stall(self, logger):
        """
        If the service starts the watch seconds after it was made (a slow start), then its first tick is no stall:
        nothing is logged and what is read next is fresh.
        """
        watch, clock = _watch()
        clock.advance(5.0)
        watch.tick()
        self.assertEqual(LoggedMessage.of_type(logger.messages, STALLED), [])
        self.assertTrue(watch.fresh())
