"""
The limits decided before routing follow the route the path resolves to, as the resource tree routes it:
after percent-decoding, from the path only, never from substrings of the raw target or the query string.

Every route is sent bodies just over and exactly at its limit, through many spellings of its URL: query
strings and keys that spell other routes' names (``_internal``, ``bulk``), percent-encoded segments
(``%5Finternal``, ``%62ulk``, ``%2F``), doubled slashes. The node listens on a real loopback socket (the real
:class:`~kvresponder.http.site.KVSite` and resource tree), and the requests are raw bytes.
"""

import json
import re
import socket
import time
from typing import NamedTuple, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.threads import deferToThread
from twisted.web.http import RESPONSES

from kvresponder.http.limits import BULK, INTERNAL, VALUE
from kvresponder.http.root import build_root
from kvresponder.http.site import KVSite, client_text
from kvresponder.node import Node

from .support import make_settings

SECRET = "a-cluster-secret-for-the-limit-tests"
#: Small limits, all different, so that a request given another route's limit is caught: a value 4 KiB, bulk
#: 32 KiB (8 ×), internal 16 KiB.
LIMITS = {VALUE: 4096, BULK: 8 * 4096, INTERNAL: 16384}
HEADER_LIMIT = 4096


class Case(NamedTuple):
    method: bytes
    target: bytes
    limit: str


#: Each route, spelled many ways; the limit is that of the route the path reaches.
CASES = [
    # kv: a key, whatever it spells, and whatever the query says, is a value.
    Case(b"PUT", b"/t1/kv/plain", VALUE),
    Case(b"PUT", b"/t1/kv/big1?via=/_internal/", VALUE),
    Case(b"PUT", b"/t1/kv/big2/_internal/x", VALUE),
    Case(b"PUT", b"/t1/kv/big3?x=/bulk", VALUE),
    Case(b"PUT", b"/t1/kv/bulk", VALUE),
    Case(b"PUT", b"/t1/kv/x/bulk", VALUE),
    Case(b"PUT", b"/t1/kv/_internal", VALUE),
    Case(b"PUT", b"/t1/kv/%5Finternal%2Fapply", VALUE),
    Case(b"PUT", b"/t1/kv/a%2F_internal%2Fapply", VALUE),
    Case(b"PUT", b"/t1/kv/a%2Fbulk", VALUE),
    Case(b"PUT", b"/t1/kv//bulk", VALUE),
    Case(b"PUT", b"/t1/kv/x?/_internal/apply", VALUE),
    Case(b"PUT", b"/t1/kv/x#/bulk", VALUE),
    Case(b"PUT", b"/%74%31/kv/bulk", VALUE),
    Case(b"PUT", b"/t1/%6Bv/_internal", VALUE),
    Case(b"POST", b"/t1/kv/x/_internal/apply", VALUE),
    Case(b"POST", b"/t1/kv/bulk", VALUE),
    # the listing
    Case(b"GET", b"/t1/kv?prefix=/bulk", VALUE),
    Case(b"GET", b"/t1/kv/?x=/_internal/", VALUE),
    # bulk, only where Klein routes to it
    Case(b"POST", b"/t1/bulk", BULK),
    Case(b"POST", b"/t1/bulk/", BULK),
    Case(b"POST", b"/t1/%62ulk", BULK),
    Case(b"POST", b"/t1/%2Fbulk", VALUE),  # a slash sent encoded names no route
    Case(b"POST", b"/t1/bulk%2F", VALUE),
    Case(b"POST", b"/t1/bulk?x=/_internal/", BULK),
    Case(b"POST", b"/%74%31/bulk", BULK),
    Case(b"POST", b"/t1/b%75lk?prefix=kv", BULK),
    Case(b"PUT", b"/t1/bulk", VALUE),
    Case(b"POST", b"/t1/bulk%2Fx", VALUE),
    Case(b"POST", b"/t1/bulk/x", VALUE),
    Case(b"POST", b"/t1/bulk//", VALUE),
    Case(b"POST", b"/t1//bulk", VALUE),  # an empty segment after the tenant names no route
    Case(b"POST", b"/t1/x/bulk", VALUE),
    Case(b"POST", b"/t1/Bulk", VALUE),
    Case(b"POST", b"/t2/bulk", VALUE),
    # internal routes, each of them, and any path under /_internal/
    Case(b"POST", b"/t1/_internal/apply", INTERNAL),
    Case(b"POST", b"/t1/_internal/get", INTERNAL),
    Case(b"POST", b"/t1/_internal/keys", INTERNAL),
    Case(b"POST", b"/t1/_internal/sync/buckets", INTERNAL),
    Case(b"POST", b"/t1/_internal/sync/versions", INTERNAL),
    Case(b"POST", b"/t1/_internal/sync/request", INTERNAL),
    Case(b"GET", b"/t1/_internal/copies", INTERNAL),
    Case(b"POST", b"/t1/%5Finternal/apply", INTERNAL),
    Case(b"POST", b"/t1/%5finternal/sync/buckets?x=/kv/", INTERNAL),
    Case(b"POST", b"/t1/_internal//apply", INTERNAL),
    Case(b"POST", b"/t1/_internal/bulk", INTERNAL),
    Case(b"POST", b"/t1/_internal/kv/x", INTERNAL),
    Case(b"POST", b"/%74%31/_internal/apply", INTERNAL),
    Case(b"POST", b"/t1/_internal%2Fapply", VALUE),
    Case(b"POST", b"/t1/x/_internal/apply", VALUE),
    Case(b"POST", b"/t1//_internal/apply", VALUE),
    Case(b"POST", b"/t2/_internal/apply", VALUE),
    Case(b"POST", b"/t1/health?/_internal/apply", VALUE),
    # the other public routes, and no route at all
    Case(b"PUT", b"/t1/admin/log-levels", VALUE),
    Case(b"PUT", b"/t1/admin/log-levels?x=/bulk", VALUE),
    Case(b"PUT", b"/t1/admin/%6Cog-levels?x=/_internal/", VALUE),
    Case(b"PUT", b"/t1/admin/log-levels/_internal/", VALUE),
    Case(b"POST", b"/t1/health", VALUE),
    Case(b"POST", b"/t1/health/bulk", VALUE),
    Case(b"POST", b"/t1/health/ready?/bulk", VALUE),
    Case(b"POST", b"/t1/peers", VALUE),
    Case(b"POST", b"/t1/metrics/_internal/apply", VALUE),
    Case(b"POST", b"/t1/diag", VALUE),
    Case(b"POST", b"/t1/openapi.json?/_internal/", VALUE),
    Case(b"POST", b"/t1/%FF/_internal/apply", VALUE),
    Case(b"POST", b"/t1", VALUE),
    Case(b"POST", b"/t1/", VALUE),
    Case(b"POST", b"/", VALUE),
    Case(b"POST", b"/_internal/apply", VALUE),
    Case(b"POST", b"/bulk", VALUE),
]


class _Server:
    """
    One node's real HTTP server on a loopback port, with the small limits above and a cluster secret (so
    internal routes are open to signed peers, and answer an unsigned request 401, not 403).
    """

    def __init__(self) -> None:
        settings = make_settings("t1", "n1", advertise_address="127.0.0.1", port="3000",
                                 cluster_secret=SECRET, max_value_size=str(LIMITS[VALUE]), insecure_admin="true")
        self.node = Node(settings, reactor, http=None)
        self.site = KVSite(build_root(self.node, self.node.authenticator), reactor,
                           body_limit=LIMITS[VALUE], internal_body_limit=LIMITS[INTERNAL],
                           max_header_bytes=HEADER_LIMIT)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)


@pytest.fixture(scope="module")
def server():
    server = _Server()
    yield server
    server.port.stopListening()


def _exchange(address, raw: bytes, reset: bytes = b"") -> bytes:
    """Send ``raw``, then read until the server closes: what it answered, then ``reset`` if it reset."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunks.append(reset)
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


class Answer(NamedTuple):
    status: int
    content_type: Optional[bytes]
    body: bytes
    status_line: bytes = b""


def _parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b":", 1) for line in lines[1:])
    content_type = {name.strip().lower(): value.strip() for name, value in headers.items()}.get(b"content-type")
    return Answer(int(lines[0].split(b" ")[1]), content_type, body, lines[0])


def _request(case: Case, body: bytes, chunked: bool = False, extra_headers: bytes = b"") -> bytes:
    head = (b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n%s"
            % (case.method, case.target, extra_headers))
    if chunked:
        pieces = [body[i:i + 1000] for i in range(0, len(body), 1000)]
        return (head + b"Transfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n")
    return head + b"Content-Length: %d\r\n\r\n" % (len(body),) + body


def _body(size: int) -> bytes:
    """A JSON body of exactly ``size`` bytes (a value: a write to kv may store it)."""
    return b'{"value":"' + b"x" * (size - 12) + b'"}'


async def _send(server, raw: bytes) -> Answer:
    return _parse(await deferToThread(_exchange, server.address, raw))


def _id(case: Case) -> str:
    return "%s %s" % (case.method.decode(), case.target.decode("latin-1"))


def _signed_length(server, case: Case, size: int) -> bytes:
    """
    For a request to an internal route, the header a peer sends with it: its head signed for its body's length
    (only such a request gets the internal limit). Nothing for any other route.
    """
    if case.limit != INTERNAL:
        return b""
    path = case.target.split(b"?", 1)[0]
    return b"X-KV-Auth-Length: %s\r\n" % (server.node.authenticator.sign_length(case.method, path, size),)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_of_the_route_the_path_reaches_gets_413(server, case):
    """
    If a body is one byte over the limit of the route its decoded path reaches (whatever the query string
    and the key spell), then it gets 413, in JSON, whether its length is declared or it arrives chunked. A
    chunked body to an internal route gets a client's limit: a peer declares, and signs, its body's length.
    """
    for chunked in (False, True):
        limit = LIMITS[BULK] if chunked and case.limit == INTERNAL else LIMITS[case.limit]
        answer = await _send(server, _request(case, _body(limit + 1), chunked,
                                              _signed_length(server, case, limit + 1)))
        assert answer.status == 413, (case, chunked, answer)
        # One reason phrase for every 413, whether the head or the body gave it away.
        assert answer.status_line == b"HTTP/1.1 413 " + RESPONSES[413], (case, chunked, answer)
        assert answer.content_type == b"application/json"
        assert json.loads(answer.body)["error"] == "payload_too_large"
        assert b"%d bytes" % (limit,) in answer.body


@pytest.mark.parametrize("case", [case for case in CASES if case.limit == INTERNAL], ids=_id)
@pytest_twisted.ensureDeferred
async def test_an_internal_body_over_a_bulk_limit_without_a_signed_length_gets_413(server, case):
    """
    If a request to an internal route declares a body larger than a bulk request's limit and its head is not signed for
    that length (a caller without the cluster secret, or a forged signature), then it gets 413 from its head,
    before its body is read; signed for another length, the same.
    """
    size = LIMITS[BULK] + 1
    forged = b"X-KV-Auth-Length: %.3f:%s\r\n" % (time.time(), b"0" * 64)
    other = _signed_length(server, case, size + 1)
    for extra in (b"", forged, other):
        answer = await _send(server, _request(case, _body(size), extra_headers=extra))
        assert answer.status == 413, (case, extra, answer)
        assert b"%d bytes" % (LIMITS[BULK],) in answer.body


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest_twisted.ensureDeferred
async def test_a_body_at_the_limit_of_the_route_the_path_reaches_is_not_refused_as_too_large(server, case):
    """
    If a body is exactly as large as the limit of the route its path reaches, then it is not refused as too
    large (the route answers it, whatever else it says).
    """
    size = LIMITS[case.limit]
    answer = await _send(server, _request(case, _body(size), extra_headers=_signed_length(server, case, size)))
    assert answer.status != 413, (case, answer)
    assert answer.status < 500, (case, answer)


@pytest.mark.parametrize("case", CASES[::4], ids=_id)
@pytest_twisted.ensureDeferred
async def test_headers_over_max_header_bytes_are_refused_on_every_route(server, case):
    """
    If a request's line and headers exceed MAX_HEADER_BYTES, then it gets a JSON 400, whichever route it
    names; just under the limit, it is not refused.
    """
    room = HEADER_LIMIT - len(_request(case, b"").split(b"\r\n\r\n")[0])
    over = await _send(server, _request(case, b"{}", extra_headers=b"X-Pad: %s\r\n" % (b"p" * (room + 64),)))
    assert over.status == 400 and over.content_type == b"application/json", over
    assert json.loads(over.body)["error"] == "bad_request"
    under = await _send(server, _request(case, b"{}", extra_headers=b"X-Pad: %s\r\n" % (b"p" * (room - 64),)))
    assert b'"bad_request"' not in under.body, under


@pytest.mark.parametrize("address, text", [
    (IPv4Address("TCP", "10.0.0.7", 4321), "10.0.0.7:4321"),
    (IPv6Address("TCP", "fd00::7", 4321), "[fd00::7]:4321"),
    (UNIXAddress(b"/run/kv.sock"), str(UNIXAddress(b"/run/kv.sock"))),
])
def test_a_rejected_clients_address_is_written_as_host_and_port(address, text):
    """A client's address in a log line is ``host:port``, ``[host]:port`` for IPv6, and as it is for any other."""
    assert client_text(address) == text


@pytest_twisted.ensureDeferred
async def test_a_request_of_more_than_500_header_lines_is_refused_as_the_contract_says(server):
    """
    If a request has 501 header lines, well under MAX_HEADER_BYTES, then it is refused 400 ``bad_request`` (the
    fixed limit of 500 that CONTRACT.md states, Twisted's), and one of 500 is served.
    """
    case = CASES[0]
    fixed = len(_request(case, b"").split(b"\r\n\r\n")[0].split(b"\r\n")) - 1  # Host, ..., Content-Length
    for lines, refused in ((500, False), (501, True)):
        pad = b"".join(b"X%d: v\r\n" % (index,) for index in range(lines - fixed))
        answer = await _send(server, _request(case, b'{"value": 1}', extra_headers=pad))
        assert (answer.status == 400 and json.loads(answer.body)["error"] == "bad_request") == refused, (lines, answer)


@pytest_twisted.ensureDeferred
async def test_headers_over_max_header_bytes_are_logged_as_rejected_by_the_node_that_refused_them(server, eliot_logger):
    """
    If a request's headers exceed MAX_HEADER_BYTES, then the node that refuses it logs ``http:rejected`` with the
    status, the reason and the client, as it does every other refusal before a resource: a peer's batch refused so
    showed only as a status on the node that sent it.
    """
    case = CASES[0]
    room = HEADER_LIMIT - len(_request(case, b"").split(b"\r\n\r\n")[0])
    over = await _send(server, _request(case, b"{}", extra_headers=b"X-Pad: %s\r\n" % (b"p" * (room + 64),)))
    assert over.status == 400
    rejected = [m for m in eliot_logger.messages if m.get("message_type") == "kvresponder:http:rejected"]
    assert len(rejected) == 1 and rejected[0]["reason"].startswith("400 Bad Request: ")
    # host:port, as log tools filter on it: not the repr of Twisted's address object.
    assert re.fullmatch(r"127\.0\.0\.1:\d+", rejected[0]["client"]), rejected[0]["client"]


def test_the_tree_gives_each_path_the_limit_of_the_route_it_reaches():
    """
    If the root is asked for a path's limit, then it answers from the decoded path alone: a query string, a
    fragment or a key naming another route changes nothing.
    """
    node = Node(make_settings("t1", "n1", cluster_secret=SECRET), reactor, http=None)
    site = KVSite(build_root(node, node.authenticator), reactor, body_limit=LIMITS[VALUE],
                  internal_body_limit=LIMITS[INTERNAL])
    for case in CASES:
        assert site.body_limit_for(case.target, case.method) == LIMITS[case.limit], case


def test_internal_routes_closed_to_everyone_take_no_more_than_a_value():
    """
    If the node has no cluster secret (and no --insecure-cluster), then its internal routes, which answer 403
    whatever the body, take no larger body than a value; with --insecure-cluster they take a peer's batch.
    """
    for overrides, limit in (({}, VALUE), ({"insecure_cluster": "true"}, INTERNAL)):
        node = Node(make_settings("t1", "n1", **overrides), reactor, http=None)
        site = KVSite(build_root(node), reactor, body_limit=LIMITS[VALUE],
                      internal_body_limit=LIMITS[INTERNAL])
        for target in (b"/t1/_internal/apply", b"/t1/%5Finternal/sync/buckets", b"/t1/_internal/copies"):
            assert site.body_limit_for(target, b"POST") == LIMITS[limit], (overrides, target)


@pytest_twisted.ensureDeferred
async def test_a_413_closes_the_connection_as_its_answer_says(server):
    """
    If a keep-alive request is refused as too large, then its answer says ``Connection: close`` and the
    connection closes after it: a request pipelined behind it gets no answer.
    """
    over = _request(CASES[0], _body(LIMITS[CASES[0].limit] + 1)).replace(b"Connection: close\r\n", b"")
    behind = b"GET /t1/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    raw = await deferToThread(_exchange, server.address, over + behind)
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    assert b"\r\nConnection: close\r\n" in raw
    assert _parse(raw).status == 413


@pytest.mark.parametrize("where", ["request line", "one header line"])
@pytest_twisted.ensureDeferred
async def test_a_single_line_over_max_header_bytes_gets_the_json_400_not_a_silent_hang_up(server, where):
    """
    A request line or one header line longer than MAX_HEADER_BYTES is refused as the whole head over it is: a
    JSON 400, then the connection closes (Twisted's line reader hung up without a word).
    """
    # Longer than Twisted's own 16 KiB line cap too, where its line reader used to hang up silently.
    long = b"a" * (max(HEADER_LIMIT, 16384) + 100)
    if where == "request line":
        raw = b"GET /t1/kv/" + long + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    else:
        raw = b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + long + b"\r\n\r\n"
    answer = await _send(server, raw)
    assert answer.status == 400 and answer.content_type == b"application/json", answer
    assert json.loads(answer.body)["error"] == "bad_request"


@pytest_twisted.ensureDeferred
async def test_a_larger_max_header_bytes_takes_a_header_line_longer_than_twisteds_own_cap():
    """
    With MAX_HEADER_BYTES at 64 KiB, one header line of 20 KiB (over the 16 KiB that Twisted's line reader
    takes by default) is served, on the fast lane's route and on Twisted's.
    """
    node = Node(make_settings("t1", "n1", advertise_address="127.0.0.1", port="3000"), reactor, http=None)
    site = KVSite(build_root(node), reactor, max_header_bytes=64 * 1024)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        address = ("127.0.0.1", port.getHost().port)
        pad = b"X-Pad: " + b"p" * 20000 + b"\r\n"
        # A keep-alive GET of a key is the fast lane's; with "Connection: close", Twisted's server takes it.
        for path, connection in ((b"/t1/kv/absent", b""), (b"/t1/kv/absent", b"Connection: close\r\n"),
                                 (b"/t1/health/live", b"Connection: close\r\n")):
            raw = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + connection + pad + b"\r\n"
            answer = _parse(await deferToThread(_one_answer, address, raw))
            assert answer.status in (200, 404) and b"bad_request" not in answer.body, (path, answer)
    finally:
        await port.stopListening()


def _one_answer(address, raw: bytes) -> bytes:
    """
    The first answer to ``raw``, read by its Content-Length (on a connection the server may keep open), or to
    the connection's close.
    """
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        declared = re.search(rb"(?i)content-length: *(\d+)", head)
        length = int(declared.group(1)) if declared else float("inf")  # else: read to the close
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def _read_until_closed(sock, timeout: float) -> Tuple[bytes, float]:
    """
    What the server sends until it closes its side, and the seconds that took.
    """
    started = time.monotonic()
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def _declare_and_wait(address, head: bytes, then_send: int = 0) -> Tuple[bytes, float]:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head)
        if then_send:
            # A client that goes on sending its body after the answer: the server drops it, and its answer
            # must still arrive whole.
            try:
                sock.sendall(b"x" * then_send)
            except OSError:
                pass
        return _read_until_closed(sock, 10)


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
@pytest_twisted.ensureDeferred
async def test_a_declared_body_over_the_limit_is_answered_413_at_once_without_reading_it(server, expect):
    """
    A request whose Content-Length is over its route's limit gets its JSON 413 as soon as its head is in, before
    any of its body (a terabyte, here, that never comes), and no "100 Continue" first; then the server closes
    its side.
    """
    head = (b"PUT /t1/kv/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000000\r\n" + (b"Expect: 100-continue\r\n" if expect else b"") + b"\r\n")
    raw, took = await deferToThread(_declare_and_wait, server.address, head)
    assert took < 3.0, took
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
    answer = _parse(raw)
    assert answer.content_type == b"application/json"
    assert json.loads(answer.body)["error"] == "payload_too_large"
    assert b"100 Continue" not in raw
    assert b"connection: close" in raw.lower()


@pytest_twisted.ensureDeferred
async def test_a_client_that_sends_its_oversized_body_anyway_still_reads_its_413(server):
    """
    If a client goes on sending a body over the limit after its head, then it still reads its whole 413: the
    node drops the body while it lingers, rather than reset the connection under it.
    """
    head = (b"PUT /t1/kv/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (LIMITS[VALUE] * 64,))
    raw, _ = await deferToThread(_declare_and_wait, server.address, head, LIMITS[VALUE] * 64)
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
    assert json.loads(_parse(raw).body)["error"] == "payload_too_large"


@pytest_twisted.ensureDeferred
async def test_a_body_within_the_limit_with_expect_100_continue_is_invited_and_stored(server):
    """If a body within the limit is announced with "Expect: 100-continue", then it is invited, and stored."""
    body = json.dumps({"value": "fits"}).encode()
    head = (b"PUT /t1/kv/fits HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (len(body),))

    def exchange():
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(head)
            first = sock.recv(65536)
            sock.sendall(body)
            rest, _ = _read_until_closed(sock, 10)
            return first, rest

    first, rest = await deferToThread(exchange)
    assert first.startswith(b"HTTP/1.1 100 Continue"), first
    raw = first.split(b"\r\n\r\n", 1)[1] + rest
    assert _parse(raw).status == 201, raw


@pytest.mark.parametrize("coding", [b"identity", b"gzip", b"chunked, identity"])
@pytest_twisted.ensureDeferred
async def test_a_transfer_coding_other_than_chunked_is_refused_not_guessed(server, coding):
    """
    With "Transfer-Encoding: identity", Twisted read the body as the next request (a request smuggled past
    a proxy that honours the header); any coding but chunked leaves the body's length unknown: a JSON 400.
    """
    smuggled = b"DELETE /t1/kv/victim HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = (b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: " + coding +
           b"\r\n\r\n" + smuggled)
    answer = await _send(server, raw)
    assert answer.status == 400 and json.loads(answer.body)["error"] == "bad_request", answer


# -- the budget of bodies held at once (MAX_BODY_BUFFER) ----------------------------------------------------------

#: A value 512 KiB; at most 600 KiB of bodies over SMALL_BODY held at once: two bodies of 290 KiB fit, a third
#: not.
BUDGET_VALUE = 512 * 1024
BUDGET = 600 * 1024
BODY, SENT = 290 * 1024, 145 * 1024


class _BudgetServer:
    def __init__(self, **settings) -> None:
        settings.setdefault("cluster_secret", SECRET)
        if settings["cluster_secret"] is None:
            del settings["cluster_secret"]
        settings = make_settings("t1", "n1", advertise_address="127.0.0.1", port="3000",
                                 max_value_size=str(BUDGET_VALUE), **settings)
        self.node = Node(settings, reactor, http=None)
        self.site = KVSite(build_root(self.node, self.node.authenticator), reactor,
                           body_limit=BUDGET_VALUE, metrics=self.node.metrics, body_buffer=BUDGET)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)

    def held(self) -> int:
        return self.site.body_budget.held


@pytest.fixture
def budget_server():
    server = _BudgetServer()
    yield server
    server.port.stopListening()
    for channel in list(server.site.open_channels):
        channel.transport.abortConnection()


def _put_head(key: bytes, size: int, extra: bytes = b"") -> bytes:
    return (b"PUT /t1/kv/%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n%s"
            b"Content-Length: %d\r\n\r\n" % (key, extra, size))


async def _until(condition, timeout: float = 5.0) -> None:
    from twisted.internet.task import deferLater
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        await deferLater(reactor, 0.01, lambda: None)


async def _open_with_part_of_a_body(server, key: bytes, size: int = BODY, sent: int = SENT) -> socket.socket:
    """
    A connection that has sent a PUT's head and ``sent`` bytes of its body, once the server holds room for it.
    """
    before = server.held()
    sock = await deferToThread(socket.create_connection, server.address, 10)
    sock.sendall(_put_head(key, size) + _body(size)[:sent])
    await _until(lambda: server.held() == before + size)
    return sock


def _rest_and_answer(sock: socket.socket, size: int = BODY, sent: int = SENT) -> bytes:
    with sock:
        sock.sendall(_body(size)[sent:])
        return _read_until_closed(sock, 10)[0]


@pytest_twisted.ensureDeferred
async def test_a_body_whose_head_finds_no_room_is_answered_503_at_once_and_the_room_comes_back_when_answered(
        budget_server):
    """
    If two PUTs' bodies of 290 KiB are on their way (600 KiB may be held), then a third is
    answered 503 ``body_buffer_full`` with ``Retry-After: 1`` as soon as its head is in, unread, and its
    connection closes; a small body (64 KiB or less) is still taken meanwhile; and once the first two are
    answered, their room is free again and the same third request is taken. The gauge follows what is held,
    against the budget's gauge.
    """
    first = await _open_with_part_of_a_body(budget_server, b"a")
    second = await _open_with_part_of_a_body(budget_server, b"b")
    assert budget_server.node.metrics.gauge("kv_request_body_bytes") == 2 * BODY
    assert budget_server.node.metrics.gauge("kv_request_body_max_bytes") == BUDGET

    raw, took = await deferToThread(_declare_and_wait, budget_server.address, _put_head(b"c", BODY))
    assert took < 3.0, took
    assert raw.startswith(b"HTTP/1.1 503 "), raw[:300]
    assert b"retry-after: 1\r\n" in raw.lower() and b"connection: close" in raw.lower()
    assert json.loads(_parse(raw).body)["error"] == "body_buffer_full"
    small = await _send(budget_server, _put_head(b"small", 60 * 1024) + _body(60 * 1024))
    assert small.status == 201, small

    for sock in (first, second):
        assert _parse(await deferToThread(_rest_and_answer, sock)).status == 201
    await _until(lambda: budget_server.held() == 0)
    answer = await _send(budget_server, _put_head(b"c", BODY) + _body(BODY))
    assert answer.status == 201, answer
    assert budget_server.held() == 0


@pytest.mark.parametrize("given, budget", [({}, 64 * 1024 * 1024),
                                           ({"max_body_buffer": "96Mi"}, 96 * 1024 * 1024),
                                           ({"max_value_size": "8Mi"}, 2 * 8 * 8 * 1024 * 1024)])
def test_a_node_exports_its_max_body_buffer_as_kv_request_body_max_bytes(given, budget):
    """
    If a node's MAX_BODY_BUFFER is set, or left to its default (the larger of 64 MiB and two /bulk bodies), then
    its /metrics says so in ``kv_request_body_max_bytes``, beside ``kv_request_body_bytes`` at 0, for the alert
    and the dashboard to divide one by the other. The site is built as ``tap.makeService`` builds it.
    """
    from prometheus_client.parser import text_string_to_metric_families

    settings = make_settings("t1", "n1", **given)
    assert settings.max_body_buffer == budget
    node = Node(settings, reactor, http=None)
    KVSite(build_root(node, node.authenticator), reactor, metrics=node.metrics,
           body_limit=settings.max_value_size, body_buffer=settings.max_body_buffer)
    samples = {sample.name: sample for family in text_string_to_metric_families(node.metrics.exposition().decode())
               for sample in family.samples}
    assert samples["kv_request_body_max_bytes"].value == budget
    assert samples["kv_request_body_max_bytes"].labels == {"tenant": "t1"}
    assert samples["kv_request_body_bytes"].value == 0


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_with_its_body_half_sent_gives_its_room_back(budget_server):
    """
    If a client sends part of a large body and goes away, then the room its body held is free again.
    """
    sock = await _open_with_part_of_a_body(budget_server, b"gone")
    assert budget_server.held() == BODY
    sock.close()
    await _until(lambda: budget_server.held() == 0)


@pytest_twisted.ensureDeferred
async def test_a_pipelined_body_finds_the_room_the_one_before_it_gave_back(budget_server):
    """
    If a client pipelines two large bodies that only fit one at a time, then the second is taken: the first
    gives its room back before the second's head is read.
    """
    size = 500 * 1024
    first = _put_head(b"p1", size).replace(b"Connection: close\r\n", b"") + _body(size)
    second = _put_head(b"p2", size) + _body(size)

    def exchange():
        with socket.create_connection(budget_server.address, timeout=10) as sock:
            sock.sendall(first + second)
            return _read_until_closed(sock, 10)[0]

    raw = await deferToThread(exchange)
    assert raw.count(b"HTTP/1.1 201 ") == 2, raw[:400]


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_holds_its_routes_limit_and_a_peers_signed_body_holds_nothing(budget_server):
    """
    If a body of unknown length (chunked) is on its way, then it holds its route's whole limit (it may grow to
    that); a peer's internal request, its head signed for its body's length, holds nothing (refusing it would
    fail a write's copy or a hand-off), while the same body unsigned holds its length.
    """
    sock = await deferToThread(socket.create_connection, budget_server.address, 10)
    sock.sendall(b"PUT /t1/kv/chunked HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n")
    await _until(lambda: budget_server.held() == BUDGET_VALUE)
    sock.close()
    await _until(lambda: budget_server.held() == 0)

    size = 200 * 1024
    signed = budget_server.node.authenticator.sign_length(b"POST", b"/t1/_internal/apply", size)
    sock = await deferToThread(socket.create_connection, budget_server.address, 10)
    sock.sendall(b"POST /t1/_internal/apply HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-KV-Auth-Length: %s\r\nContent-Length: %d\r\n\r\n%s" % (signed, size, b"x" * 1000))
    await _until(lambda: any(channel.requests for channel in budget_server.site.open_channels))
    await deferToThread(time.sleep, 0.2)
    assert budget_server.held() == 0
    unsigned = await deferToThread(socket.create_connection, budget_server.address, 10)
    unsigned.sendall(b"POST /t1/_internal/apply HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (size, b"x" * 1000))
    await _until(lambda: budget_server.held() == size)
    sock.close()
    unsigned.close()
    await _until(lambda: budget_server.held() == 0)


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_past_its_routes_limit_gives_its_room_back_at_once_and_is_answered_413(budget_server):
    """
    If a chunked body grows past its route's limit, then the room it held is free at once (what follows is
    dropped unread, however long the client takes to send it), and its end is answered 413, the connection
    closed.
    """
    sock = await deferToThread(socket.create_connection, budget_server.address, 10)
    try:
        sock.sendall(b"PUT /t1/kv/chunked HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n")
        await _until(lambda: budget_server.held() == BUDGET_VALUE)
        over = BUDGET_VALUE
        sock.sendall(b"%x\r\n" % (over,) + b"x" * over + b"\r\n")
        await _until(lambda: budget_server.held() == 0)
        sock.sendall(b"3\r\nxyz\r\n0\r\n\r\n")
        raw = (await deferToThread(_read_until_closed, sock, 10))[0]
    finally:
        sock.close()
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:300]
    assert json.loads(_parse(raw).body)["error"] == "payload_too_large"


@pytest_twisted.ensureDeferred
async def test_a_peers_signed_body_over_a_bulk_limit_is_let_in_on_one_check_of_its_signature(budget_server,
                                                                                          monkeypatch):
    """
    If a peer's internal request declares a body larger than a bulk request's limit, signed for its length, then
    it gets the internal limit and holds nothing of the budget, and its head's signature (an HMAC) is checked
    once for both.
    """
    authenticator = budget_server.node.authenticator
    checks = []

    def verify_length(*args, _verify=authenticator.verify_length):
        checks.append(args)
        return _verify(*args)

    monkeypatch.setattr(authenticator, "verify_length", verify_length)
    size = 8 * BUDGET_VALUE + 1
    signed = authenticator.sign_length(b"POST", b"/t1/_internal/apply", size)
    sock = await deferToThread(socket.create_connection, budget_server.address, 10)
    try:
        sock.sendall(b"POST /t1/_internal/apply HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-KV-Auth-Length: %s\r\nContent-Length: %d\r\n\r\n%s" % (signed, size, b"x" * 1000))
        await _until(lambda: any(channel.requests for channel in budget_server.site.open_channels))
        await deferToThread(time.sleep, 0.2)
        request = next(channel.requests[-1] for channel in budget_server.site.open_channels if channel.requests)
        assert request._limit > size
        assert budget_server.held() == 0
        assert len(checks) == 1
    finally:
        sock.close()


def test_with_an_insecure_cluster_no_internal_body_is_a_peers_for_the_budget():
    """
    If the node clusters with --insecure-cluster (no secret: anyone may call its internal routes), then no
    internal request's body is exempt from the budget, though any may have the internal limit.
    """
    from twisted.web.http_headers import Headers

    server = _BudgetServer(cluster_secret=None, insecure_cluster="true")
    try:
        site, path = server.site, b"/t1/_internal/apply"
        limit = site.body_limit_for(path, b"POST", headers=Headers(), length=200 * 1024)
        assert limit > site.bulk_body_limit
        assert site.body_terms(path, b"POST", Headers(), 200 * 1024) == (limit, 200 * 1024)
    finally:
        server.port.stopListening()


@pytest.fixture
def impatient_server():
    settings = make_settings("t1", "n1", advertise_address="127.0.0.1", port="3000")
    node = Node(settings, reactor, http=None)
    site = KVSite(build_root(node), reactor, timeout=0.5)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield ("127.0.0.1", port.getHost().port)
    port.stopListening()


@pytest.mark.parametrize("cut", [
    b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n",  # a head that never ends
    b"PUT /t1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"va",  # kv
    b"POST /t1/bulk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
    b"POST /t1/bulk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"10\r\n{\"put\"",
    # Behind a request answered in full: the connection's second request is the one cut short.
    b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\nPUT /t1/kv/k HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{",
], ids=["head", "kv body", "bulk body", "chunked body", "second request"])
@pytest_twisted.ensureDeferred
async def test_a_request_not_received_within_the_deadline_is_answered_408_and_the_connection_closes(
        impatient_server, cut):
    """
    If a client sends part of a request and no more, then once the request deadline (REQUEST_TIMEOUT) has passed
    the node answers a JSON 408 ``request_timeout`` and closes the connection, instead of resetting it without
    a word; what was answered before it on the connection stays whole, and nothing is stored.
    """
    raw = await deferToThread(_exchange, impatient_server, cut, b"<reset>")
    assert b"<reset>" not in raw, raw
    answers = raw.split(b"HTTP/1.1 ")[1:]
    assert answers[-1].startswith(b"408 Request Timeout\r\n"), raw
    answer = _parse(b"HTTP/1.1 " + answers[-1])
    assert answer.content_type == b"application/json" and b"Connection: close" in answers[-1]
    assert json.loads(answer.body)["error"] == "request_timeout"
    if cut.startswith(b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n"):
        assert len(answers) == 2 and answers[0].startswith(b"200 "), raw
    else:
        assert len(answers) == 1, raw
