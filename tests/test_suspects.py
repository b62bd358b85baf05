"""
Suspect peers (kvresponder.suspects): a peer a call just found unreachable gets its calls failed at once for a
while, on the request path (PeerTransport) and the copy stream's (StreamCopySender), on a Clock.
"""

import errno
from collections import namedtuple

import pytest
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, ensureDeferred
from twisted.internet.error import (ConnectBindError, ConnectError, ConnectingCancelledError, ConnectionLost,
                                    ConnectionRefusedError, NoRouteError, TCPTimedOutError,
                                    TimeoutError as ConnectTimeout)
from twisted.internet.task import Clock

from kvresponder.copysender import StreamCopySender
from kvresponder.copystream import StreamError, StreamTimeout
from kvresponder.metrics import Metrics
from kvresponder.peers import PeerClient, PeerError
from kvresponder.store import ApplyResult, Entry
from kvresponder.suspects import LATE_TIMEOUT, SUSPECT_FOR, SuspectPeers, unreachable

Peer = namedtuple("Peer", "node_id address port")
PEER = Peer("n2", "10.0.0.2", 3000)
OTHER = Peer("n3", "10.0.0.3", 3000)


@pytest.mark.parametrize("error, expected", [
    (ConnectTimeout(), True), (TCPTimedOutError(), True), (NoRouteError(), True),
    (ConnectError(osError=errno.EHOSTUNREACH), True),
    # Told by the time, not the type: a cancelled connect may be this node's own (at shutdown), and a timeout
    # may be its own stall.
    (DeferredTimeout(), False), (ConnectingCancelledError(None), False),
    # This node's own shortage: no file descriptor or port to connect with.
    (ConnectBindError(osError=errno.EMFILE), False), (ConnectError(osError=errno.EADDRNOTAVAIL), False),
    (ConnectionRefusedError(), False), (ConnectionLost(), False), (ValueError(), False),
])
def test_only_a_peer_not_reached_counts_as_unreachable(error, expected):
    assert unreachable(error) is expected


def test_a_suspect_stays_one_for_its_time_and_is_logged_once(eliot_logger):
    clock = Clock()
    metrics = Metrics("t1")
    suspects = SuspectPeers(clock, metrics=metrics)
    assert not suspects.suspected(PEER) and metrics.gauge("kv_peers_suspected") == 0
    suspects.failed(PEER, "TimeoutError")
    clock.advance(1.0)
    suspects.failed(PEER, "TimeoutError")  # again while a suspect: its time starts over, no second message
    assert suspects.suspected(PEER) and not suspects.suspected(OTHER)
    assert metrics.gauge("kv_peers_suspected") == 1
    clock.advance(SUSPECT_FOR - 0.01)
    assert suspects.suspected(PEER)
    clock.advance(0.02)
    assert not suspects.suspected(PEER) and metrics.gauge("kv_peers_suspected") == 0
    messages = [m for m in eliot_logger.messages if m.get("message_type") == "kvresponder:replication:peer-suspected"]
    assert [(m["peer"], m["reason"], m["seconds"]) for m in messages] == [("n2", "TimeoutError", SUSPECT_FOR)]


def test_a_suspect_that_answers_is_none_any_more(eliot_logger):
    suspects = SuspectPeers(Clock())
    suspects.failed(PEER, "TimeoutError")
    suspects.answered(PEER)
    assert not suspects.suspected(PEER)


def test_suspects_whose_time_is_over_are_forgotten(eliot_logger):
    clock = Clock()
    suspects = SuspectPeers(clock)
    for index in range(100):
        suspects.failed(Peer("n%d" % index, "10.0.1.%d" % index, 3000), "TimeoutError")
    clock.advance(SUSPECT_FOR + 1)
    suspects.failed(PEER, "TimeoutError")
    assert suspects.count() == 1 and len(suspects._until) == 1


def _settle(posts):
    """Answer the calls still out, so that no coroutine is left suspended inside its action."""
    for d in posts:
        if not d.called:
            d.callback((200, b"{}"))


def _get(client, peer):
    """A read from ``peer``, as a client request's read is sent."""
    return client.transport.call(peer, "get", {"keys": ["k"]}, read=True)


def _client():
    clock = Clock()
    posts = []

    def post(url, headers, body, timeout, peer_id=""):
        d = Deferred()
        posts.append(d)
        return d
    client = PeerClient(http=None, clock=clock, tenant="t1", timeout=2.0, post=post)
    return client, clock, posts


def test_a_call_that_times_out_makes_the_peer_a_suspect_whose_next_calls_fail_at_once(eliot_logger):
    """
    If a call to a peer gets no answer in time, then the calls to it in the next seconds fail at once, without
    a request, while calls to other peers go; afterwards the peer is called again.
    """
    client, clock, posts = _client()
    outcomes = []
    ensureDeferred(_get(client, PEER)).addBoth(outcomes.append)
    clock.advance(2.0)
    posts[0].errback(DeferredTimeout())
    assert outcomes[0].check(PeerError)
    ensureDeferred(_get(client, PEER)).addBoth(outcomes.append)
    assert len(posts) == 1 and outcomes[1].check(PeerError)
    assert "moments ago" in str(outcomes[1].value)
    ensureDeferred(_get(client, OTHER)).addBoth(outcomes.append)
    assert len(posts) == 2
    clock.advance(SUSPECT_FOR)
    ensureDeferred(_get(client, PEER)).addBoth(outcomes.append)
    assert len(posts) == 3
    _settle(posts)


def test_a_timeout_that_fires_late_or_ends_a_long_walk_makes_no_suspect(eliot_logger):
    """
    If a call's timeout fires a second past its due time (this node stalled, and the answer may be waiting in
    its socket), or the call that timed out was a walk a peer may take its time over (anti-entropy's), then
    the peer is no suspect.
    """
    client, clock, posts = _client()
    outcomes = []
    ensureDeferred(_get(client, PEER)).addBoth(outcomes.append)
    clock.advance(3.0)
    posts[0].errback(DeferredTimeout())
    ensureDeferred(client.transport.call(PEER, "sync/buckets", {})).addBoth(outcomes.append)
    clock.advance(2.0)
    posts[1].errback(DeferredTimeout())
    assert [outcome.check(PeerError) for outcome in outcomes] == [PeerError, PeerError]
    assert not client.suspects.suspected(PEER)


def test_calls_waiting_for_their_turn_fail_at_once_once_the_peer_is_a_suspect(eliot_logger):
    """
    If calls to a peer queue behind the most it may have in flight, and the peer becomes a suspect meanwhile,
    then the queued calls fail as their turn comes, without being sent.
    """
    from kvresponder.peertransport import MAX_IN_FLIGHT

    client, clock, posts = _client()
    outcomes = []
    for _ in range(MAX_IN_FLIGHT + 3):
        ensureDeferred(_get(client, PEER)).addBoth(outcomes.append)
    assert len(posts) == MAX_IN_FLIGHT
    clock.advance(2.0)
    posts[0].errback(DeferredTimeout())
    assert client.suspects.suspected(PEER)
    _settle(posts)
    assert len(posts) == MAX_IN_FLIGHT and len(outcomes) == MAX_IN_FLIGHT + 3
    failed = [outcome for outcome in outcomes if not isinstance(outcome, dict)]
    assert len(failed) == 4 and all(outcome.check(PeerError) for outcome in failed)


def test_a_clock_stepped_back_does_not_stretch_a_suspicion(eliot_logger):
    clock = Clock()
    clock.advance(1000)
    suspects = SuspectPeers(clock)
    suspects.failed(PEER, "TimeoutError")
    clock.rightNow -= 60
    assert not suspects.suspected(PEER) and suspects.count() == 0


def test_a_call_on_a_kept_connection_left_unanswered_until_its_timeout_makes_a_suspect(eliot_logger):
    """
    If a call on a pooled connection gets no answer, its timeout cancels it and treq reports a response never
    received (not a timeout): the peer becomes a suspect all the same, and is not asked a second time.
    """
    from twisted.internet.defer import CancelledError
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseNeverReceived

    client, clock, posts = _client()
    outcomes = []
    ensureDeferred(_get(client, PEER)).addBoth(outcomes.append)
    clock.advance(2.0)
    posts[0].errback(ResponseNeverReceived([Failure(CancelledError())]))
    assert len(posts) == 1 and outcomes[0].check(PeerError)
    assert client.suspects.suspected(PEER)


def test_a_refused_connection_or_an_error_answer_makes_no_suspect(eliot_logger):
    client, clock, posts = _client()
    outcomes = []
    ensureDeferred(client.transport.call(PEER, "keys", {})).addBoth(outcomes.append)
    posts[0].errback(ConnectionRefusedError())
    ensureDeferred(client.transport.call(PEER, "keys", {})).addBoth(outcomes.append)
    posts[1].callback((503, b'{"error": "unavailable"}'))
    ensureDeferred(client.transport.call(PEER, "keys", {})).addBoth(outcomes.append)
    assert len(posts) == 3 and not client.suspects.suspected(PEER)
    _settle(posts)


class _Streams:
    """A CopyStreams stand-in whose sends the test settles."""

    def __init__(self):
        self.sent = []

    def usable(self, peer):
        return True

    def send(self, peer, entries, task_ids, timeout):
        d = Deferred()
        self.sent.append(d)
        return d


def _stream_sender():
    """
    A copy stream sender with a 2 s timeout over a :class:`_Streams`, its clock and suspects, an entry to send and
    a list for the outcomes.
    """
    clock = Clock()
    streams = _Streams()
    suspects = SuspectPeers(clock)
    return clock, streams, suspects, StreamCopySender(streams, None, clock, None, 2.0, suspects), \
        Entry("k", b"1", (1, 0, "n1")), []


def test_a_stream_batch_unanswered_in_time_makes_the_peer_a_suspect_and_its_next_batches_fail_at_once(eliot_logger):
    """
    If a batch on the copy stream gets no answer in time, then the next batch for that peer fails at once, with
    the PeerError a write fails over on, and nothing is sent; an answered batch or an error status makes no
    suspect.
    """
    clock, streams, suspects, sender, entry, outcomes = _stream_sender()
    sender.send(PEER, [entry], [b"-"]).addBoth(outcomes.append)
    streams.sent[0].callback([ApplyResult(True, False)])
    sender.send(PEER, [entry], [b"-"]).addBoth(outcomes.append)
    streams.sent[1].errback(StreamError(503, "answered 503"))
    assert not suspects.suspected(PEER)
    sender.send(PEER, [entry], [b"-"]).addBoth(outcomes.append)
    clock.advance(2.0)  # the batch's timeout fires when it is due
    streams.sent[2].errback(StreamTimeout("no answer"))
    assert suspects.suspected(PEER)
    sender.send(PEER, [entry], [b"-"]).addBoth(outcomes.append)
    assert len(streams.sent) == 3
    assert outcomes[0] == [ApplyResult(True, False)]
    assert all(outcome.check(PeerError) for outcome in outcomes[1:])
    assert outcomes[3].value.code is None


def test_a_stream_batch_whose_timeout_fired_late_makes_no_suspect(eliot_logger):
    """
    If a batch's timeout fires well after it was due (this node's reactor was held up, not the peer), then the
    batch fails over as usual, but the peer is no suspect: its next batch is sent.
    """
    clock, streams, suspects, sender, entry, outcomes = _stream_sender()
    sender.send(PEER, [entry], [b"-"]).addBoth(outcomes.append)
    clock.advance(2.0 + LATE_TIMEOUT + 0.5)
    streams.sent[0].errback(StreamTimeout("no answer"))
    assert outcomes[0].check(PeerError) and not suspects.suspected(PEER)
    sender.send(PEER, [entry], [b"-"]).addBoth(outcomes.append)
    assert len(streams.sent) == 2


def test_a_suspect_that_restarts_is_none_once_its_new_incarnation_is_heard(eliot_logger):
    """
    If a peer is a suspect and a heartbeat of a new incarnation of it arrives (it restarted, at the same address
    or another), then the node calls it again at once, rather than after the suspect's 5 s.
    """
    from kvresponder.node import Node

    from .support import heartbeat, make_settings

    clock = Clock()
    node = Node(make_settings(), clock, http=None)
    node.membership.observe(heartbeat("n2", incarnation=1, address="10.0.0.2"))
    peer = node.membership.peer("n2")
    node.peers.suspects.failed(peer, "TimeoutError")
    node.membership.observe(heartbeat("n2", incarnation=1, address="10.0.0.2"))
    assert node.peers.suspects.suspected(peer)
    node.membership.observe(heartbeat("n2", incarnation=2, address="10.0.0.2"))
    assert not node.peers.suspects.suspected(node.membership.peer("n2"))
