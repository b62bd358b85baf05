"""
The fast lane (:mod:`kvresponder.http.fastlane`) answers what Twisted's path would, in the order requests came.

Equivalence runs two real nodes on loopback sockets, one with the lane and one without, and sends each the
same raw requests; ordering, waiting and trickling use an in-memory transport, where every byte boundary and
the moment an answer fires are under the test's control.
"""

import json
import re
import socket
from collections import Counter
from typing import List, Optional, Tuple

import pytest
import pytest_twisted
from eliot import add_destinations, remove_destination
from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from kvresponder.http.fastlane import INCOMPLETE, FastLane
from kvresponder.http.kvops import Answer
from kvresponder.http.root import build_root
from kvresponder.http.site import KVRequest, KVSite, _Cork, http_date
from kvresponder.log import LogPolicy
from kvresponder.node import Node

from .support import make_settings

VALUE_LIMIT = 4096


def _site(node, fast_lane: bool, **kwargs) -> KVSite:
    return KVSite(build_root(node), reactor, metrics=node.metrics,
                  body_limit=VALUE_LIMIT, fast_lane=fast_lane, **kwargs)


class _Server:
    def __init__(self, fast_lane: bool) -> None:
        self.node = Node(make_settings("t1", "n1", max_value_size=str(VALUE_LIMIT), max_key_length="20"),
                         reactor, http=None)
        self.site = _site(self.node, fast_lane)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)


def _read_answers(sock: socket.socket, count: int, heads=()) -> List[Tuple[int, dict, bytes]]:
    """
    ``count`` HTTP answers from ``sock``, each (status, headers, body), framed by Content-Length or chunked;
    the answers numbered in ``heads`` answer a HEAD (no body, whatever the headers say).
    """
    buffer = b""

    def more():
        nonlocal buffer
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed after %d answers: %r" % (len(answers), buffer))
        buffer += chunk

    def take(size: int) -> bytes:
        nonlocal buffer
        while len(buffer) < size:
            more()
        taken, buffer = buffer[:size], buffer[size:]
        return taken

    def line() -> bytes:
        nonlocal buffer
        while b"\r\n" not in buffer:
            more()
        taken, buffer = buffer.split(b"\r\n", 1)
        return taken

    answers = []
    while len(answers) < count:
        status = int(line().split(b" ")[1])
        headers = {}
        while True:
            header = line()
            if not header:
                break
            name, value = header.split(b":", 1)
            headers[name.strip().lower()] = value.strip()
        if len(answers) in heads:
            body = b""
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size = int(line(), 16)
                body += take(size)
                line()
                if not size:
                    break
        else:
            body = take(int(headers.get(b"content-length", b"0")))
        answers.append((status, headers, body))
    return answers


def _exchange(address, raw: bytes, count: int) -> List[Tuple[int, dict, bytes]]:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw)
        return _read_answers(sock, count)


def _put(key: bytes, body: bytes, content_type: Optional[bytes] = b"application/json") -> bytes:
    head = b"PUT /t1/kv/%s HTTP/1.1\r\nHost: x\r\n" % (key,)
    if content_type is not None:
        head += b"Content-Type: %s\r\n" % (content_type,)
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def _get(key: bytes) -> bytes:
    return b"GET /t1/kv/%s HTTP/1.1\r\nHost: x\r\n\r\n" % (key,)


def _delete(key: bytes) -> bytes:
    return b"DELETE /t1/kv/%s HTTP/1.1\r\nHost: x\r\n\r\n" % (key,)


#: Requests the lane takes, in an order where each one's answer depends on the ones before.
SEQUENCE = [
    _get(b"a"),
    _put(b"a", b'{"value": {"n": 1}}'),
    _put(b"a", b'{"value": "two", "ttl": 60}').replace(b"Host: x\r\n", b"Host: x\r\nConnection: Keep-Alive\r\n"),
    _get(b"a"),
    _put(b"a%2Fb", b'{"value": [1, 2]}'),
    _get(b"a/b"),
    _put(b"%C3%A9t%C3%A9", b'{"value": "\xc3\xa9"}'),
    _get(b"%C3%A9t%C3%A9"),
    _put(b"bad", b'{"value": '),
    _put(b"bad", b'{"value": NaN}'),
    _put(b"bad", b'{"valu": 1}'),
    _put(b"bad", b'{"value": 1, "ttl": -1}'),
    _put(b"bad", b'{"value": 1}', content_type=b"text/plain"),
    _put(b"notype", b'{"value": 1}', content_type=None),
    _put(b"bad", b'{"value": 1}', content_type=b"application/json; charset=latin-1"),
    _put(b"utf8", b'{"value": 1}', content_type=b'application/json; charset="UTF-8"'),
    _put(b"bad", b'\xff\xfe'),
    _put(b"x" * 21, b'{"value": 1}'),
    _get(b"x" * 21),
    _get(b"%FF"),
    _put(b"big", b'{"value": "' + b"v" * (VALUE_LIMIT - 13) + b'"}'),
    _delete(b"a"),
    _delete(b"a"),
    _get(b"a"),
    _get(b"bad"),
]


def _normalized(answers):
    """Answers with what differs by design between two nodes (the time, the versions) taken out."""
    normal = []
    for status, headers, body in answers:
        # The date, and the length of a body whose expiry time has a varying number of digits, differ by design.
        headers = {name: value for name, value in headers.items() if name not in (b"date", b"content-length")}
        data = json.loads(body)
        if isinstance(data, dict):
            data.pop("version", None)
            data.pop("expires_at", None)
        normal.append((status, headers, data))
    return normal


class _Paths:
    """
    Counts, for each site, the requests its lane answered (calls of the lane's ``answer``) and those Twisted's
    path processed (calls of ``KVRequest.process``).
    """

    def __init__(self, monkeypatch, sites) -> None:
        self.lane: Counter = Counter()
        self.twisted: Counter = Counter()
        process = KVRequest.process

        def processed(request):
            self.twisted[request.channel.site] += 1
            return process(request)

        monkeypatch.setattr(KVRequest, "process", processed)
        for site in sites:
            if site.lane is not None:
                monkeypatch.setattr(site.lane, "answer", self._counting(site, site.lane.answer))

    def _counting(self, site, answer):
        def answered(*args):
            self.lane[site] += 1
            return answer(*args)
        return answered

    def clear(self) -> None:
        self.lane.clear()
        self.twisted.clear()


@pytest_twisted.ensureDeferred
async def test_the_lane_answers_every_kv_request_as_twisteds_path_does(monkeypatch):
    """
    If the same kv requests (writes, reads, deletes, bad bodies, bad keys, percent-encoded keys, a body at the
    limit) go to a node with the lane and one without, one request a connection and all pipelined on one
    connection, then both give the same statuses, headers and bodies, and the same metrics; and on the node
    with the lane, the lane answered every one of them (none went to Twisted's path).
    """
    servers = [_Server(fast_lane=True), _Server(fast_lane=False)]
    paths = _Paths(monkeypatch, [server.site for server in servers])
    try:
        for pipelined in (False, True):
            paths.clear()
            results = []
            for server in servers:
                if pipelined:
                    answers = await deferToThread(_exchange, server.address, b"".join(SEQUENCE), len(SEQUENCE))
                else:
                    answers = []
                    for raw in SEQUENCE:
                        answers += await deferToThread(_exchange, server.address, raw, 1)
                results.append(_normalized(answers))
            lane, twisted = results
            for index, (ours, theirs) in enumerate(zip(lane, twisted)):
                assert ours == theirs, (pipelined, index, SEQUENCE[index][:60])
            # What was compared is the lane's answers with Twisted's path's, not Twisted's path with itself.
            with_lane, without = (server.site for server in servers)
            assert (paths.lane[with_lane], paths.twisted[with_lane]) == (len(SEQUENCE), 0), pipelined
            assert (paths.lane[without], paths.twisted[without]) == (0, len(SEQUENCE)), pipelined
        statuses = [status for status, _, _ in lane]
        # The sequence means what it says (not all errors, not all successes).
        assert statuses[:4] == [404, 201, 200, 200] and statuses[-4:] == [200, 404, 404, 404], statuses
        assert 415 in statuses and 400 in statuses
        samples = [server.node.metrics.exposition().decode() for server in servers]
        requests = [sorted(line for line in sample.splitlines() if line.startswith("kv_http_requests_total"))
                    for sample in samples]
        assert requests[0] == requests[1] and requests[0]
    finally:
        for server in servers:
            await server.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_requests_the_lane_leaves_to_twisted_are_answered_in_order_between_lane_requests():
    """
    If one connection pipelines lane requests with requests the lane does not take (another route, HEAD, a
    query string, a chunked body, HTTP/1.0-style headers it leaves alone, a body over the limit last), then
    every answer comes back in order, and each is right.
    """
    server = _Server(fast_lane=True)
    try:
        chunked = (b"PUT /t1/kv/c HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"val\r\n8\r\nue\": 42}\r\n0\r\n\r\n")
        raw = b"".join([
            _put(b"k", b'{"value": 1}'),
            b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
            _get(b"k"),
            b"HEAD /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /t1/kv/k?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            chunked,
            _get(b"c"),
            _put(b"over", b'{"value": "' + b"v" * VALUE_LIMIT + b'"}'),
        ])

        answers = await deferToThread(_exchange_skipping_head, server.address, raw)
        statuses = [status for status, _, _ in answers]
        assert statuses == [201, 200, 200, 200, 200, 201, 200, 413], statuses
        assert json.loads(answers[2][2])["value"] == 1
        assert json.loads(answers[4][2])["value"] == 1
        assert json.loads(answers[6][2])["value"] == 42
        assert json.loads(answers[7][2])["error"] == "payload_too_large"
    finally:
        await server.port.stopListening()


class _Recording(KVSite):
    """A site that keeps the channels it builds, so that a test can hand them bytes itself."""

    def buildProtocol(self, addr):
        channel = KVSite.buildProtocol(self, addr)
        self.channels = getattr(self, "channels", []) + [channel]
        return channel


@pytest.mark.parametrize("fast_lane", [True, False])
@pytest_twisted.ensureDeferred
async def test_no_answer_leaves_before_the_reactor_turn_that_wrote_it_ends(fast_lane, monkeypatch):
    """
    If two connections' requests are handled in one reactor turn (both by the lane, or both by Twisted's path),
    then no answer has left while the turn's code runs, and each connection has its own answer right after the
    turn.
    """
    node = Node(make_settings("t1", "n1", max_value_size=str(VALUE_LIMIT), max_key_length="20"), reactor,
                http=None)
    site = _Recording(build_root(node), reactor, metrics=node.metrics,
                      body_limit=VALUE_LIMIT, fast_lane=fast_lane)
    paths = _Paths(monkeypatch, [site])
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    clients = []
    try:
        for _ in range(2):
            clients.append(socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10))
        while len(getattr(site, "channels", [])) < 2:
            await deferLater(reactor, 0.01, lambda: None)
        # Each channel is told apart by its peer's port, whatever order the connections were accepted in.
        by_port = {channel.transport.getPeer().port: channel for channel in site.channels}
        by_port[clients[0].getsockname()[1]].dataReceived(_put(b"a", b'{"value": 1}'))
        by_port[clients[1].getsockname()[1]].dataReceived(_get(b"b"))
        # Both requests were handled in this turn, on the path the test names.
        assert (paths.lane[site], paths.twisted[site]) == ((2, 0) if fast_lane else (0, 2))
        for client in clients:
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(1)
            client.settimeout(10)
        await deferLater(reactor, 0, lambda: None)
        answers = [await deferToThread(_read_answers, client, 1) for client in clients]
        assert [status for [(status, _, _)] in answers] == [201, 404]
    finally:
        for client in clients:
            client.close()
        await port.stopListening()


def test_a_request_made_while_its_channel_is_corked_keeps_the_connections_own_transport():
    """
    If a request is made while its channel's answers wait in a cork (pipelined behind an answer of the same
    turn), then the request's ``transport`` is the connection's, not the cork, which is gone after the turn.
    """
    transport = StringTransport()
    channel = KVSite(build_root(Node(make_settings("t1", "n1"), reactor, http=None)), reactor).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(transport)
    channel.transport = _Cork(transport)
    request = channel.requestFactory(channel)
    assert request.transport is transport


def test_a_corked_connection_closed_sends_what_it_holds_first_and_one_aborted_drops_it():
    """
    If a connection is closed while answers wait in its cork, then they are sent before it closes; if it is
    aborted, they are dropped, as Twisted drops what it buffers.
    """
    closed, aborted = StringTransport(), StringTransport()
    cork = _Cork(closed)
    cork.write(b"answer")
    cork.loseConnection()
    assert closed.value() == b"answer" and closed.disconnecting
    cork = _Cork(aborted)
    cork.write(b"answer")
    cork.abortConnection()
    cork.flush()
    assert aborted.value() == b""


def test_a_cork_sends_what_it_holds_at_once_past_its_limit():
    """
    If an answer corked until the end of the turn is large, then it is sent at once (it gains nothing from
    waiting); a small one waits.
    """
    transport = StringTransport()
    cork = _Cork(transport)
    cork.write(b"small")
    assert transport.value() == b""
    cork.write(b"x" * (64 * 1024))
    assert transport.value() == b"small" + b"x" * (64 * 1024)
    cork.write(b"tail")
    cork.flush()
    assert transport.value().endswith(b"xtail")


def _exchange_skipping_head(address, raw: bytes):
    """Eight answers, the fourth to a HEAD (headers only)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw)
        return _read_answers(sock, 8, heads=(3,))


# -- in memory: byte boundaries, waiting answers, logging ------------------------------------------------


def _channel(site):
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _memory_site(**kwargs):
    clock = Clock()
    node = Node(make_settings("t1", "n1"), clock, http=None)
    return node, KVSite(build_root(node), clock, metrics=node.metrics, **kwargs)


def _statuses(raw: bytes) -> List[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def test_requests_split_at_every_byte_are_answered_once_whole():
    """
    If pipelined lane requests arrive a byte at a time, then nothing is answered before a request is whole,
    and each is answered once, in order.
    """
    node, site = _memory_site()
    protocol, transport = _channel(site)
    raw = _put(b"k", b'{"value": "v"}') + _get(b"k") + _delete(b"k") + _get(b"k")
    ends = []
    offset = 0
    for request in (_put(b"k", b'{"value": "v"}'), _get(b"k"), _delete(b"k"), _get(b"k")):
        offset += len(request)
        ends.append(offset)
    for index in range(len(raw)):
        protocol.dataReceived(raw[index:index + 1])
        whole = sum(1 for end in ends if end <= index + 1)
        assert len(_statuses(transport.value())) == whole, index
    assert _statuses(transport.value()) == [201, 200, 200, 404]
    assert protocol._lane.open


class _Waiting:
    """Operations whose writes wait for the test; reads answer at once."""

    def __init__(self) -> None:
        self.pending: List[Deferred] = []

    def key(self, raw: bytes) -> str:
        return raw.decode("utf-8")

    def is_local_only(self) -> bool:
        return False

    def get(self, key):
        return Answer(200, b'{"key":"%s"}' % (key.encode(),))

    def put_to(self, key, body, content_type, reply):
        # The answer comes when the test fires the Deferred, through ``reply`` as a replicated write's does.
        self.pending.append(Deferred().addCallback(reply))
        return None

    def delete(self, key):
        d = Deferred()
        self.pending.append(d)
        return d


class _AnsweredWhileAsked(_Waiting):
    """Operations whose writes hand their answer to ``reply`` before they return (a copy failing at once)."""

    def put_to(self, key, body, content_type, reply):
        reply(Answer(503, b'{"error":"unavailable"}'))
        return None


def _lane_site(operations, log_policy=None):
    clock = Clock()
    site = KVSite(build_root(Node(make_settings("t1", "n1"), clock, http=None)), clock,
                  log_policy=log_policy)
    site.lane = FastLane(b"/t1/kv/", operations, VALUE_LIMIT, 16384, None, log_policy, clock.seconds, http_date)
    return site


def test_a_large_body_arriving_in_pieces_is_stored_whole_once():
    """
    If a PUT with a body at the value limit arrives in many small pieces, with a GET pipelined behind it in
    the last piece, then the write is answered once, the GET after it, and the stored value is the whole body.
    """
    node, site = _memory_site(body_limit=VALUE_LIMIT)
    protocol, transport = _channel(site)
    value = b"v" * (VALUE_LIMIT - 13)
    raw = _put(b"big", b'{"value": "' + value + b'"}') + _get(b"big")
    for start in range(0, len(raw), 100):
        protocol.dataReceived(raw[start:start + 100])
    answers = transport.value()
    assert _statuses(answers) == [201, 200]
    assert json.loads(answers[answers.rindex(b"\r\n\r\n") + 4:])["value"] == value.decode()


def test_requests_behind_a_waiting_answer_are_held_until_it_is_sent():
    """
    If a write's answer waits (for its copies) and the client pipelines more requests behind it, then
    nothing is answered until the write is, and then all are answered in order.
    """
    operations = _Waiting()
    protocol, transport = _channel(_lane_site(operations))
    protocol.dataReceived(_put(b"k", b'{"value": 1}') + _get(b"r1"))
    protocol.dataReceived(_get(b"r2") + b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == b""
    operations.pending[0].callback(Answer(201, b'{"key":"k"}'))
    statuses = _statuses(transport.value())
    assert statuses[:3] == [201, 200, 200], transport.value()
    assert transport.value().index(b'"r1"') < transport.value().index(b'"r2"')
    assert len(statuses) == 4


def test_a_write_answered_before_its_operation_returns_is_sent_with_what_follows_it():
    """
    If a write hands its answer to the lane while the lane is still asking for it (its copies failed at
    once), then that answer is sent in order with the pipelined requests behind it, and nothing waits.
    """
    protocol, transport = _channel(_lane_site(_AnsweredWhileAsked()))
    protocol.dataReceived(_put(b"k", b'{"value": 1}') + _get(b"after") + _put(b"k2", b'{"value": 2}'))
    value = transport.value()
    assert _statuses(value) == [503, 200, 503]
    assert value.index(b"unavailable") < value.index(b'"after"')
    protocol.dataReceived(_get(b"later"))
    assert _statuses(transport.value()) == [503, 200, 503, 200]


class _RepliesAndReturns(_Waiting):
    """Operations whose first write both hands an answer to ``reply`` and returns one (a bug), then wait."""

    def put_to(self, key, body, content_type, reply):
        if key == "first":
            reply(Answer(500, b'{"error":"stray"}'))
            return Answer(201, b'{"key":"first"}')
        return _Waiting.put_to(self, key, body, content_type, reply)


def test_an_answer_given_beside_the_returned_one_is_never_sent_for_a_later_request():
    """
    If an operation both hands the lane an answer and returns another, then the returned one is sent, and
    the stray one is not kept for the next request that waits: that request gets its own answer, and a
    second answer to it is dropped.
    """
    operations = _RepliesAndReturns()
    protocol, transport = _channel(_lane_site(operations))
    protocol.dataReceived(_put(b"first", b'{"value": 1}') + _put(b"second", b'{"value": 2}'))
    assert _statuses(transport.value()) == [201]
    [second] = operations.pending
    second.callback(Answer(200, b'{"key":"second"}'))
    # The same request answered a second time: nothing more is sent.
    protocol._lane._reply(Answer(503, b'{"error":"again"}'))
    value = transport.value()
    assert _statuses(value) == [201, 200]
    assert b"stray" not in value and b"again" not in value


def test_an_answer_whose_client_left_is_not_written():
    """
    If the client disconnects while its write waits, then the answer is not written when it comes, and
    nothing fails.
    """
    operations = _Waiting()
    protocol, transport = _channel(_lane_site(operations))
    protocol.dataReceived(_put(b"k", b'{"value": 1}'))
    protocol.connectionLost(None)
    operations.pending[0].callback(Answer(201, b'{"key":"k"}'))
    assert transport.value() == b""


def test_a_failure_an_operation_did_not_expect_is_a_bare_500():
    """
    If an operation's Deferred fails with an error nobody mapped, then the client gets a JSON 500 without
    a traceback, and the connection goes on serving.
    """
    operations = _Waiting()
    protocol, transport = _channel(_lane_site(operations))
    protocol.dataReceived(_delete(b"k") + _get(b"after"))
    operations.pending[0].errback(ZeroDivisionError("boom"))
    value = transport.value()
    assert _statuses(value) == [500, 200]
    assert b"internal_error" in value and b"boom" not in value and b"Traceback" not in value


@pytest.mark.parametrize("pieces", [
    (b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n",),
    (b"GET /t1/health/live HTTP/1.1\r\n", b"Host: x\r\n\r\n"),
    (b"GET /t1/health/live", b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    (b"POST /t1/bulk HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n", b'{"get":["a"]}'),
], ids=["whole", "head-split", "line-split", "body-later"])
def test_a_request_behind_a_waiting_lane_write_that_goes_to_twisted_in_pieces_is_served(pieces):
    """
    If a request the lane leaves to Twisted is pipelined behind a lane write that waits for its copies, and the
    rest of it (a line's end, a header, the body) arrives after the write is answered, then it is served: only
    a request's first byte is held to being one a request can start with.
    """
    operations = _Waiting()
    protocol, transport = _channel(_lane_site(operations))
    protocol.dataReceived(_put(b"k", b'{"value": 1}') + pieces[0])
    operations.pending[0].callback(Answer(201, b'{"key":"k"}'))
    for piece in pieces[1:]:
        protocol.dataReceived(piece)
    statuses = _statuses(transport.value())
    assert statuses[0] == 201 and len(statuses) == 2 and statuses[1] != 400, transport.value()
    assert not transport.disconnecting


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01\x00\xa5\x01", b"\x00binary"], ids=["tls", "binary"])
def test_bytes_no_request_starts_with_behind_a_waiting_lane_write_are_a_400_once_it_is_answered(garbage):
    """
    If bytes that cannot start a request are pipelined behind a lane write that waits, then once the write is
    answered they are answered 400 at once, and the connection closes.
    """
    operations = _Waiting()
    protocol, transport = _channel(_lane_site(operations))
    protocol.dataReceived(_put(b"k", b'{"value": 1}') + garbage)
    operations.pending[0].callback(Answer(201, b'{"key":"k"}'))
    assert _statuses(transport.value()) == [201, 400], transport.value()
    assert transport.disconnecting


class _Raising(_Waiting):
    """Operations that raise an error nobody mapped, as they are asked."""

    def get(self, key):
        raise ZeroDivisionError("boom in get")

    def put_to(self, key, body, content_type, reply):
        raise ZeroDivisionError("boom in put")


@pytest.mark.parametrize("request_bytes", [_get(b"k"), _put(b"k", b'{"value": 1}')], ids=["get", "put"])
def test_an_error_an_operation_raises_is_a_bare_500_and_its_traceback_is_logged(request_bytes):
    """
    If an operation raises an error nobody mapped (instead of failing its Deferred), then the client gets a
    JSON 500 without a traceback, the traceback goes to the log, and the connection goes on serving.
    """
    logged = []
    add_destinations(logged.append)
    try:
        protocol, transport = _channel(_lane_site(_Raising()))
        protocol.dataReceived(request_bytes + _delete(b"after"))
    finally:
        remove_destination(logged.append)
    value = transport.value()
    assert _statuses(value) == [500], value
    assert json.loads(value.split(b"\r\n\r\n", 1)[1]) == {
        "error": "internal_error", "message": "The server failed to handle this request."}
    assert b"boom" not in value and b"Traceback" not in value
    # Only this test's: Eliot hands a destination added late the messages it buffered before any was added.
    assert [m["reason"] for m in logged if m.get("message_type") == "eliot:traceback"
            and str(m.get("reason")).startswith("boom in")] == [
        "boom in " + ("get" if request_bytes.startswith(b"GET") else "put")]
    assert not transport.disconnecting


def test_at_info_the_lane_logs_no_request_action_and_at_debug_twisted_logs_each():
    """
    If the http area logs at info, then a write (alone or waiting for copies) and a read through the lane log
    no request action; at debug, the same write goes to Twisted's path, which logs its ``http:request``.
    """
    messages = []
    add_destinations(messages.append)
    try:
        operations = _Waiting()
        protocol, transport = _channel(_lane_site(operations, LogPolicy("info")))
        protocol.dataReceived(_put(b"k", b'{"value": 1}') + _get(b"k"))
        operations.pending[0].callback(Answer(201, b'{"key":"k"}'))
        assert _statuses(transport.value()) == [201, 200]
        assert not [m for m in messages if m.get("route") == "/kv/{key}"]
        node, site = _memory_site(log_policy=LogPolicy("debug"))
        protocol, transport = _channel(site)
        protocol.dataReceived(_put(b"k", b'{"value": 1}'))
    finally:
        remove_destination(messages.append)
    assert _statuses(transport.value()) == [201]
    [start] = [m for m in messages if m.get("action_type") == "kvresponder:http:request"
               and m.get("route") == "/kv/{key}"]
    [end] = [m for m in messages if m.get("task_uuid") == start["task_uuid"] and m.get("action_status") == "succeeded"]
    assert start["method"] == "PUT" and end["status"] == 201


def test_reads_logged_at_debug_go_to_twisteds_path_which_logs_them():
    """
    If the http area logs at debug, then the lane leaves reads to Twisted's path, which logs each as an
    ``http:read`` action.
    """
    messages = []
    add_destinations(messages.append)
    try:
        node, site = _memory_site(log_policy=LogPolicy("debug"))
        protocol, transport = _channel(site)
        protocol.dataReceived(_get(b"k"))
    finally:
        remove_destination(messages.append)
    assert _statuses(transport.value()) == [404]
    assert [m for m in messages if m.get("action_type") == "kvresponder:http:read" and m.get("route") == "/kv/{key}"]


def _without(raw: bytes, defect: bytes):
    """A decline case: ``raw``, and the same request with ``defect`` (its first occurrence) cut out."""
    assert defect in raw, (raw, defect)
    return raw, raw.replace(defect, b"", 1)


#: Requests the lane declines, each for one defect: (the request, the same request without that defect).
DECLINED = [
    (b"GET /t1/kv/k HTTP/1.0\r\nHost: x\r\n\r\n", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"Connection: close\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\r\n", b", Upgrade"),
    # Each of the headers whose handling is Twisted's, alone.
    _without(b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
             b"Expect: 100-continue\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
             b"Transfer-Encoding: chunked\r\n"),
    # Content-Length and Transfer-Encoding both: the lane would read the chunks as a body (request smuggling).
    _without(b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"0\r\n\r\n", b"Transfer-Encoding: chunked\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n", b"Upgrade: h2c\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n", b"TE: trailers\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nTrailer: X\r\n\r\n", b"Trailer: X\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nProxy-Connection: keep-alive\r\n\r\n",
             b"Proxy-Connection: keep-alive\r\n"),
    _without(b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
             b"Content-Length: 2\r\n"),
    _without(b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}", b"+"),
    (b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n", b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
    (b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n"),
    (b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n",
     b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nBad-Header: x\r\n\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", b"\x00"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", b"\rb"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nX: a\nb\r\n\r\n", b"\nb"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nX: a\n\rb\r\n\r\n", b"\n\rb"),
    (b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nX: b\r\r\n\r\n", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nX: b\r\n\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nX: b\r\nY: \nc\r\n\r\n", b"\nc"),
    # One header line too many: with Host, 62 more are the most the lane reads.
    (b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 63 + b"\r\n",
     b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 62 + b"\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", b" folded\r\n"),
    (b"GET /t1/kv/k\xff HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n"),
    (b"GET  /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n"),
    (b"GET /t1/kv/ HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n"),
    _without(b"GET /t1/kv/k?limit=1 HTTP/1.1\r\nHost: x\r\n\r\n", b"?limit=1"),
    (b"HEAD /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n"),
    (b"POST /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
     b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
    (b"GET /t2/kv/k HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n"),
    # A body one byte over the limit; at the limit, the lane takes it.
    (b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (VALUE_LIMIT + 1,),
     b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (VALUE_LIMIT,) + b"v" * VALUE_LIMIT),
    # Host: none, two, or not a host (Twisted's path answers these 400).
    (b"GET /t1/kv/k HTTP/1.1\r\n\r\n", b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n", b"Host: x\r\n"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x y\r\n\r\n", b" y"),
    _without(b"GET /t1/kv/k HTTP/1.1\r\nHost: x/y\r\n\r\n", b"/y"),
    # What a write is refused for on Twisted's path (api.check_write_headers).
    _without(b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\nContent-Length: 0\r\n\r\n",
             b"If-None-Match: *\r\n"),
    _without(b"DELETE /t1/kv/k HTTP/1.1\r\nHost: x\r\nif-match: *\r\n\r\n", b"if-match: *\r\n"),
    _without(b"DELETE /t1/kv/k HTTP/1.1\r\nHost: x\r\nIf-Unmodified-Since: Sun, 06 Dec 2026 10:00:00 GMT\r\n\r\n",
             b"If-Unmodified-Since: Sun, 06 Dec 2026 10:00:00 GMT\r\n"),
    _without(b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n",
             b"Content-Encoding: gzip\r\n"),
]


@pytest.mark.parametrize("raw, fixed", DECLINED)
def test_the_lane_leaves_what_it_does_not_fully_understand_to_twisted(raw, fixed):
    """
    If a request is not plain HTTP/1.1 for a kv key, framed by one Content-Length within the limit, with
    headers the lane can check (or it is malformed), then the lane declines it (Twisted parses it); and it is
    declined for that one defect: the same request without it, the lane takes whole.
    """
    lane = FastLane(b"/t1/kv/", _Waiting(), VALUE_LIMIT, 16384, None, None, lambda: 0.0, http_date)
    assert lane.parse(raw, 0) is None
    parsed = lane.parse(fixed, 0)
    assert isinstance(parsed, tuple) and parsed[-1] == len(fixed), (fixed, parsed)


def test_the_lane_waits_for_the_rest_of_a_request_it_may_take():
    """
    If only the start of a lane request has arrived (part of the method, line, headers or body), then the
    lane waits for more; the start of another route is declined at once.
    """
    lane = FastLane(b"/t1/kv/", _Waiting(), VALUE_LIMIT, 16384, None, None, lambda: 0.0, http_date)
    whole = _put(b"k", b'{"value": 1}')
    head = whole.index(b"\r\n\r\n") + 4
    for end in range(1, len(whole)):
        parsed = lane.parse(whole[:end], 0)
        if end < head:
            assert parsed is INCOMPLETE, whole[:end]
        else:
            # The head is whole: the size of the whole request.
            assert parsed == len(whole), whole[:end]
    assert lane.parse(whole, 0)[0] == b"PUT"
    assert lane.parse(b"GET /t1/health", 0) is None
    assert lane.parse(b"POST ", 0) is None


@pytest.mark.parametrize("raw", [
    # curl
    b"GET /t1/kv/k HTTP/1.1\r\nHost: localhost:3000\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    # python-requests
    b"PUT /t1/kv/k HTTP/1.1\r\nHost: localhost:3000\r\nUser-Agent: python-requests/2.32.3\r\n"
    b"Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\nContent-Length: 12\r\n"
    b"Content-Type: application/json\r\n\r\n{\"value\": 1}",
    # Go's net/http
    b"DELETE /t1/kv/k HTTP/1.1\r\nHost: localhost:3000\r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Accept-Encoding: gzip\r\n\r\n",
    # wrk, and a percent-encoded key
    b"GET /t1/kv/user%3A42 HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n\r\n",
])
def test_the_lane_takes_plain_requests_as_common_clients_send_them(raw):
    """
    If a kv request comes as curl, python-requests, Go or wrk send it (keep-alive said or not), then the lane
    takes it whole.
    """
    lane = FastLane(b"/t1/kv/", _Waiting(), VALUE_LIMIT, 16384, None, None, lambda: 0.0, http_date)
    parsed = lane.parse(raw, 0)
    assert isinstance(parsed, tuple) and parsed[-1] == len(raw)


def test_reading_stays_off_behind_a_waiting_answer_whatever_the_transport_says():
    """
    If the lane stopped reading behind a write that waits, then the transport draining its send buffer
    (pause, then resume) does not turn reading back on; the answer does, unless the transport is still full
    then, in which case reading stays off, and the requests held behind the answer wait, until it drains.
    """
    for full_when_answered in (False, True):
        operations = _Waiting()
        protocol, transport = _channel(_lane_site(operations))
        protocol.dataReceived(_put(b"k", b'{"value": 1}') + _get(b"r") * 1000)
        assert transport.producerState == "paused"
        protocol.pauseProducing()
        protocol.resumeProducing()
        assert transport.producerState == "paused"
        if full_when_answered:
            protocol.pauseProducing()
        operations.pending[0].callback(Answer(201, b'{"key":"k"}'))
        assert len(_statuses(transport.value())) == (1 if full_when_answered else 1001)
        assert transport.producerState == ("paused" if full_when_answered else "producing")
        if full_when_answered:
            protocol.resumeProducing()
            assert len(_statuses(transport.value())) == 1001
            assert transport.producerState == "producing"


def test_a_request_that_starts_in_the_read_that_ends_another_gets_its_own_deadline():
    """
    If a slow request's last bytes arrive together with the start of the next one, then the next one's
    deadline counts from that read, not from the slow request's first byte; and it is a deadline: the
    connection closes when it passes, though the next request's bytes keep coming, too often for the
    connection ever to be idle.
    """
    clock = Clock()
    node = Node(make_settings("t1", "n1"), clock, http=None)
    site = KVSite(build_root(node), clock, timeout=30)
    protocol, transport = _channel(site)
    put, get = _put(b"k", b'{"value": 1}'), _get(b"k")
    protocol.dataReceived(put[:10])
    clock.advance(25)
    protocol.dataReceived(put[10:] + get[:10])  # t=25: the next request's deadline is t=55
    # A byte every 5 s (the idle timeout is 30 s); past t=30, the slow request's deadline.
    for byte in range(10, 15):
        clock.advance(5)
        assert not transport.disconnecting, clock.seconds()
        protocol.dataReceived(get[byte:byte + 1])
    clock.advance(4.9)  # t=54.9
    assert not transport.disconnecting
    clock.advance(0.2)  # t=55.1: the deadline (the connection's last byte came at t=50: idle at t=80)
    assert transport.disconnecting


def test_a_twisted_request_is_timed_without_the_lane_requests_served_after_it():
    """
    If lane requests are pipelined behind a request Twisted answers, then that request's recorded duration
    ends when it finished, not after the lane served the ones behind it.
    """
    ticks = iter(range(10 ** 6))
    node = Node(make_settings("t1", "n1"), Clock(), http=None)
    site = KVSite(build_root(node), Clock(), seconds=lambda: float(next(ticks)), metrics=node.metrics)
    protocol, transport = _channel(site)
    protocol.dataReceived(b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + _get(b"k") * 20)
    assert _statuses(transport.value()) == [200] + [404] * 20
    exposition = node.metrics.exposition().decode()
    [line] = [l for l in exposition.splitlines()
              if l.startswith("kv_http_request_duration_seconds_sum") and 'route="/health/live"' in l]
    # Each lane request reads the clock twice: served first, the 20 would have added 40 ticks.
    assert float(line.rsplit(" ", 1)[1]) < 10, line


def test_a_stopping_site_waits_for_the_requests_it_took_and_then_for_no_longer_than_its_timeout():
    """
    If a node stops while a request it took waits for its answer (a write's copies, a read asking a peer that
    is gone), then the site's wait ends once that request is answered, not before; and a request that is never
    answered holds the wait no longer than its timeout. A connection between requests holds nothing.
    """
    operations = _Waiting()
    site = _lane_site(operations)
    clock = site.reactor
    idle, _ = _channel(site)
    idle.dataReceived(_get(b"answered-at-once"))
    protocol, transport = _channel(site)
    protocol.dataReceived(_put(b"k", b'{"value": 1}'))
    done = site.requests_done(5.0)
    clock.advance(1.0)
    assert not done.called
    operations.pending[0].callback(Answer(201, b'{"key":"k"}'))
    clock.advance(0.1)
    assert done.called and _statuses(transport.value()) == [201]
    assert done.result == 0  # no connection left owing an answer
    protocol.dataReceived(_put(b"never", b'{"value": 2}'))
    done = site.requests_done(2.0)
    clock.advance(1.9)
    assert not done.called
    clock.advance(0.2)
    assert done.called
    assert done.result == 1  # the timeout ended it, with that one request unanswered


def test_a_stopping_site_waits_for_a_request_on_twisteds_path_until_it_is_answered():
    """
    If a node stops while a request that went to Twisted's path (the ``http`` area at debug, where the lane
    declines) waits for its answer, then the site's wait does not end while it waits, and ends once it is
    answered.
    """
    operations = _Waiting()
    site = _lane_site(operations, log_policy=LogPolicy("debug"))
    # Twisted's path asks the same operations as the lane: the test's, whose Deferred it fires.
    [(_, _, kv)] = site.shortcuts
    kv.operations = operations
    clock = site.reactor
    protocol, transport = _channel(site)
    protocol.dataReceived(_delete(b"k"))
    [pending] = operations.pending
    # Held by Twisted's path, not the lane: the lane is closed, and waits for nothing.
    assert not protocol._lane.open and not protocol._lane.waiting
    done = site.requests_done(5.0)
    clock.advance(1.0)
    assert not done.called and transport.value() == b""
    pending.callback(Answer(200, b'{"key":"k","deleted":true}'))
    assert _statuses(transport.value()) == [200]
    clock.advance(0.1)
    assert done.called
    assert done.result == 0  # ended by the answer, not the timeout


def test_a_stopping_site_waits_for_an_answer_still_corked_until_the_end_of_the_turn():
    """
    If a stopping node's last request was answered in the reactor pass that would end its wait, then the
    answer is still in the channel's cork, sent at the end of the turn: the wait lasts until it is sent, as the
    exit that follows the wait would drop it.
    """
    site = _lane_site(_Waiting())
    clock = site.reactor
    protocol, transport = _channel(site)
    # What cork() puts in front of a TCP connection (a test transport gets none of its own).
    protocol.transport = cork = _Cork(transport)
    site.end_of_turn.add(protocol._uncork)
    cork.write(b"the answer")
    done = site.requests_done(5.0)
    assert not done.called
    clock.advance(0)
    assert transport.value() == b"the answer"
    clock.advance(0.1)
    assert done.called


@pytest_twisted.ensureDeferred
async def test_a_stopping_site_waits_for_answers_queued_behind_a_socket_its_client_has_not_read():
    """
    If a stopping node's answers wait in the connection's buffer because its client has not read them yet,
    then the wait lasts while they do (the exit that follows would drop them), and ends once the client reads.
    """
    from kvresponder.privateapi import tcp_write_is_queued
    from kvresponder.store import Entry
    server = _Server(fast_lane=True)
    value = b'"' + b"x" * (VALUE_LIMIT - 100) + b'"'
    server.node.store.apply(Entry("big", value, (1_700_000_000_000, 0, "n1"), None))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    try:
        client.connect(server.address)
        client.sendall(_get(b"big") * 3000)

        def queued():
            return any(type(channel.transport) is tcp.Server and tcp_write_is_queued(channel.transport)
                       for channel in server.site.open_channels)
        for _ in range(250):
            if queued():
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert queued()
        done = server.site.requests_done(10.0)
        await deferLater(reactor, 0.3, lambda: None)
        assert not done.called
        answers = await deferToThread(_read_answers, client, 3000)
        assert [status for status, _, _ in answers] == [200] * 3000
        for _ in range(100):
            if done.called:
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert done.called
    finally:
        client.close()
        await server.port.stopListening()


@pytest.mark.parametrize("fast_lane", [True, False])
@pytest_twisted.ensureDeferred
async def test_once_the_node_is_leaving_each_answer_closes_its_connection(fast_lane):
    """
    If the node begins leaving (SIGTERM), then each answer on a kept-alive connection says ``Connection: close`` and
    the connection is closed after it, on the lane's routes as on Twisted's: a client or proxy opens a new
    connection for its next request, rather than send it on one the node closes under it as it exits (a review saw
    requests on idle kept-alive connections fail with a broken pipe, unanswered, at the drain's end). Before it
    leaves, connections are kept.
    """
    def exchange(sock, raw):
        sock.sendall(raw)
        return _read_answers(sock, 1)[0]

    def closed(sock) -> bool:
        sock.settimeout(5)
        return sock.recv(1) == b""

    for request in (_get(b"k"), b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n"):
        server = _Server(fast_lane=fast_lane)
        sock = socket.create_connection(server.address, timeout=10)
        try:
            status, headers, _ = await deferToThread(exchange, sock, request)
            assert b"connection" not in headers, headers
            server.site.begin_leaving()
            status, headers, _ = await deferToThread(exchange, sock, request)
            assert status in (200, 404) and headers.get(b"connection") == b"close", headers
            assert await deferToThread(closed, sock)
        finally:
            sock.close()
            await server.port.stopListening()
