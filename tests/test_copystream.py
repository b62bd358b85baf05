"""
The copy stream (kvresponder.copystream): real nodes' HTTP servers on loopback sockets, a real client, and,
for the exact order of events around a lost connection, a fake endpoint on task.Clock.
"""

import binascii
import hashlib
import json
import socket
import struct
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from kvresponder import copystream
from kvresponder.copystream import (MAX_BATCH_ID, REFUSED_FOR, UPGRADE_TOKEN, CopyStreamClient, CopyStreams,
                                    CopyStreamServer, ReadsUnsupported, StreamError, StreamRefused, StreamTimeout,
                                    StreamUnanswered, decode_results, encode_answer)
from kvresponder.discovery import derive_key
from kvresponder.http.root import RootResource, TenantResource, build_root, _NotFound
from kvresponder.http.site import KVSite
from kvresponder.node import Node
from kvresponder.peers import MAX_BATCHES_IN_FLIGHT, PeerClient, PeerError
from kvresponder.privateapi import tcp_write_buffered
from kvresponder.store import ApplyResult, Entry
from kvresponder.wire import encode_batch

from .streams import (PEER, SECRET, Peer, fake_endpoint_streams, keeping, loopback_streams, numbered_entry,
                      server, signer)  # noqa: F401  (server: a fixture)
from .support import make_settings, stub_over

async def _until(predicate, seconds=5.0):
    waited = 0.0
    while not predicate():
        if waited >= seconds:
            raise AssertionError("condition not met within %ss" % (seconds,))
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02





@pytest_twisted.ensureDeferred
async def test_a_batch_sent_over_the_stream_is_stored_and_answered_an_entry_at_a_time(server):
    peer = server()
    streams = loopback_streams(signer())
    try:
        peer.node.store.apply(numbered_entry(2, b"older"))
        results = await streams.send(peer.peer, [numbered_entry(1), numbered_entry(2, b"newer", 1), numbered_entry(3)], [b"-"] * 3, 2.0)
        assert results == [ApplyResult(True, False), ApplyResult(True, True), ApplyResult(True, False)]
        assert peer.node.store.current("k2").value == b"newer"
        again = await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
        assert again == [ApplyResult(False, True)]   # the same version again: not newer
        assert streams.open_count() == 1 and peer.node.metrics.gauge("kv_copy_streams_incoming") == 1
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_a_batch_on_an_open_stream_leaves_at_once_rather_than_at_the_reactors_next_turn(server):
    peer = server()
    streams = loopback_streams(signer())
    try:
        await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
        [stream] = streams._open.values()
        d = streams.send(peer.peer, [numbered_entry(2)], [b"-"], 2.0)
        # Sent with one system call, not queued until the reactor reports the socket writable, and with Nagle's
        # algorithm off, so that a frame sent while the last is unacknowledged does not wait for its ACK.
        assert not tcp_write_buffered(stream.transport)
        assert stream.transport not in reactor.getWriters()
        assert stream.transport.getTcpNoDelay()
        assert await d == [ApplyResult(True, False)]
    finally:
        streams.close()


class _NoDelayTransport(StringTransport):
    def __init__(self):
        StringTransport.__init__(self)
        self.no_delay = False

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


def test_the_peers_end_of_a_stream_turns_nagle_off():
    transport = _NoDelayTransport()
    server = CopyStreamServer(lambda entries, task_ids: [], None, b"n" * 16, 1 << 20, lambda reason: None,
                              wall=time.time)
    server.makeConnection(transport)
    assert transport.no_delay is True


@pytest_twisted.ensureDeferred
async def test_the_writers_metrics_count_its_open_streams(server):
    """
    If a node opens a copy stream to a peer, then its ``kv_copy_streams_outgoing`` reads 1 (and the peer's
    ``kv_copy_streams_incoming``), and 0 once the stream is closed.
    """
    from kvresponder.metrics import Metrics

    peer = server()
    metrics = Metrics("t1")
    metrics.register_live_gauges(dict)
    streams = loopback_streams(signer(), metrics=metrics)
    assert metrics.gauge("kv_copy_streams_outgoing") == 0
    await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
    assert metrics.gauge("kv_copy_streams_outgoing") == 1
    assert b'kv_copy_streams_outgoing{tenant="t1"} 1.0' in metrics.exposition()
    streams.close()
    assert metrics.gauge("kv_copy_streams_outgoing") == 0
    await _until(lambda: peer.node.metrics.gauge("kv_copy_streams_incoming") == 0)


@pytest_twisted.ensureDeferred
async def test_the_stream_outlives_the_http_idle_timeout_and_frees_its_connection_slot_when_closed(server):
    """
    If frames keep a stream busy for longer than the HTTP connection's idle timeout, then the same stream stays
    open (the HTTP timers stopped when the connection was handed over; the stream's own idle timer never fires
    while frames flow), and once closed it frees its connection slot on the peer.
    """
    peer = server(timeout=0.5)
    streams = loopback_streams(signer())
    await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
    assert peer.site.open_connections == 1
    [stream] = streams._open.values()
    # A frame every 0.1 s (the stream's own idle timeout, the same 0.5 s, never comes near), for three times the
    # HTTP idle timeout.
    for index in range(2, 17):
        await deferLater(reactor, 0.1, lambda: None)
        await streams.send(peer.peer, [numbered_entry(index)], [b"-"], 2.0)
    assert list(streams._open.values()) == [stream] and not stream.closed
    assert peer.site.open_connections == 1 and peer.node.metrics.gauge("kv_copy_streams_incoming") == 1
    streams.close()
    await _until(lambda: peer.site.open_connections == 0)
    assert peer.node.metrics.gauge("kv_copy_streams_incoming") == 0


@pytest_twisted.ensureDeferred
async def test_a_connection_handed_over_to_a_copy_stream_does_not_hold_up_a_stopping_nodes_wait(server):
    """
    If a peer holds a copy stream open into a node that stops, then the node's wait for the requests it took
    ends at once: the stream answers each batch in the turn it arrives, and owes nothing after it. (The
    upgrade request it came from would otherwise look unanswered, and hold the wait to its timeout.)
    """
    peer = server()
    streams = loopback_streams(signer())
    try:
        await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
        assert peer.site.open_connections == 1 and peer.node.metrics.gauge("kv_copy_streams_incoming") == 1
        started = reactor.seconds()
        await peer.site.requests_done(5.0)
        assert reactor.seconds() - started < 1.0
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_an_upgrade_signed_with_another_secret_is_refused_and_the_peer_is_left_to_http(server):
    peer = server()
    streams = loopback_streams(signer("some-other-secret-entirely"))
    with pytest.raises(StreamRefused) as caught:
        await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
    assert caught.value.code == 401
    assert not streams.usable(peer.peer)
    assert peer.node.store.current("k1") is None
    await _until(lambda: peer.site.open_connections == 0)


def test_a_refused_peer_is_tried_again_after_the_refusal_period():
    clock, endpoints, streams = fake_endpoint_streams()
    peer = PEER
    failures = []
    streams.send(peer, [numbered_entry(1)], [b"-"], 2.0).addErrback(failures.append)
    endpoints.answer(0, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert failures[0].check(StreamRefused) and failures[0].value.code == 404
    assert not streams.usable(peer)
    clock.advance(REFUSED_FOR - 1)
    assert not streams.usable(peer)
    clock.advance(1)
    assert streams.usable(peer)


@pytest_twisted.ensureDeferred
async def test_copies_to_a_peer_without_streams_go_as_http_requests(server):
    # A peer of an older version: no copies route, so the upgrade gets a 404.
    settings = make_settings("t1", "n2", advertise_address="127.0.0.1", port="3000", cluster_secret=SECRET)
    node = Node(settings, reactor, http=None)
    full = build_root(node, node.authenticator)
    tenant = full.getChildWithDefault(b"t1", None)
    old = RootResource("t1", TenantResource(tenant._kv, tenant._public, tenant._internal,
                                            _NotFound("No such route.")))
    peer = server(root=old)
    peer.node = node
    pool = HTTPConnectionPool(reactor, persistent=False)
    # What is tested is the fall-back to requests, not a timeout: 10 s, for a loaded machine.
    client = PeerClient(HTTPClient(Agent(reactor, pool=pool)), reactor, "t1", 10.0, signer(),
                        streams=loopback_streams(signer()))
    try:
        results = await client.apply_coalesced(peer.peer, numbered_entry(1))
        assert results == ApplyResult(True, False)
        assert node.store.current("k1").value == b"v"
        assert not client.streams.usable(peer.peer)
        # The next copies go straight to HTTP, without another upgrade.
        assert await client.apply_coalesced(peer.peer, numbered_entry(2)) == ApplyResult(True, False)
        assert node.store.current("k2") is not None
    finally:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_a_peer_that_is_down_fails_the_copy_over_without_falling_back_to_http(server):
    peer = server()
    address = peer.peer
    await peer.stop()
    client = PeerClient(None, reactor, "t1", 2.0, signer(), streams=loopback_streams(signer()))
    with pytest.raises(PeerError) as caught:
        await client.apply_coalesced(address, numbered_entry(1))
    assert "unreachable" in str(caught.value)
    assert client.streams.usable(address)


@pytest_twisted.ensureDeferred
async def test_a_malformed_batch_gets_a_400_and_the_stream_carries_on(server):
    peer = server()
    streams = loopback_streams(signer())
    try:
        await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
        stream = streams._open[("127.0.0.1", peer.peer.port)]
        with pytest.raises(StreamError) as caught:
            await stream.send(b"not a batch", [b"-"], 2.0)
        assert caught.value.code == 400 and "Malformed batch" in str(caught.value)
        assert await streams.send(peer.peer, [numbered_entry(2)], [b"-"], 2.0) == [ApplyResult(True, False)]
        assert streams._open[("127.0.0.1", peer.peer.port)] is stream
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_entries_do_not_fit_their_schema_gets_a_400_and_nothing_is_applied(server,
                                                                                               monkeypatch):
    """
    If a well-framed batch on a stream holds an entry whose version names a malformed node id, or whose
    expiry is not finite, then the batch is answered 400 (as /_internal/apply answers it), none of it is
    applied, no traceback is logged, and the stream carries on.
    """
    tracebacks = []
    monkeypatch.setattr(copystream, "write_traceback", lambda *a, **k: tracebacks.append(a))
    peer = server()
    streams = loopback_streams(signer())
    try:
        await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
        stream = streams._open[("127.0.0.1", peer.peer.port)]
        bad_node = Entry("k7", b"1", (1_700_000_000_000, 0, "bad node"), None)
        forever = Entry("k8", b"1", (1_700_000_000_000, 0, "n9"), float("inf"))
        for bad in (bad_node, forever):
            with pytest.raises(StreamError) as caught:
                await stream.send(encode_batch([numbered_entry(5), bad], 0.0), [b"-", b"-"], 2.0)
            assert caught.value.code == 400 and "Malformed batch" in str(caught.value)
        assert peer.node.store.current("k5") is None
        assert await streams.send(peer.peer, [numbered_entry(2)], [b"-"], 2.0) == [ApplyResult(True, False)]
        assert tracebacks == []
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_an_entry_over_the_peers_budget_is_answered_413_through_peer_client(server):
    peer = server(max_memory="1Mi")
    client = PeerClient(None, reactor, "t1", 2.0, signer(), streams=loopback_streams(signer()))
    huge = Entry("big", b"x" * (2 * 1024 * 1024), (1_700_000_000_000, 0, "n9"), None)
    try:
        with pytest.raises(PeerError) as caught:
            await client.apply_coalesced(peer.peer, huge)
        assert caught.value.code == 413
        assert peer.node.store.current("big") is None
    finally:
        client.streams.close()


@pytest_twisted.ensureDeferred
async def test_a_node_that_begins_leaving_answers_each_later_batch_on_an_open_stream_503_and_stores_none(server):
    """
    If a peer holds a copy stream open into a node that then begins leaving (its drain may end at once, and its
    process exit), then each later batch on that stream is answered 503 ``leaving`` and none of it is stored; the
    stream stays open, as after any error answer.
    """
    peer = server()
    streams = loopback_streams(signer())
    try:
        await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
        [stream] = streams._open.values()
        peer.node.begin_leaving()
        with pytest.raises(StreamError) as caught:
            await streams.send(peer.peer, [numbered_entry(2), numbered_entry(3)], [b"-", b"-"], 2.0)
        assert caught.value.code == 503 and "leaving" in str(caught.value)
        # Named, so that a write with no node left to fail over to can count the node out of its quorum.
        assert caught.value.error == "leaving"
        assert peer.node.store.current("k2") is None and peer.node.store.current("k3") is None
        assert list(streams._open.values()) == [stream] and not stream.closed
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_a_copy_a_leaving_node_refuses_on_a_new_stream_fails_over_at_once_and_makes_no_suspect(server):
    """
    If a node that has begun leaving is sent a write's copy by a peer that has not heard it yet, then the peer's
    stream to it opens as usual, the copy fails with the node's 503 at once (not after the call's timeout, and
    not sent again over HTTP), and the node is no suspect: its reads still go to it.
    """
    peer = server()
    peer.node.begin_leaving()
    client = PeerClient(None, reactor, "t1", 5.0, signer(), streams=loopback_streams(signer()))
    try:
        started = reactor.seconds()
        with pytest.raises(PeerError) as caught:
            await client.apply_coalesced(peer.peer, numbered_entry(1))
        assert (caught.value.code, caught.value.error) == (503, "leaving")
        assert reactor.seconds() - started < 2.5
        assert not client.suspects.suspected(peer.peer)
        assert client.streams.usable(peer.peer) and client.streams.open_count() == 1
        assert peer.node.store.current("k1") is None
    finally:
        client.streams.close()


async def _raw_stream(peer, key):
    """
    A stream opened by hand, for frames the real client would never send.
    """
    auth = signer()
    path = b"/t1/_internal/copies"
    request = (b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: " + UPGRADE_TOKEN +
               b"\r\nX-KV-Auth: " + auth.sign(b"GET", path, b"") + b"\r\n\r\n")
    protocol = CopyStreamClient(request, key, reactor)
    lost = Deferred()
    protocol.notify_close(lambda: lost.callback(None))
    await TCP4ClientEndpoint(reactor, "127.0.0.1", peer.peer.port).connect(_Build(protocol))
    await protocol.ready
    return protocol, lost


@pytest_twisted.ensureDeferred
async def test_a_frame_with_a_bad_mac_closes_the_stream_and_stores_nothing(server):
    peer = server()
    protocol, lost = await _raw_stream(peer, derive_key("wrong", "peer"))
    outcome = []
    protocol.send(encode_batch([numbered_entry(1)], 0.0), [b"-"], 2.0).addBoth(outcome.append)
    await lost
    assert outcome[0].check(ConnectionLost)
    assert peer.node.store.current("k1") is None


@pytest_twisted.ensureDeferred
async def test_a_replayed_batch_id_closes_the_stream(server):
    peer = server()
    protocol, lost = await _raw_stream(peer, signer().stream_key())
    assert decode_results(await protocol.send(encode_batch([numbered_entry(1)], 0.0), [b"-"], 2.0), 1) == [ApplyResult(True, False)]
    protocol._next_id = 0   # the next frame reuses batch id 1
    outcome = []
    protocol.send(encode_batch([numbered_entry(2)], 0.0), [b"-"], 2.0).addBoth(outcome.append)
    await lost
    assert outcome[0].check(ConnectionLost)
    assert peer.node.store.current("k2") is None


@pytest_twisted.ensureDeferred
async def test_the_route_answers_json_errors_to_what_is_not_an_upgrade(server):
    peer = server()
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    base = "http://127.0.0.1:%d/t1/_internal/copies" % (peer.peer.port,)
    auth = signer()
    signed = {b"X-KV-Auth": [auth.sign(b"GET", b"/t1/_internal/copies", b"")]}
    cases = [
        ("GET", {}, 401, "unauthorized"),
        ("GET", signed, 426, "upgrade_required"),
        ("POST", signed, 405, "method_not_allowed"),
    ]
    for method, headers, status, error in cases:
        response = await http.request(method, base, headers=headers)
        body = json.loads(await response.content())
        assert (response.code, body["error"]) == (status, error), method
    assert peer.node.metrics.gauge("kv_copy_streams_incoming") == 0


def test_a_connection_that_cannot_be_handed_over_gets_a_501():
    settings = make_settings("t1", "n2", insecure_cluster="true")
    node = Node(settings, Clock(), http=None)
    stub = stub_over(KVSite(build_root(node), Clock()))
    d = stub.get("http://10.0.0.2:3000/t1/_internal/copies",
                 headers={b"Upgrade": [UPGRADE_TOKEN], b"Connection": [b"Upgrade"]})
    stub.flush()
    response = d.result if hasattr(d, "result") else None
    assert response is not None and response.code == 501
    body = stub.json_content(response)
    stub.flush()
    assert body.result["error"] == "not_implemented"
    assert node.metrics.gauge("kv_copy_streams_incoming") == 0


@pytest_twisted.ensureDeferred
async def test_an_unanswered_batch_times_out_and_the_calls_behind_it_fail_over_at_once():
    silent = reactor.listenTCP(0, Factory.forProtocol(_UpgradeThenSilence), interface="127.0.0.1")
    peer = Peer("n2", "127.0.0.1", silent.getHost().port)
    client = PeerClient(None, reactor, "t1", 0.3, None, streams=loopback_streams())
    try:
        sent = []
        for index in range(MAX_BATCHES_IN_FLIGHT):
            sent.append(client.apply_coalesced(peer, numbered_entry(index)))
            await deferLater(reactor, 0.05, lambda: None)
        queued = client.apply_coalesced(peer, numbered_entry(9))
        outcomes = {}
        for name, d in [("first", sent[0]), ("queued", queued)] + [(index, d) for index, d in enumerate(sent[1:])]:
            d.addBoth(keeping(outcomes, name))
        await _until(lambda: len(outcomes) == MAX_BATCHES_IN_FLIGHT + 1, 3.0)
        assert all(isinstance(outcome, Failure) and outcome.check(PeerError) for outcome in outcomes.values())
        assert "StreamTimeout" in str(outcomes["first"].value)
        assert "earlier batch" in str(outcomes["queued"].value)
        assert client.streams.open_count() == 0
    finally:
        await silent.stopListening()


class _UpgradeThenSilence(Protocol):
    def dataReceived(self, data):
        if b"\r\n\r\n" in data and not getattr(self, "upgraded", False):
            self.upgraded = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + UPGRADE_TOKEN +
                                 b"\r\nX-KV-Stream-Nonce: " + b"00" * 16 + b"\r\n\r\n")


# -- the order of events around a lost connection, on a fake endpoint ---------------------------------------


class _Build(Factory):
    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol





def test_a_stream_that_answered_before_is_retried_once_on_a_new_connection_when_it_is_lost():
    clock, endpoints, streams = fake_endpoint_streams()
    peer = PEER
    first = []
    streams.send(peer, [numbered_entry(1)], [b"-"], 2.0).addBoth(first.append)
    endpoints.upgrade(0)
    endpoints.answer_frame(0, 1, [ApplyResult(True, False)])
    assert first == [[ApplyResult(True, False)]]
    # The peer restarted: the kept connection dies with the next batch on it.
    second = []
    streams.send(peer, [numbered_entry(2)], [b"-"], 2.0).addBoth(second.append)
    endpoints.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert second == [] and len(endpoints.connections) == 2
    endpoints.upgrade(1)
    assert len(endpoints.frames(1)) == 1
    endpoints.answer_frame(1, 1, [ApplyResult(True, False)])
    assert second == [[ApplyResult(True, False)]]


def _second_batch_on_an_answered_stream():
    """
    A stream that has answered one batch, with a second batch of 2 s out on it: the clock, the endpoints, and
    the list the second batch's outcome goes to.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    streams.send(PEER, [numbered_entry(1)], [b"-"], 2.0)
    endpoints.upgrade(0)
    endpoints.answer_frame(0, 1, [ApplyResult(True, False)])
    outcome = []
    streams.send(PEER, [numbered_entry(2)], [b"-"], 2.0).addBoth(outcome.append)
    return clock, endpoints, outcome


def test_an_answer_frame_too_short_to_name_its_batch_closes_the_stream_and_nothing_after_it_is_read():
    """
    If the peer sends a frame shorter than an answer's head, then the stream is closed at once, and an answer
    that arrived with it is not taken: the batch fails with the connection, to fail over.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    outcome = []
    streams.send(PEER, [numbered_entry(1)], [b"-"], 2.0).addBoth(outcome.append)
    endpoints.upgrade(0)
    answer = encode_answer(1, [ApplyResult(True, False)])
    endpoints.answer(0, struct.pack("!I", 2) + b"xx" + struct.pack("!I", len(answer)) + answer)
    protocol, transport = endpoints.connections[0]
    assert outcome == [] and protocol.closed and transport.disconnecting
    protocol.connectionLost(Failure(ConnectionLost()))
    assert len(outcome) == 1 and outcome[0].check(ConnectionLost)


def test_a_retry_on_a_new_connection_gets_only_the_time_left_of_the_batchs_timeout():
    """
    If a stream that answered before is lost 1.5 s into a batch's 2 s, and the new connection's upgrade is never
    answered, then the batch fails 2 s after it was sent, not a whole timeout (or two) after the loss.
    """
    clock, endpoints, outcome = _second_batch_on_an_answered_stream()
    clock.advance(1.5)
    endpoints.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert outcome == [] and len(endpoints.connections) == 2
    clock.advance(0.49)
    assert outcome == []
    clock.advance(0.02)
    assert len(outcome) == 1 and outcome[0].check(StreamTimeout)


def test_the_batches_behind_one_that_timed_out_fail_as_timed_out_and_are_not_retried_on_a_new_connection():
    """
    If two batches are out on a stream that answered before, and the first gets no answer within its timeout,
    then the second fails at once as timed out too, and no new connection is opened for it when the aborted one
    is lost: failed with the loss, it was retried on a new connection to the peer just found unresponsive (made
    a suspect), and waited out the rest of its timeout there instead of failing over.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    streams.send(PEER, [numbered_entry(1)], [b"-"], 2.0)
    endpoints.upgrade(0)
    endpoints.answer_frame(0, 1, [ApplyResult(True, False)])
    first, second = [], []
    streams.send(PEER, [numbered_entry(2)], [b"-"], 2.0).addBoth(first.append)
    clock.advance(0.5)
    streams.send(PEER, [numbered_entry(3)], [b"-"], 2.0).addBoth(second.append)
    clock.advance(1.6)
    assert len(first) == 1 and first[0].check(StreamTimeout)
    assert len(second) == 1 and second[0].check(StreamTimeout), second
    endpoints.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert len(endpoints.connections) == 1


def test_a_batch_lost_after_its_timeout_has_run_is_not_retried():
    """
    If the kept stream is lost only after the batch's timeout has run (its timer late, on a busy reactor), then
    the batch fails with the loss and no new connection is made for it.
    """
    clock, endpoints, outcome = _second_batch_on_an_answered_stream()
    clock.rightNow += 2.5  # time passes without the timer running
    endpoints.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert len(outcome) == 1 and outcome[0].check(ConnectionLost)
    assert len(endpoints.connections) == 1


def test_a_new_streams_first_batch_gets_the_time_its_opening_left():
    """
    If opening a stream takes 1.5 s of a batch's 2 s, then the batch is answered or failed 2 s after it was
    handed over, not 2 s after the stream opened.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    outcome = []
    streams.send(PEER, [numbered_entry(1)], [b"-"], 2.0).addBoth(outcome.append)
    clock.advance(1.5)
    endpoints.upgrade(0)
    assert len(endpoints.frames(0)) == 1
    clock.advance(0.49)
    assert outcome == []
    clock.advance(0.02)
    assert len(outcome) == 1 and outcome[0].check(StreamTimeout)


def test_a_new_stream_lost_before_answering_fails_its_batch_without_a_retry():
    clock, endpoints, streams = fake_endpoint_streams()
    peer = PEER
    outcome = []
    streams.send(peer, [numbered_entry(1)], [b"-"], 2.0).addBoth(outcome.append)
    endpoints.upgrade(0)
    endpoints.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert len(outcome) == 1 and outcome[0].check(ConnectionLost)
    assert len(endpoints.connections) == 1


def test_an_upgrade_unanswered_within_the_timeout_fails_and_closes_the_connection():
    clock, endpoints, streams = fake_endpoint_streams()
    outcome = []
    streams.send(Peer("n2", "10.0.0.2", 3000), [numbered_entry(1)], [b"-"], 2.0).addBoth(outcome.append)
    clock.advance(2.0)
    assert len(outcome) == 1 and outcome[0].check(StreamTimeout)
    assert endpoints.connections[0][1].disconnecting


def test_batches_carry_their_task_ids_and_a_mac_over_the_connections_nonce():
    auth = signer()
    clock, endpoints, streams = fake_endpoint_streams(auth)
    streams.send(Peer("n2", "10.0.0.2", 3000), [numbered_entry(1), numbered_entry(2)], [b"task-a@/1", b"-"], 2.0)
    request = endpoints.connections[0][1].value()
    assert b"X-KV-Auth: " in request and b"Upgrade: " + UPGRADE_TOKEN in request
    endpoints.upgrade(0)
    (frame,) = endpoints.frames(0)
    batch_id, mac, tasks_length = struct.unpack_from("!I16sI", frame)
    assert batch_id == 1
    assert frame[24:24 + tasks_length] == b"task-a@/1 -"
    # BLAKE2b keyed with the stream key, computed here by hashlib whatever the node computes it with.
    expected = hashlib.blake2b(b"n" * 16 + frame[:4] + frame[20:], digest_size=16, key=auth.stream_key()).digest()
    assert mac == expected


def test_answers_decode_to_one_result_an_entry():
    results = [ApplyResult(True, False), ApplyResult(False, True), ApplyResult(True, True), ApplyResult(False, False),
               ApplyResult(False, True, (1700000000000, 3, "n3")), ApplyResult(True, False),
               ApplyResult(False, False, (1700000000001, 0, "pod-7f9c.n_4")), ApplyResult(False, True)]
    answer = encode_answer(7, results)
    assert struct.unpack_from("!IH", answer) == (7, 200)
    assert decode_results(answer[6:], len(results)) == results
    # Cut inside the last node id (ASCII, so no broken character gives it away), or inside a version.
    for cut in (1, 8):
        with pytest.raises(ValueError, match="malformed"):
            decode_results(encode_answer(7, results[:5])[6:-cut], 5)


@pytest.mark.parametrize("newer", [(-1, 0, "n3"), (1700000000000, 0, ""), (1700000000000, 0, "n\u00e9"),
                                   (1700000000000, 0, "-n3"), (1700000000000, 0, "n" * 64)],
                         ids=["negative-wall", "empty-node", "non-ascii-node", "leading-dash", "node-too-long"])
def test_an_answers_newer_version_is_checked_as_an_http_answers_is(newer):
    """
    If a stream answer names a newer version that an HTTP answer's check would refuse (a negative wall time, a node
    id no node can have), then the answer is malformed: the write would otherwise stamp itself above it, and a bad
    version could break the write path instead of failing the copy over.
    """
    with pytest.raises(ValueError, match="malformed"):
        decode_results(encode_answer(7, [ApplyResult(False, True, newer)])[6:], 1)


def test_every_send_waiting_on_a_refused_opening_hears_the_refusal():
    clock, endpoints, streams = fake_endpoint_streams()
    peer = PEER
    outcomes = []
    for index in range(3):
        streams.send(peer, [numbered_entry(index)], [b"-"], 2.0).addBoth(outcomes.append)
    assert len(endpoints.connections) == 1
    endpoints.answer(0, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert len(outcomes) == 3 and all(outcome.check(StreamRefused) for outcome in outcomes)
    assert streams._opening == {}


class _FailingEndpoint:
    def __init__(self):
        self.attempts = 0

    def __call__(self, host, port):
        return self

    def connect(self, factory):
        self.attempts += 1
        return fail(ConnectionRefusedError("refused at once"))


def test_an_endpoint_that_fails_at_once_fails_the_send_and_the_next_send_tries_again():
    endpoint = _FailingEndpoint()
    streams = CopyStreams(Clock(), endpoint, "t1", None)
    peer = Peer("n2", "10.0.0.2", 3000)
    outcomes = []
    streams.send(peer, [numbered_entry(1)], [b"-"], 2.0).addBoth(outcomes.append)
    assert outcomes[0].check(ConnectionRefusedError)
    assert streams._opening == {} and streams.usable(peer)
    streams.send(peer, [numbered_entry(2)], [b"-"], 2.0).addBoth(outcomes.append)
    assert endpoint.attempts == 2 and outcomes[1].check(ConnectionRefusedError)


def test_a_stream_that_used_all_its_batch_ids_is_replaced_by_a_new_connection():
    clock, endpoints, streams = fake_endpoint_streams()
    peer = PEER
    first = []
    streams.send(peer, [numbered_entry(1)], [b"-"], 2.0).addBoth(first.append)
    endpoints.upgrade(0)
    endpoints.answer_frame(0, 1, [ApplyResult(True, False)])
    endpoints.connections[0][0]._next_id = MAX_BATCH_ID
    outcome = []
    streams.send(peer, [numbered_entry(2)], [b"-"], 2.0).addBoth(outcome.append)
    assert endpoints.connections[0][1].disconnecting and len(endpoints.connections) == 2
    endpoints.upgrade(1)
    endpoints.answer_frame(1, 1, [ApplyResult(True, False)])
    assert outcome == [[ApplyResult(True, False)]]


def test_a_peer_that_hangs_up_instead_of_answering_the_upgrade_fails_the_batch_and_gets_http_for_a_while():
    clock, endpoints, streams = fake_endpoint_streams()
    peer = PEER
    outcome = []
    streams.send(peer, [numbered_entry(1)], [b"-"], 2.0).addBoth(outcome.append)
    endpoints.connections[0][0].connectionLost(Failure(ConnectionDone()))
    assert outcome[0].check(StreamUnanswered)
    assert not streams.usable(peer)
    clock.advance(REFUSED_FOR)
    assert streams.usable(peer)


def test_closing_fails_pending_batches_and_opens_nothing_more():
    clock, endpoints, streams = fake_endpoint_streams()
    peer = PEER
    streams.send(peer, [numbered_entry(1)], [b"-"], 2.0)
    endpoints.upgrade(0)
    endpoints.answer_frame(0, 1, [ApplyResult(True, False)])
    pending = []
    streams.send(peer, [numbered_entry(2)], [b"-"], 2.0).addBoth(pending.append)
    opening = []
    streams.send(Peer("n3", "10.0.0.3", 3000), [numbered_entry(3)], [b"-"], 2.0).addBoth(opening.append)
    streams.close()
    assert endpoints.connections[0][1].disconnecting and endpoints.connections[1][1].disconnecting
    endpoints.connections[0][0].connectionLost(Failure(ConnectionDone()))
    endpoints.connections[1][0].connectionLost(Failure(ConnectionDone()))
    assert pending[0].check(ConnectionDone) and opening[0].check(StreamUnanswered, ConnectionDone)
    assert len(endpoints.connections) == 2
    later = []
    streams.send(peer, [numbered_entry(4)], [b"-"], 2.0).addBoth(later.append)
    assert later[0].check(ConnectionDone) and len(endpoints.connections) == 2


@pytest_twisted.ensureDeferred
async def test_an_idle_stream_is_closed_by_the_peer_and_the_next_write_opens_another(server):
    peer = server(timeout=0.3)
    streams = loopback_streams(signer())
    try:
        await streams.send(peer.peer, [numbered_entry(1)], [b"-"], 2.0)
        await _until(lambda: peer.site.open_connections == 0, 3.0)
        assert peer.node.metrics.gauge("kv_copy_streams_incoming") == 0
        await _until(lambda: streams.open_count() == 0, 3.0)
        assert await streams.send(peer.peer, [numbered_entry(2)], [b"-"], 2.0) == [ApplyResult(True, False)]
        assert peer.node.metrics.gauge("kv_copy_streams_incoming") == 1
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_nothing_after_a_rejected_frame_is_applied_and_the_connection_is_released(server):
    peer = server()
    protocol, lost = await _raw_stream(peer, signer().stream_key())
    good = protocol._mac
    protocol._mac = lambda *parts: b"\0" * 16
    protocol.send(encode_batch([numbered_entry(1)], 0.0), [b"-"], 2.0).addErrback(lambda failure: None)
    protocol._mac = good
    protocol.send(encode_batch([numbered_entry(2)], 0.0), [b"-"], 2.0).addErrback(lambda failure: None)
    await lost
    await _until(lambda: peer.site.open_connections == 0)
    assert peer.node.store.current("k1") is None and peer.node.store.current("k2") is None
    assert peer.node.metrics.gauge("kv_copy_streams_incoming") == 0


@pytest_twisted.ensureDeferred
async def test_frames_sent_right_behind_the_upgrade_request_are_applied(server):
    # With --insecure-cluster and no secret frames carry no MAC: a caller could send them before the 101.
    peer = server(secret=None, insecure_cluster="true")
    received = Deferred()

    class Pipelining(Protocol):
        def connectionMade(self):
            batch = encode_batch([numbered_entry(1)], 0.0)
            frame = struct.pack("!I16sI", 1, b"\0" * 16, 1) + b"-" + batch
            self.transport.write(b"GET /t1/_internal/copies HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: " + UPGRADE_TOKEN + b"\r\n\r\n" + struct.pack("!I", len(frame)) + frame)
            self.data = b""

        def dataReceived(self, data):
            self.data += data
            head, _, rest = self.data.partition(b"\r\n\r\n")
            if len(rest) >= 10 and not received.called:
                received.callback((head, rest))

    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", peer.peer.port).connect(_Build(Pipelining()))
    head, rest = await received
    assert head.startswith(b"HTTP/1.1 101 ")
    assert struct.unpack("!IIH", rest[:10]) == (len(rest) - 4, 1, 200)
    assert decode_results(rest[10:], 1) == [ApplyResult(True, False)]
    assert peer.node.store.current("k1").value == b"v"
    client.transport.loseConnection()


class _PendingEndpoint:
    """
    A connection attempt that never completes unless cancelled.
    """

    def __init__(self):
        self.cancelled = 0

    def __call__(self, host, port):
        return self

    def connect(self, factory):
        def cancel(d):
            self.cancelled += 1
        return Deferred(cancel)


def test_closing_while_a_connection_is_being_made_cancels_it_and_fails_its_batch_at_once():
    endpoint = _PendingEndpoint()
    streams = CopyStreams(Clock(), endpoint, "t1", None)
    outcome = []
    streams.send(PEER, [numbered_entry(1)], [b"-"], 2.0).addBoth(outcome.append)
    assert outcome == []
    streams.close()
    assert endpoint.cancelled == 1
    assert len(outcome) == 1 and isinstance(outcome[0], Failure)


def _upgraded_client(clock: Clock) -> CopyStreamClient:
    """
    A caller's end of a stream, over a transport that keeps what it is sent, past an unsigned upgrade.
    """
    client = CopyStreamClient(b"upgrade", None, clock)
    client.makeConnection(StringTransport())
    client.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\n%s: %s\r\n\r\n" % (
        UPGRADE_TOKEN, copystream.NONCE_HEADER, binascii.hexlify(b"n" * 16)))
    assert client.upgraded
    return client


def _answer(client: CopyStreamClient, batch_id: int) -> None:
    frame = copystream.encode_answer(batch_id, [ApplyResult(True, False)])
    client.dataReceived(struct.pack("!I", len(frame)) + frame)


def test_each_batch_is_timed_from_when_it_was_sent_by_one_timer_for_the_stream():
    """
    If a batch is answered and a later one is not, then the later one fails with StreamTimeout its own
    timeout after it was sent, not the first one's; and the stream never keeps more than one timer.
    """
    clock = Clock()
    client = _upgraded_client(clock)
    outcomes = {}
    first = client.send(encode_batch([numbered_entry(1)], 0.0), [b"-"], 10.0)
    first.addBoth(keeping(outcomes, 1))
    clock.advance(5)
    second = client.send(encode_batch([numbered_entry(2)], 0.0), [b"-"], 10.0)
    second.addBoth(keeping(outcomes, 2))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    _answer(client, 1)
    assert not isinstance(outcomes[1], Failure)
    clock.advance(4.5)  # 10.5 s after the first batch, 5.5 after the second
    assert 2 not in outcomes and not client.closed
    clock.advance(5)
    assert outcomes[2].check(StreamTimeout) and client.closed
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("body", [b"[" * 100000, b"[1]", b"\xff"])
def test_an_error_answer_whatever_its_body_fails_its_batch_and_the_stream_goes_on(body):
    """
    If a batch is answered 500 with a body that is not the expected JSON object (nested deeper than the
    decoder goes, a list, not UTF-8), then the batch fails with the code, nothing escapes to the reactor, and a
    later batch on the stream is answered as usual.
    """
    clock = Clock()
    client = _upgraded_client(clock)
    outcomes = {}
    client.send(encode_batch([numbered_entry(1)], 0.0), [b"-"], 10.0).addBoth(keeping(outcomes, 1))
    frame = struct.pack("!IH", 1, 500) + body
    client.dataReceived(struct.pack("!I", len(frame)) + frame)
    assert outcomes[1].check(copystream.StreamError) and "500" in str(outcomes[1].value), outcomes
    client.send(encode_batch([numbered_entry(2)], 0.0), [b"-"], 10.0).addBoth(keeping(outcomes, 2))
    _answer(client, 2)
    assert not isinstance(outcomes[2], Failure) and not client.closed


def test_a_batch_sent_after_every_earlier_one_was_answered_is_timed_from_its_own_sending():
    """
    If the stream's timer outlives the batches it was made for (all answered), and a batch sent later is not
    answered, then the timer's firing does not fail that batch early: it fails its own timeout after it was
    sent.
    """
    clock = Clock()
    client = _upgraded_client(clock)
    client.send(encode_batch([numbered_entry(1)], 0.0), [b"-"], 10.0)
    _answer(client, 1)
    clock.advance(8)
    outcomes = []
    client.send(encode_batch([numbered_entry(2)], 0.0), [b"-"], 10.0).addBoth(outcomes.append)
    clock.advance(9.9)  # the first batch's timer fired at 10
    assert outcomes == [] and not client.closed
    clock.advance(0.1)
    assert outcomes[0].check(StreamTimeout) and client.closed


def test_a_batch_with_a_shorter_timeout_is_not_timed_by_the_longer_one_before_it():
    """
    If a batch with a short timeout follows one with a long timeout, then the short one still fails on time.
    """
    clock = Clock()
    client = _upgraded_client(clock)
    outcomes = []
    client.send(encode_batch([numbered_entry(1)], 0.0), [b"-"], 60.0).addErrback(lambda failure: None)
    client.send(encode_batch([numbered_entry(2)], 0.0), [b"-"], 1.0).addBoth(outcomes.append)
    clock.advance(1.5)
    assert client.closed and len(outcomes) == 1 and outcomes[0].check(StreamTimeout)


def test_a_stream_with_every_batch_answered_keeps_one_timer_and_closes_once_idle():
    """
    If batches are sent and answered one after another, then the stream keeps one timer for all of them (not
    one made and cancelled a batch); once every batch is answered, that timer waits for the stream's idle
    timeout after the last batch and then closes it (a peer that vanished without a FIN never would), unless a
    batch was sent meanwhile.
    """
    clock = Clock()
    client = _upgraded_client(clock)
    for batch_id in (1, 2, 3):
        client.send(encode_batch([numbered_entry(batch_id)], 0.0), [b"-"], 10.0)
        _answer(client, batch_id)
        [timer] = clock.getDelayedCalls()
        assert timer.getTime() == 10.0
    clock.advance(10)
    [timer] = clock.getDelayedCalls()
    assert timer.getTime() == copystream.IDLE_SECONDS and not client.closed
    clock.advance(copystream.IDLE_SECONDS - 15)
    client.send(encode_batch([numbered_entry(4)], 0.0), [b"-"], 10.0)
    _answer(client, 4)
    clock.advance(copystream.IDLE_SECONDS - 0.5)
    assert not client.closed
    clock.advance(0.5)
    assert client.closed and client.transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_a_stream_to_a_peer_that_vanished_is_closed_once_idle_and_no_longer_counted():
    """
    If a peer's host vanishes without a FIN (its pod rescheduled at a new address), then the stream to its old
    address, never written to again, closes once idle, and is no longer counted as open
    (kv_copy_streams_outgoing); it used to stay open for good.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    outcomes = []
    streams.send(PEER, [numbered_entry(1)], [b"-"], 2.0).addBoth(outcomes.append)
    endpoints.upgrade(0)
    endpoints.answer_frame(0, 1, [ApplyResult(True, False)])
    assert outcomes == [[ApplyResult(True, False)]] and streams.open_count() == 1
    clock.advance(copystream.IDLE_SECONDS)
    protocol, transport = endpoints.connections[0]
    assert protocol.closed and transport.disconnecting
    assert streams.open_count() == 0


def test_a_stream_opened_for_a_read_the_peer_does_not_serve_is_closed_once_idle():
    """
    If a stream's first use is a read and the peer's 101 does not offer reads (an older node in a rolling
    upgrade), then the read fails over and nothing is ever sent on the stream: it still closes once idle, and is
    no longer counted (it stayed open for good, a peer that vanished without a FIN included).
    """
    clock, endpoints, streams = fake_endpoint_streams()
    outcome = []
    streams.read(PEER, ["k"], 2.0).addBoth(outcome.append)
    endpoints.upgrade(0)  # a 101 without X-KV-Stream-Reads
    assert outcome[0].check(ReadsUnsupported)
    assert streams.open_count() == 1
    clock.advance(copystream.IDLE_SECONDS)
    protocol, transport = endpoints.connections[0]
    assert protocol.closed and transport.disconnecting
    assert streams.open_count() == 0


def test_addresses_that_refused_a_stream_long_ago_are_forgotten():
    """
    If many peer addresses refuse the upgrade over time (a mesh that drops upgrades, pods that come back at new
    addresses), then those whose refusal period is over are not kept for good: the node remembers only the
    recent ones (and a refusal still sends that address's copies over HTTP for its period).
    """
    clock, endpoints, streams = fake_endpoint_streams()
    outcomes = []
    for index in range(200):
        peer = Peer("n%d" % (index,), "10.1.%d.%d" % (index >> 8, index & 255), 3000)
        streams.send(peer, [numbered_entry(index)], [b"-"], 2.0).addBoth(outcomes.append)
        endpoints.answer(index, b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
        clock.advance(REFUSED_FOR / 10)
    assert len(outcomes) == 200 and all(outcome.check(StreamRefused) for outcome in outcomes)
    assert not streams.usable(peer)
    assert len(streams._refused.until) <= 64 + 11



def _upgrade_bytes(auth, port):
    path = b"/t1/_internal/copies"
    return (b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: Upgrade\r\nUpgrade: " % (port,)
            + UPGRADE_TOKEN + b"\r\nX-KV-Auth: " + auth.sign(b"GET", path, b"") + b"\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_an_upgrade_sent_again_is_refused_so_a_captured_one_opens_no_stream(server):
    """
    If the very bytes of a signed upgrade are sent again (captured off the wire, within the signature's
    window), then the second is answered 401 and opens no stream: an open stream holds a frame of up to its limit
    before the frame's MAC can be checked. The first opened one.
    """
    peer = server()
    upgrade = _upgrade_bytes(signer(), peer.peer.port)
    answers = []
    for _ in range(2):
        answers.append(await deferToThread(_first_line_after, upgrade, peer.peer.port))
    assert answers[0].startswith(b"HTTP/1.1 101") and answers[1].startswith(b"HTTP/1.1 401"), answers


def _first_line_after(data, port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return sock.recv(4096).split(b"\r\n", 1)[0]


class _Frames(copystream._FrameReceiver):
    MAX_LENGTH = 1 << 20

    def __init__(self):
        self.frames = []
        self.over = []

    def stringReceived(self, frame):
        self.frames.append(frame)

    def lengthLimitExceeded(self, length):
        self.over.append(length)


def _framed(*frames):
    return b"".join(struct.pack("!I", len(frame)) + frame for frame in frames)


def test_frames_held_at_any_point_and_released_arrive_whole_once_and_in_order():
    """
    If a frame receiver is held (its transport's buffer filled) after any frame, while reads split the frames at
    any byte, and released later, then every frame is delivered once, whole and in order, and none while held.
    """
    import random

    frames = [bytes([i % 251]) * (i * 37 % 900) for i in range(60)]
    data = _framed(*frames)
    for seed in range(200):
        rng = random.Random(seed)
        receiver = _Frames()
        receiver.makeConnection(StringTransport())
        original = receiver.stringReceived

        def delivered(frame, original=original, receiver=receiver, rng=rng):
            assert receiver._held is None, "a frame delivered while held"
            original(frame)
            if rng.random() < 0.3:
                receiver.hold()
        receiver.stringReceived = delivered
        offset = 0
        while offset < len(data) or receiver._held is not None:
            if receiver._held is not None and (offset >= len(data) or rng.random() < 0.4):
                receiver.release()
                continue
            size = rng.choice([1, 3, 17, 200, 5000])
            receiver.dataReceived(data[offset:offset + size])
            offset += size
        assert receiver.frames == frames, seed


def test_frames_arrive_whole_and_in_order_however_the_reads_split_them():
    """
    If frames arrive split at any byte (a length prefix included), several in one read, or one over many reads,
    then each is delivered once, whole, in order.
    """
    frames = [b"", b"a", b"bc" * 100, bytes(range(256)) * 40, b"z"]
    data = _framed(*frames)
    for size in (1, 2, 3, 5, 7, 64, 1000, len(data)):
        receiver = _Frames()
        receiver.makeConnection(StringTransport())
        for start in range(0, len(data), size):
            receiver.dataReceived(data[start:start + size])
        assert receiver.frames == frames, size


def test_a_large_frame_in_many_reads_is_joined_once_when_whole():
    """
    If a frame of 1 MiB arrives in 64 KiB reads, then nothing is delivered until its last read, and the pieces
    are kept, not joined at each read (Int32StringReceiver copied all it held at every read).
    """
    frame = b"x" * (1 << 20)
    data = _framed(frame)
    receiver = _Frames()
    receiver.makeConnection(StringTransport())
    reads = [data[start:start + 65536] for start in range(0, len(data), 65536)]
    for read in reads[:-1]:
        receiver.dataReceived(read)
        assert receiver.frames == []
    assert len(receiver._parts) == len(reads) - 1
    receiver.dataReceived(reads[-1])
    assert receiver.frames == [frame] and receiver._parts is None


def test_a_frame_declared_over_the_limit_is_refused_from_its_length_and_nothing_after_it_is_read():
    """
    If a frame's length prefix is over ``MAX_LENGTH``, then it is refused from the prefix alone, before its bytes
    arrive, and what follows is dropped.
    """
    receiver = _Frames()
    receiver.makeConnection(StringTransport())
    receiver.dataReceived(_framed(b"ok") + struct.pack("!I", (1 << 20) + 1))
    receiver.dataReceived(_framed(b"after"))
    assert receiver.frames == [b"ok"] and receiver.over == [(1 << 20) + 1]


def test_a_stream_takes_frames_the_size_of_a_full_batch_and_not_the_whole_internal_limit():
    """
    If a node's values are at most 1 MiB, then its streams take a frame as large as a full batch and its last
    entry (MAX_BATCH_BYTES and one value, with their task ids), and refuse one much larger: not the 64 MiB an
    internal body may have.
    """
    from kvresponder.batcher import MAX_BATCH_BYTES

    limit = copystream.max_frame(1 << 20, 64 << 20)
    assert MAX_BATCH_BYTES + (1 << 20) < limit < 16 << 20
    assert copystream.max_frame(64 << 20, 256 << 20) > MAX_BATCH_BYTES + (64 << 20)
    assert copystream.max_frame(1 << 20, 4 << 20) == 4 << 20


@pytest_twisted.ensureDeferred
async def test_a_stream_closes_at_a_frame_declared_larger_than_a_batch_can_be(server):
    """
    If a frame on an open stream declares 20 MiB (values are at most 1 MiB here), then the node closes the
    connection from the length alone, holding none of it.
    """
    peer = server()
    upgrade = _upgrade_bytes(signer(), peer.peer.port)

    def send_large_frame(port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(upgrade)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            sock.sendall(struct.pack("!I", 20 << 20) + b"x" * 1000)
            try:
                return head.split(b"\r\n", 1)[0], sock.recv(4096)
            except ConnectionResetError:
                return head.split(b"\r\n", 1)[0], b""

    status, after = await deferToThread(send_large_frame, peer.peer.port)
    assert status.startswith(b"HTTP/1.1 101") and after == b""


def _served_answers(apply, frames):
    """The answers (batch id, code) an unsigned stream server gives ``frames`` (each a batch id and payload)."""
    transport = StringTransport()
    clock = Clock()
    server = CopyStreamServer(apply, None, b"n" * 16, 1 << 20, lambda reason: None, clock=clock, wall=clock.seconds)
    server.makeConnection(transport)
    for batch_id, tasks_length, payload in frames:
        frame = struct.pack("!I16sI", batch_id, b"\0" * 16, tasks_length) + payload
        server.dataReceived(struct.pack("!I", len(frame)) + frame)
    data, answers = transport.value(), []
    while data:
        (length,) = struct.unpack_from("!I", data)
        answers.append(struct.unpack_from("!IH", data, 4))
        data = data[4 + length:]
    return answers


def test_a_frame_whose_task_ids_run_past_its_end_is_answered_400_and_applies_nothing():
    """
    If a batch frame declares task ids longer than the frame, then it is answered 400 and nothing is applied
    (it was read as a batch of no entries, answered 200 with no results); the stream goes on with the next.
    """
    applied = []

    def apply(entries, task_ids):
        applied.append(entries)
        return [ApplyResult(True, False)] * len(entries)
    batch = encode_batch([numbered_entry(1)], 0.0)
    assert _served_answers(apply, [(1, 1000, b"-" + batch), (2, 1, b"-" + batch)]) == [(1, 400), (2, 200)]
    assert [len(entries) for entries in applied] == [1]


def test_an_answer_that_cannot_be_encoded_is_answered_500_and_the_stream_goes_on():
    """
    If the results of a batch cannot be encoded as an answer (a version past the wire format), then the batch
    is answered 500, the error logged, and the stream goes on: nothing escapes to the reactor.
    """
    from eliot import add_destinations, remove_destination

    answers = iter([[ApplyResult(False, True, (2 ** 64, 0, "n2"))], [ApplyResult(True, False)]])
    messages = []
    add_destinations(messages.append)
    try:
        served = _served_answers(lambda entries, task_ids: next(answers),
                                 [(1, 1, b"-" + encode_batch([numbered_entry(1)], 0.0)),
                                  (2, 1, b"-" + encode_batch([numbered_entry(2)], 0.0))])
    finally:
        remove_destination(messages.append)
    assert served == [(1, 500), (2, 200)]
    assert any(m.get("message_type") == "eliot:traceback" for m in messages)
