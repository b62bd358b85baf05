"""
Reads on the copy stream (kvresponder.copystream, kvresponder.copysender.StreamReader): a real node's HTTP server
on a loopback socket and a real client; an older peer, whose stream serves no reads, played on a fake endpoint.
"""

import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, succeed
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient
from twisted.python.failure import Failure

from kvresponder import copystream
from kvresponder.copystream import (MAX_READ_ANSWER, READ_MARKER, ReadsUnsupported, StreamError, decode_keys,
                                    decode_read_answer, encode_keys, encode_read_answer)
from kvresponder.copysender import StreamReader
from kvresponder.peers import PeerClient, PeerError
from kvresponder.store import Entry
from kvresponder.suspects import SuspectPeers
from kvresponder.wire import MAX_KEY_BYTES
from kvresponder.batcher import MAX_COALESCED

from .streams import (PEER, fake_endpoint_streams, keeping, loopback_streams, numbered_entry, server,  # noqa: F401
                      signer)


def test_keys_and_read_answers_round_trip_tombstones_expiries_and_absent_keys_included():
    """
    If keys are encoded into a read frame's body and decoded, then they come back as sent; and a read answer
    gives back each found entry (a tombstone, one that expires, by the time it has left) and ``None`` for the
    rest, in the keys' order.
    """
    keys = ["k1", "ключ", "k" * MAX_KEY_BYTES]
    assert decode_keys(encode_keys(keys)) == keys
    live = Entry("k1", b'"v"', (1_700_000_000_000, 3, "n1"), None)
    gone = Entry("k2", None, (1_700_000_000_001, 0, "n2"), None)
    expiring = Entry("k3", b"1", (1_700_000_000_002, 0, "n1"), 1000.0 + 30.0)
    answer = encode_read_answer(7, [live, None, gone, expiring], 1000.0)
    assert answer[:6] == struct.pack("!IH", 7, 200)
    back = decode_read_answer(answer[6:], 4, 2000.0)
    assert back[:3] == [live, None, gone]
    assert (back[3].key, back[3].value, back[3].version) == (expiring.key, expiring.value, expiring.version)
    assert back[3].expires_at == pytest.approx(2030.0)


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x00", b"\x00\x05ab", b"\x00\x02\xff\xfe",
                                  struct.pack("!H", MAX_KEY_BYTES + 1) + b"k" * (MAX_KEY_BYTES + 1),
                                  encode_keys(["k"] * (MAX_COALESCED + 1))])
def test_a_read_body_that_is_not_a_few_keys_of_utf8_within_the_key_limit_is_refused(body):
    with pytest.raises(ValueError):
        decode_keys(body)


@pytest.mark.parametrize("payload", [b"\x01", b"\x02" + b"", b"\x01\x00", b"\x00\x00junk"])
def test_a_read_answer_that_does_not_match_its_keys_is_refused(payload):
    """
    If a read answer has fewer flags than keys, a flag other than 0 or 1, another number of entries than flags
    set, or a malformed batch, then it is refused (the read fails as a malformed answer).
    """
    with pytest.raises(ValueError):
        decode_read_answer(payload, 2, 0.0)


@pytest_twisted.ensureDeferred
async def test_keys_read_on_the_stream_answer_what_the_peer_holds_tombstones_included(server):
    """
    If a node reads keys from a peer on its copy stream, then each answers the newest entry the peer holds, a
    tombstone as a tombstone, and ``None`` for a key it does not hold; the stream stays open for copies.
    """
    peer = server()
    streams = loopback_streams(signer())
    try:
        peer.node.store.apply(numbered_entry(1, b'"one"'))
        peer.node.store.apply(Entry("k2", None, (1_700_000_000_002, 0, "n9"), None))
        found = await streams.read(peer.peer, ["k1", "k2", "k3"], 2.0)
        assert [entry and (entry.key, entry.value) for entry in found] == [("k1", b'"one"'), ("k2", None), None]
        assert await streams.send(peer.peer, [numbered_entry(3)], [b"-"], 2.0)
        assert streams.open_count() == 1
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_a_leaving_node_still_answers_reads_on_its_stream(server):
    """
    If a node has begun leaving (it stores no more copies), then reads on a stream into it are still answered:
    reads while the ring settles ask leaving nodes for what they have not handed off yet.
    """
    peer = server()
    streams = loopback_streams(signer())
    try:
        peer.node.store.apply(numbered_entry(1, b'"one"'))
        peer.node.begin_leaving()
        [entry] = await streams.read(peer.peer, ["k1"], 2.0)
        assert entry.value == b'"one"'
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_entries_too_large_for_one_answer_are_refused_413_and_read_over_http_instead(server):
    """
    If the entries a read asks for come to more than one stream answer carries, then the stream answers 413,
    and a peer client reads them over HTTP, which answers in parts.
    """
    peer = server(max_value_size="4Mi", max_memory="64Mi")
    streams = loopback_streams(signer())
    big = b'"' + b"x" * (MAX_READ_ANSWER // 2) + b'"'
    peer.node.store.apply(numbered_entry(1, big))
    peer.node.store.apply(numbered_entry(2, big))
    try:
        with pytest.raises(StreamError) as caught:
            await streams.read(peer.peer, ["k1", "k2"], 2.0)
        assert caught.value.code == 413
        fallbacks = []

        def over_http(peer_, keys):
            fallbacks.append(keys)
            return succeed([None, None])

        reader = StreamReader(streams, over_http, reactor, None, 2.0, SuspectPeers(reactor))
        assert await reader.read(peer.peer, ["k1", "k2"]) == [None, None]
        assert fallbacks == [["k1", "k2"]]
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_caller_reads_no_answers_stops_reading_its_frames_until_the_answers_are_taken(server):
    """
    If a caller sends read frames on a real stream and does not read their answers, then the node stops taking
    its frames once the answers pile up unsent (each up to MAX_READ_ANSWER, which it would otherwise all hold in
    memory), and takes the rest, answering every one, once the caller reads again.
    """
    peer = server(max_value_size="4Mi", max_memory="64Mi")
    value = b'"' + b"x" * (1 << 20) + b'"'
    peer.node.store.apply(numbered_entry(1, value))
    served = []
    current = peer.node.store.current

    def counting(key):
        served.append(key)
        return current(key)
    peer.node.store.current = counting
    streams = loopback_streams(signer())
    try:
        [entry] = await streams.read(peer.peer, ["k1"], 5.0)
        assert entry.value == value
        [stream] = streams._open.values()
        stream.transport.pauseProducing()
        reads = [streams.read(peer.peer, ["k1"], 60.0) for _ in range(80)]
        await deferLater(reactor, 1.0, lambda: None)
        held_back = 81 - len(served)
        stream.transport.resumeProducing()
        answers = await gatherResults(reads)
        assert held_back >= 30, "the node took %d of 80 frames whose answers were not read" % (len(served) - 1,)
        assert [entry.value for [entry] in answers] == [value] * 80
        assert len(served) == 81
    finally:
        streams.close()


@pytest_twisted.ensureDeferred
async def test_a_peer_client_reads_a_peers_keys_on_the_stream_not_over_http(server):
    """
    If a node's peer client reads keys from a peer (the read path's coalesced gets), then they go on the copy
    stream: this client has no HTTP client at all.
    """
    peer = server()
    peer.node.store.apply(numbered_entry(1, b'"one"'))
    client = PeerClient(None, reactor, "t1", 5.0, signer(), streams=loopback_streams(signer()))
    try:
        entry = await client.get_coalesced(peer.peer, "k1")
        assert entry.value == b'"one"'
        assert await client.get_coalesced(peer.peer, "k404") is None
        assert client.streams.open_count() == 1
    finally:
        client.streams.close()


def test_an_older_peer_whose_stream_serves_no_reads_is_sent_no_read_frame_and_is_read_over_http():
    """
    If a peer's 101 does not say it serves reads (a node older than them), then a read fails with
    ReadsUnsupported without a frame sent, and the reader reads over HTTP instead, the stream kept for copies.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    outcomes = {}
    streams.read(PEER, ["k1"], 2.0).addBoth(keeping(outcomes, "read"))
    endpoints.upgrade(0)
    assert outcomes["read"].check(ReadsUnsupported)
    assert endpoints.frames(0) == []
    reader = StreamReader(streams, lambda peer, keys: succeed(["over http"]), clock, None, 2.0, SuspectPeers(clock))
    reader.read(PEER, ["k1"]).addBoth(keeping(outcomes, "reader"))
    assert outcomes["reader"] == ["over http"]
    assert len(endpoints.connections) == 1 and not endpoints.connections[0][0].closed


def test_a_read_frame_is_sent_only_to_a_peer_that_said_it_serves_reads_and_carries_the_read_marker():
    """
    If a peer's 101 says it serves reads, then a read goes as one frame whose task-id list is the read marker
    and whose body is the keys, signed as a batch is; its answer settles the read.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    outcomes = {}
    streams.read(PEER, ["k1", "k2"], 2.0).addBoth(keeping(outcomes, "read"))
    endpoints.answer(0, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + copystream.UPGRADE_TOKEN +
                     b"\r\nX-KV-Stream-Nonce: " + b"6e" * 16 + b"\r\nX-KV-Stream-Reads: 1\r\n\r\n")
    [frame] = endpoints.frames(0)
    batch_id, _, tasks_length = struct.unpack_from("!I16sI", frame)
    assert frame[24:24 + tasks_length] == READ_MARKER
    assert decode_keys(frame[24 + tasks_length:]) == ["k1", "k2"]
    answer = encode_read_answer(batch_id, [None, numbered_entry(2)], 0.0)
    endpoints.answer(0, struct.pack("!I", len(answer)) + answer)
    assert not isinstance(outcomes["read"], Failure)
    assert [entry and entry.key for entry in outcomes["read"]] == [None, "k2"]


def test_a_read_that_times_out_fails_as_an_unreachable_peer_and_makes_it_a_suspect():
    """
    If a read on the stream goes unanswered past the timeout, then it fails with a PeerError (the read fails
    over) and the peer becomes a suspect, as for a batch of copies.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    suspects = SuspectPeers(clock)
    reader = StreamReader(streams, lambda peer, keys: succeed(["over http"]), clock, None, 2.0, suspects)
    outcomes = {}
    reader.read(PEER, ["k1"]).addBoth(keeping(outcomes, "read"))
    endpoints.answer(0, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + copystream.UPGRADE_TOKEN +
                     b"\r\nX-KV-Stream-Nonce: " + b"6e" * 16 + b"\r\nX-KV-Stream-Reads: 1\r\n\r\n")
    clock.advance(2.5)
    assert outcomes["read"].check(PeerError)
    assert suspects.suspected(PEER)


def test_a_streams_read_frame_is_not_taken_for_a_batch_by_a_server_that_serves_reads():
    """
    If a server that serves reads gets a read frame, then it answers the keys and applies nothing, even for a
    node that stores no copies (leaving).
    """
    from twisted.internet.testing import StringTransport

    applied = []
    server_ = copystream.CopyStreamServer(lambda entries, task_ids: applied.append(entries) or [], None,
                                          b"n" * 16, 1 << 20, lambda reason: None, takes_copies=lambda: False,
                                          read=lambda keys: [None for _ in keys], wall=lambda: 0.0)
    transport = StringTransport()
    server_.makeConnection(transport)
    body = encode_keys(["k1"])
    frame = struct.pack("!I16sI", 1, b"\0" * 16, len(READ_MARKER)) + READ_MARKER + body
    server_.dataReceived(struct.pack("!I", len(frame)) + frame)
    sent = transport.value()
    assert sent[4:10] == struct.pack("!IH", 1, 200) and sent[10:] == b"\x00"
    assert applied == []


def test_an_older_peer_is_remembered_so_that_later_reads_go_over_http_without_opening_a_stream():
    """
    If a peer's stream served no reads, and that stream has since closed (idle), then reads to it go over HTTP
    for a while without a stream opened and signed again to find that out; after the refusal period it is
    asked again.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    outcomes = {}
    streams.read(PEER, ["k1"], 2.0).addBoth(keeping(outcomes, 1))
    endpoints.upgrade(0)
    assert outcomes[1].check(ReadsUnsupported)
    endpoints.connections[0][0].connectionLost(None)
    streams.read(PEER, ["k1"], 2.0).addBoth(keeping(outcomes, 2))
    assert outcomes[2].check(ReadsUnsupported) and len(endpoints.connections) == 1
    clock.advance(copystream.REFUSED_FOR)
    streams.read(PEER, ["k1"], 2.0).addBoth(keeping(outcomes, 3))
    assert len(endpoints.connections) == 2


def test_a_read_whose_stream_upgrade_is_hung_up_on_is_read_over_http():
    """
    If the connection a read opens for its stream is closed before any 101 (a proxy that drops upgrades), then
    the read was never sent, and it is read over HTTP instead of failing.
    """
    clock, endpoints, streams = fake_endpoint_streams()
    fallbacks = []
    reader = StreamReader(streams, lambda peer, keys: fallbacks.append(keys) or succeed(["over http"]), clock,
                          None, 2.0, SuspectPeers(clock))
    outcomes = {}
    reader.read(PEER, ["k1"]).addBoth(keeping(outcomes, "read"))
    endpoints.connections[0][0].connectionLost(None)
    assert outcomes["read"] == ["over http"] and fallbacks == [["k1"]]


@pytest_twisted.ensureDeferred
async def test_entries_too_large_for_a_stream_answer_are_read_over_http_by_a_peer_client(server):
    """
    If a peer client's batch of reads asks for entries that come to more than a stream answer carries, then the
    stream's 413 sends the batch over HTTP (``/_internal/get``, which answers in parts), and every read gets
    its entry.
    """
    peer = server(max_value_size="4Mi", max_memory="64Mi")
    big = b'"' + b"x" * (MAX_READ_ANSWER // 2) + b'"'
    peer.node.store.apply(numbered_entry(1, big))
    peer.node.store.apply(numbered_entry(2, big))
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = PeerClient(HTTPClient(Agent(reactor, pool=pool)), reactor, "t1", 10.0, signer(),
                        streams=loopback_streams(signer()))
    try:
        # Queued in one turn: one batch of both keys.
        first, second = client.get_coalesced(peer.peer, "k1"), client.get_coalesced(peer.peer, "k2")
        assert [(await first).value, (await second).value] == [big, big]
        assert client.streams.open_count() == 1
    finally:
        client.streams.close()
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_with_the_replication_area_at_debug_reads_go_over_http_each_a_peer_read_action(server, eliot_logger):
    """
    If the ``replication`` log area is at debug, then a peer client's reads go over HTTP, each alone, and each
    call is a ``peer-read`` action in the task of the read that made it (a batch, sent a turn later, was a task
    of its own, and a read's tree at debug showed no call); no stream is opened for them.
    """
    from eliot import start_action

    from kvresponder.log import LogPolicy

    peer = server()
    peer.node.store.apply(numbered_entry(1, b'"one"'))
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = PeerClient(HTTPClient(Agent(reactor, pool=pool)), reactor, "t1", 10.0, signer(),
                        log_policy=LogPolicy("debug"), streams=loopback_streams(signer()))
    try:
        with start_action(action_type="test:read") as read:
            answer = client.get_coalesced(peer.peer, "k1")
        assert (await answer).value == b'"one"'
        calls = [m for m in eliot_logger.messages if m.get("action_type") == "kvresponder:replication:peer-read"]
        assert calls and {m["task_uuid"] for m in calls} == {read.task_uuid}, calls
        assert client.streams.open_count() == 0
    finally:
        client.streams.close()
        await pool.closeCachedConnections()


def _upgrade_serving_reads(endpoints, index):
    endpoints.answer(index, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + copystream.UPGRADE_TOKEN +
                     b"\r\nX-KV-Stream-Nonce: " + b"6e" * 16 + b"\r\nX-KV-Stream-Reads: 1\r\n\r\n")


def test_a_read_on_a_stream_that_answered_before_is_sent_again_on_a_new_connection_when_it_is_lost():
    """
    If the stream a read goes on has answered before and its connection is lost with the read out (the peer
    restarted), then the read is sent once more on a new connection, and its answer there settles it.
    """
    from twisted.internet.error import ConnectionLost

    clock, endpoints, streams = fake_endpoint_streams()
    outcomes = {}
    streams.read(PEER, ["k1"], 2.0).addBoth(keeping(outcomes, 1))
    _upgrade_serving_reads(endpoints, 0)
    answer = encode_read_answer(1, [None], 0.0)
    endpoints.answer(0, struct.pack("!I", len(answer)) + answer)
    assert outcomes[1] == [None]
    streams.read(PEER, ["k2"], 2.0).addBoth(keeping(outcomes, 2))
    endpoints.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert 2 not in outcomes and len(endpoints.connections) == 2
    _upgrade_serving_reads(endpoints, 1)
    [frame] = endpoints.frames(1)
    assert decode_keys(frame[24 + len(READ_MARKER):]) == ["k2"]
    answer = encode_read_answer(1, [numbered_entry(2)], 0.0)
    endpoints.answer(1, struct.pack("!I", len(answer)) + answer)
    assert [entry.key for entry in outcomes[2]] == ["k2"]
