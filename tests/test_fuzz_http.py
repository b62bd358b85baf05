"""
Fuzzing the HTTP surface of one node, in memory: the public routes, and the internal ones peers call.

Requests are written as raw bytes into a connection of the real :class:`~kvresponder.http.site.KVSite` (the
real resource tree, the real Twisted HTTP parser, the real limits), so that every byte of the request line,
the headers and the body is under the test's control: paths with percent-encoding, invalid UTF-8, dot
segments, other tenants and great length; odd methods; content-type variants and large headers; bodies of
random bytes, random JSON, JSON nested 10000 deep, numbers like 1e400 and 10**5000, invalid UTF-8, chunked
or not.

Whatever arrives, the node must answer with a success, or with a JSON ``{"error", "message"}`` 4xx or 503:
never another 5xx, never a redirect the OpenAPI description does not document (it documents none), never a
traceback (in the body or in the log), never a hang; a refused request (4xx) changes no stored value and no
log level; and an answer to a documented operation has a documented status and matches the documented schema
(docs/openapi.json). No answer is excused: there is no list of tolerated bugs.

The internal routes (``/_internal/*``) are fuzzed with bodies shaped after their schemas
(kvresponder/http/schemas.py), random JSON, binary batches and garbage, signed with the cluster key
(:class:`~kvresponder.peers.PeerAuthenticator`) and unsigned, on a node with a secret, one with
``--insecure-cluster`` and one with neither; the same rules hold, and who may call is checked too.
"""

import json
import os
from typing import Dict, List, NamedTuple, Optional, Tuple
from urllib.parse import quote, unquote_to_bytes

import pytest
from eliot import add_destinations, remove_destination
from hypothesis import HealthCheck, assume, example, given, note, settings as hsettings, strategies as st
from jsonschema import Draft202012Validator
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from kvresponder.http.hosts import host_refusal
from kvresponder.store import Entry
from kvresponder.wire import BATCH_TYPE, encode_batch

from .test_api import API

TENANT = "t1"
TOKEN = "fuzz-admin-token-0123456789"
SPEC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "openapi.json")
with open(SPEC_PATH, encoding="utf-8") as _spec:
    SPEC = json.load(_spec)

#: Each node configuration the fuzzer runs against: small limits so that 413 is reachable, an open admin, a
#: token-protected admin, and the defaults.
CONFIGS = {
    "small-limits-insecure-admin": dict(max_value_size="4Ki", max_memory="64Ki", insecure_admin="true"),
    "admin-token": dict(admin_token=TOKEN),
    "defaults": {},
}


# -- the wire ---------------------------------------------------------------------------------------


class Response(NamedTuple):
    status: int
    headers: Dict[bytes, List[bytes]]
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def parse_response(data: bytes) -> Optional[Response]:
    """
    The first final response in ``data`` (after any ``100 Continue``), or ``None`` if there is none.
    """
    rest = data
    while True:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        if status != 100:
            break
    headers: Dict[bytes, List[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if b"chunked" in b",".join(headers.get(b"transfer-encoding", [])).lower():
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    elif b"content-length" in headers:
        body = rest[:int(headers[b"content-length"][0])]
    else:
        body = rest
    return Response(status, headers, body, data)


class Node:
    """
    One in-memory node (tests/test_api.py's API) and a way to send it raw bytes.
    """

    def __init__(self, **overrides) -> None:
        self.api = API(**overrides)

    def send(self, raw: bytes) -> bytes:
        return self.send_pieces(raw)[0]

    def send_pieces(self, *pieces: bytes, lane: bool = True) -> Tuple[bytes, bool]:
        """
        Send ``pieces`` as separate reads; what came back, and whether the server closed the connection.
        ``lane=False``: to a site of this node's without the fast lane (as when tracing is on).
        """
        site = self.api.site if lane else self._site_without_lane()
        assert (site.lane is not None) == lane
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        try:
            for piece in pieces:
                protocol.dataReceived(piece)
            self.api.stub.flush()
            return transport.value(), transport.disconnecting
        finally:
            protocol.connectionLost(Failure(ConnectionDone()))

    def _site_without_lane(self):
        from kvresponder.http.root import build_root
        from kvresponder.http.site import KVSite

        return KVSite(build_root(self.api.node), self.api.clock, fast_lane=False)

    def snapshot(self) -> tuple:
        """
        What a refused request must not change: every live entry (key, value, version, expiry) and the log
        levels. Tombstones are left out: a DELETE of an absent key answers 404 but still writes one, by design
        (a replica the coordinator did not see may hold the key).
        """
        store = self.api.node.coordinator.store
        live = sorted((e.key, e.value, e.version, e.expires_at) for e in store.entries(include_tombstones=False))
        return live, sorted(self.api.node.log_policy.levels().items())

    def seed(self) -> None:
        for key, value in [("a", 1), ("a/b", {"x": [1, 2]}), ("é", "ü"), ("k" * 250, None)]:
            code = self.api.put(quote(key, safe=""), value)[0]
            assert code in (200, 201), code


@pytest.fixture(scope="module")
def _traceback_collector():
    seen: List[dict] = []

    def collect(message):
        if message.get("message_type") == "eliot:traceback":
            seen.append(message)

    add_destinations(collect)
    yield seen
    remove_destination(collect)


@pytest.fixture
def eliot_tracebacks(_traceback_collector):
    """
    Every ``eliot:traceback`` logged during the test: a handled request never logs one. (Eliot hands
    messages logged before its first destination to that destination, and earlier tests log some on
    purpose: start empty.)
    """
    del _traceback_collector[:]
    return _traceback_collector


_NODES: Dict[str, Node] = {}


def node_for(name: str) -> Node:
    """
    One node per configuration for the whole module: building one per example would dominate the run time,
    and the state the fuzzer accumulates (keys written by earlier examples) makes later examples richer.
    """
    if name not in _NODES:
        node = _NODES[name] = Node(**CONFIGS[name])
        node.seed()
    return _NODES[name]


# -- requests ---------------------------------------------------------------------------------------


class Request(NamedTuple):
    method: bytes
    target: bytes
    headers: Tuple[Tuple[bytes, bytes], ...]
    body: Optional[bytes]
    chunks: Optional[Tuple[int, ...]]
    host: Optional[bytes] = b"127.0.0.1:3000"

    def to_bytes(self) -> bytes:
        lines = [b"%s %s HTTP/1.1" % (self.method, self.target)]
        if self.host is not None:
            lines.append(b"Host: " + self.host)
        lines.extend(b"%s: %s" % header for header in self.headers)
        body = self.body
        if body is None:
            return b"\r\n".join(lines) + b"\r\n\r\n"
        if self.chunks is None:
            lines.append(b"Content-Length: %d" % (len(body),))
            return b"\r\n".join(lines) + b"\r\n\r\n" + body
        lines.append(b"Transfer-Encoding: chunked")
        out = [b"\r\n".join(lines) + b"\r\n\r\n"]
        position = 0
        for size in self.chunks:
            piece = body[position:position + size]
            if piece:
                out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            position += size
        if position < len(body):
            out.append(b"%x\r\n%s\r\n" % (len(body) - position, body[position:]))
        out.append(b"0\r\n\r\n")
        return b"".join(out)

    def __repr__(self) -> str:
        body = self.body if self.body is None or len(self.body) <= 300 else self.body[:300] + b"..."
        return "Request(%r, %r, headers=%r, body=%r, chunks=%r, host=%r)" % (
            self.method, self.target[:300], [(k, v[:100]) for k, v in self.headers], body, self.chunks,
            self.host if self.host is None else self.host[:100])


METHODS = [b"GET", b"HEAD", b"PUT", b"DELETE", b"POST"]
ODD_METHODS = [b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT", b"PROPFIND", b"MKCOL", b"FOO", b"M-SEARCH", b"get",
               b"Put", b"X" * 100]
ROUTES = ["kv", "kv/", "bulk", "health", "health/live", "health/ready", "peers", "metrics", "diag",
          "openapi.json", "admin/log-levels", "", "health/", "admin", "admin/log-levels/x", "kvx", "nope",
          "_internal/apply", "_internal/keys", "bulk/x", "metrics/"]
TENANTS = ["/t1"] * 8 + ["/t2", "/T1", "", "/t1/..", "/%74%31", "/t1/.", "//t1", "/t1%2F", "/" + "t" * 300]
ODD_KEYS = [".", "..", "%2e%2e", "%2E", "%", "%zz", "%2F", "%00", "a%2Fb", "..%2F..", "/", "//", "a/../b",
            "%C3%A9", "%C3", "%ED%A0%80", "%F4%90%80%80", "%EF%BB%BF", "x" * 251, "%C3%A9" * 250,
            "%C3%A9" * 251, "k" * 250, "a", "a%2Fb", "%C3%A9", "a/b"]

unreserved_text = st.text(min_size=1, max_size=60)


@st.composite
def keys(draw) -> str:
    """A key segment as it appears on the wire."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return quote(draw(st.text(min_size=0, max_size=80)).encode("utf-8", "surrogatepass"), safe="")
    if kind == 1:
        # Raw bytes, percent-encoded: mostly invalid UTF-8.
        return quote(draw(st.binary(min_size=1, max_size=60)), safe="")
    if kind == 2:
        # Unencoded slashes and dots: several path segments.
        return quote(draw(st.text(alphabet="ab./%", min_size=1, max_size=20)), safe="/.%")
    if kind == 3:
        return "k" * draw(st.integers(200, 4000))
    return draw(st.sampled_from(ODD_KEYS))


@st.composite
def queries(draw) -> str:
    if draw(st.integers(0, 2)) == 0:
        return ""
    names = st.sampled_from(["prefix", "limit", "cursor", "x", "limit", "cursor"])
    values = st.one_of(
        st.integers(-5, 20000).map(str),
        st.sampled_from(["", "0", "1", "10000", "10001", "1e3", "%205", "1_000", "%D9%A5", "9" * 5000, "-0",
                         "abc", "AAAA", "YQ", "_-_-", "=", "%", "%zz", "%FF", "YWJj%0A", "QQ==", "/w"]),
        st.text(max_size=30).map(lambda text: quote(text.encode("utf-8", "surrogatepass"), safe="")),
        st.binary(max_size=20).map(lambda data: quote(data, safe="")))
    pairs = draw(st.lists(st.tuples(names, values), min_size=1, max_size=4))
    return "?" + "&".join("%s=%s" % pair for pair in pairs)


def deep(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth  # unclosed


SPECIAL_VALUES = [b"1e400", b"-1e400", b"1e-400", b"1" + b"0" * 5000, b"-" + b"9" * 4300, b"9" * 4301,
                  b"0." + b"0" * 5000 + b"1", b"NaN", b"Infinity", b"-Infinity", b"1.7976931348623157e309",
                  b'"\\ud800"', b'"\\udc00\\ud800"', b'"\xff"', b'"\xed\xa0\x80"', b'"\x00"', b'"\\u0000"',
                  b"null", b"true", b"{}", b"[]", b'""', b'"' + b"x" * 5000 + b'"']


@st.composite
def special_bodies(draw) -> bytes:
    """The bodies the brief names: deep nesting, huge numbers, invalid UTF-8, in every body shape."""
    depth = draw(st.sampled_from([100, 900, 950, 960, 970, 1000, 5000, 10000]))
    inner = draw(st.one_of(st.sampled_from(SPECIAL_VALUES),
                           st.sampled_from(["list", "object", "open"]).map(lambda kind: deep(depth, kind))))
    shape = draw(st.sampled_from([
        b"%s", b'{"value":%s}', b'{"value":1,"ttl":%s}', b'{"value":%s,"ttl":60}', b'{"level":%s}',
        b'{"levels":{"http":%s}}', b'{"levels":%s}', b'{"put":[{"key":"p","value":%s}]}',
        b'{"put":[{"key":%s,"value":1}]}', b'{"get":[%s]}', b'{"get":%s}', b'{"delete":[%s]}',
        b'{"put":[{"key":"p","value":1,"ttl":%s}]}', b'{"value":%s,"value":2}', b"\xef\xbb\xbf%s",
        b"%s trailing", b" \t\r\n%s\n"]))
    return shape % (inner,)


json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(10 ** 40), max_value=10 ** 40)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=6), children, max_size=4), max_leaves=20)
ttls = st.one_of(st.none(), st.floats(allow_nan=False), st.integers(-10, 10 ** 12), st.text(max_size=5),
                 st.booleans(), st.just(1e-320), st.just(315360000), st.just(315360000.0001))
levels = st.sampled_from(["debug", "info", "warning", "error", "DEBUG", "Warning", "loud", "", None, 3, [], {}])
areas = st.sampled_from(["http", "store", "discovery", "replication", "rebalance", "service", "nope", ""])


@st.composite
def shaped_bodies(draw, shape: Optional[int] = None) -> bytes:
    """
    Bodies close to what each route expects (0: a write, 1: bulk, 2: log levels), so that the fuzzer gets
    past the first checks.
    """
    keys_ = st.one_of(st.text(max_size=12), st.sampled_from(["a", "a/b", "é", "", "x" * 251]), json_scalars)
    if shape is None:
        shape = draw(st.integers(0, 4))
    if shape == 0:
        body = {"value": draw(json_values)}
        if draw(st.booleans()):
            body["ttl"] = draw(ttls)
        if draw(st.integers(0, 5)) == 0:
            body[draw(st.text(max_size=5))] = draw(json_scalars)
    elif shape == 1:
        put_item = st.fixed_dictionaries({"key": keys_, "value": json_values},
                                         optional={"ttl": ttls, "extra": json_scalars})
        body = draw(st.fixed_dictionaries({}, optional={
            "get": st.lists(keys_, max_size=5), "put": st.lists(put_item, max_size=4),
            "delete": st.lists(keys_, max_size=5), "other": json_scalars}))
    elif shape == 2:
        body = draw(st.fixed_dictionaries({}, optional={
            "level": levels, "levels": st.dictionaries(areas, levels, max_size=3), "extra": json_scalars}))
    elif shape == 3:
        body = draw(json_values)
    else:
        return draw(st.binary(max_size=200))
    return json.dumps(body).encode("utf-8")


bodies = st.one_of(st.none(), st.none(), shaped_bodies(), shaped_bodies(), special_bodies(),
                   st.binary(max_size=300), st.just(b""), st.just(b"x" * 5000),
                   st.just(b'{"value":"' + b"x" * 70000 + b'"}'))

CONTENT_TYPES = [b"application/json", b"application/json; charset=utf-8", b"APPLICATION/JSON",
                 b" application/json ;q=1", b"application/json;", b"text/plain", b"application/jsonx",
                 b"application/problem+json", b"application/x-www-form-urlencoded", b"", b";", b"*/*",
                 b"multipart/form-data; boundary=xyz", b"application/json\tcharset", b"\xe9/\xff"]
HOSTS = [b"", b"localhost", b"[::1]:3000", b"x" * 63, b"x" * 64, b"a..b", b".", b"\xc3\xa9.example",
         b"\xff", b"h:99999", b"h:x", b"xn--zz"]
header_value = st.binary(max_size=40).map(lambda data: bytes(b for b in data if b >= 0x20 and b != 0x7f))


@st.composite
def requests_(draw) -> Request:
    tenant = draw(st.sampled_from(TENANTS))
    route = draw(st.sampled_from(ROUTES + ["kv/{key}"] * 8 + ["{segment}"] * 3))
    if route == "kv/{key}":
        route = "kv/" + draw(keys())
    elif route == "{segment}":
        # Below the tenant but outside kv: Klein's routes, with any (percent-encoded) bytes.
        route = draw(st.sampled_from(["", "health/", "admin/", "_internal/", "bulk/"])) + draw(keys())
    target = (tenant + "/" + route + draw(queries())).encode("ascii")
    method = draw(st.one_of(st.sampled_from(METHODS), st.sampled_from(METHODS), st.sampled_from(ODD_METHODS)))
    host = draw(st.one_of(st.just(b"127.0.0.1:3000"), st.just(b"127.0.0.1:3000"), st.sampled_from(HOSTS),
                          header_value))
    headers = []
    well_formed = draw(st.booleans())
    if well_formed:
        shape = {b"PUT": 0 if route.startswith("kv") else 2, b"POST": 1}.get(method)
        body = draw(shaped_bodies(shape)) if shape is not None else None
        content_type = draw(st.sampled_from([None, b"application/json", b"application/json; charset=utf-8"]))
    else:
        body = draw(bodies)
        content_type = draw(st.one_of(st.none(), st.sampled_from(CONTENT_TYPES[:2]),
                                      st.sampled_from(CONTENT_TYPES)))
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    auth = draw(st.sampled_from([None, None, b"Bearer " + TOKEN.encode(), b"bearer " + TOKEN.encode(),
                                 b"Bearer wrong", b"Basic Zm9vOmJhcg==", b"Bearer", b"Bearer  " + TOKEN.encode()]))
    if auth is not None:
        headers.append((b"Authorization", auth))
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from([b"X-Big", b"Accept", b"Cookie", b"User-Agent", b"X-Forwarded-For",
                                     b"Accept-Encoding", b"Traceparent", b"Connection"]))
        value = draw(st.one_of(header_value, st.integers(1, 8000).map(lambda n: b"v" * n)))
        headers.append((name, value))
    if draw(st.integers(0, 9)) == 0:
        headers.append((b"Expect", b"100-continue"))
    chunks = None
    if body is not None and draw(st.integers(0, 3)) == 0:
        chunks = tuple(draw(st.lists(st.integers(1, 700), min_size=1, max_size=8)))
    request = Request(method, target, tuple(headers), body, chunks, host)
    # Stay within the header limits: a request over them gets a JSON 400 before routing, which a documented
    # operation does not list (tests/test_limits.py covers those limits on every route).
    assume(len(target) + sum(len(k) + len(v) + 4 for k, v in headers) < 15000)
    return request


# -- checks -----------------------------------------------------------------------------------------


def _documented(request: Request) -> Optional[Tuple[str, dict]]:
    """
    The spec path and path item a request to our tenant addresses, when the target is plain enough to say.
    """
    target = request.target.decode("ascii").split("?", 1)[0]
    prefix = "/" + TENANT
    if not target.startswith(prefix + "/"):
        return None
    rest = target[len(prefix):]
    segments = rest.split("/")[1:]
    if any(segment in (".", "..") for segment in segments) or "%2e" in rest.lower():
        return None
    if rest in ("/kv", "/kv/"):
        return "/kv", SPEC["paths"]["/kv"]
    if rest.startswith("/kv/"):
        return "/kv/{key}", SPEC["paths"]["/kv/{key}"]
    path = rest.rstrip("/") if rest != "/" else rest
    if path in SPEC["paths"] and "//" not in rest:
        return path, SPEC["paths"][path]
    return None


def _schema_for(response_spec: dict, content_type: str) -> Optional[dict]:
    if "$ref" in response_spec:
        response_spec = SPEC["components"]["responses"][response_spec["$ref"].rsplit("/", 1)[1]]
    content = response_spec.get("content")
    if not content:
        return None
    return content.get(content_type, {}).get("schema")


def _validate(schema: dict, instance) -> None:
    Draft202012Validator({"components": SPEC["components"], **schema}).validate(instance)


#: What a traceback or an exception's internals look like in a body; error bodies must carry none.
TRACEBACK_MARKERS = [b"Traceback (most recent call last)", b'File "/', b"site-packages/", b"kvresponder/http/"]


def check_exchange(node: Node, request: Request, before: tuple, also_allowed: Tuple[int, ...] = ()) -> Response:
    raw = node.send(request.to_bytes())
    response = parse_response(raw)
    assert response is not None, "no answer (a hang or a dropped connection): %r" % (raw[:500],)
    status, head = response.status, request.method == b"HEAD"
    assert status < 500 or status == 503 or status in also_allowed, (status, response.body[:500])
    if 300 <= status < 400:
        # A redirect is a bug unless the description documents it for this operation (it documents none).
        documented = _documented(request)
        operation = documented[1].get(request.method.decode("latin-1").lower()) if documented else None
        assert operation is not None and str(status) in operation["responses"], (
            "an undocumented redirect", status, response.raw[:500])
    if status >= 300:
        for marker in TRACEBACK_MARKERS:
            assert marker not in response.body, (marker, response.body[:2000])
    if status >= 400:
        assert response.header(b"content-type") == b"application/json", response.raw[:500]
        if not head:
            body = json.loads(response.body)
            assert isinstance(body, dict) and set(body) == {"error", "message"}, body
            assert isinstance(body["error"], str) and body["error"], body
            assert isinstance(body["message"], str) and body["message"], body
    elif not head:
        assert 200 <= status < 300, response.raw[:500]
        content_type = response.header(b"content-type") or b""
        if content_type.startswith(b"application/json"):
            json.loads(response.body)
    if 400 <= status < 500:
        assert node.snapshot() == before, "a refused request changed the state"
    if status < 500:
        # RFC 9110 (6.6.1): an origin server with a clock sends Date on 2xx, 3xx and 4xx answers.
        assert response.header(b"date"), response.raw[:500]
    if status == 405:
        assert response.header(b"allow"), "405 without Allow"

    documented = _documented(request)
    if documented is not None and request.method.decode("latin-1").isupper():
        path, item = documented
        methods = {m.upper() for m in item if m in ("get", "head", "put", "post", "delete", "patch", "options")}
        method = request.method.decode("ascii")
        if method in methods:
            operation = item[method.lower()]
            if status == 413 and "requestBody" not in operation and request.body:
                # Any route refuses a body over the limit before routing (the spec's introduction says so).
                return response
            # The server strips the whitespace around a header's value.
            refusal = host_refusal(b"HTTP/1.1", None if request.host is None else [request.host.strip(b" \t")])
            if status == 400 and refusal:
                # And a request without one valid Host header (so does the introduction).
                assert head or json.loads(response.body)["message"] == refusal, response.body
                return response
            assert str(status) in operation["responses"], "%s %s answered an undocumented %d: %r" % (
                method, path, status, response.body[:300])
            if not head:
                media = (response.header(b"content-type") or b"").decode("latin-1")
                schema = _schema_for(operation["responses"][str(status)], media)
                assert schema is not None, "%s %s %d: undocumented content type %r" % (method, path, status, media)
                if media == "application/json":
                    _validate(schema, json.loads(response.body))
        elif status == 401 and path.startswith("/admin/"):
            # An admin route's method it does not list, without the token (once one is set): the token is asked
            # for first, so that a caller without it learns no route or method.
            assert head or json.loads(response.body)["error"] == "unauthorized", response.body
        elif status not in (400, 413) and not (path == "/kv/{key}" and status == 400):
            # A method the path does not list: 405, and Allow names exactly the documented methods.
            assert status == 405, (method, path, status, response.body[:300])
            allowed = {m.strip() for m in response.header(b"allow").decode("ascii").split(",")}
            assert allowed == methods, (path, allowed, methods)
    return response


# -- the fuzzers ------------------------------------------------------------------------------------


#: Examples per fuzzer; raise it (KV_FUZZ_EXAMPLES=5000) for a longer hunt.
FUZZ_EXAMPLES = int(os.environ.get("KV_FUZZ_EXAMPLES", "250"))
FUZZ_SETTINGS = hsettings(max_examples=FUZZ_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


def _fuzz(config: str, request: Request, tracebacks: List[dict]) -> None:
    """
    If any request reaches the node, then it answers a success or a JSON 4xx/503 ({"error", "message"},
    no traceback), a documented status with a body that matches the spec for documented operations, 405 with
    the documented methods in Allow for others; a 4xx leaves every stored value and log level as it was;
    and nothing is logged as a traceback.
    """
    node = node_for(config)
    del tracebacks[:]
    note(repr(request))
    check_exchange(node, request, node.snapshot())
    assert not tracebacks, tracebacks[:1]


# One test function per configuration rather than pytest.mark.parametrize: pytest-twisted's wrapper and
# Hypothesis's do not survive being shared by several parametrized items.

@FUZZ_SETTINGS
@given(request=requests_())
@example(request=Request(b"PUT", b"/t1/kv/deep", ((b"Content-Type", b"application/json"),),
                         b'{"value":' + deep(10000, "list") + b"}", None))
@example(request=Request(b"POST", b"/t1/bulk", (), b'{"put":[{"key":"n","value":1e400}]}', (3, 5)))
@example(request=Request(b"PUT", b"/t1/kv/n", (), b'{"value":1' + b"0" * 5000 + b"}", None))
@example(request=Request(b"PUT", b"/t1/kv/%FF%FE", (), b'{"value":1}', None))
@example(request=Request(b"PUT", b"/t1/kv/u", (), b'{"value":"\xff\xfe"}', None))
@example(request=Request(b"GET", b"/t2/kv/a", (), None, None))
@example(request=Request(b"GET", b"/t1/kv/../../t1/health", (), None, None))
@example(request=Request(b"BREW", b"/t1/kv/a", (), None, None))
def test_fuzz_small_limits_and_open_admin(request, eliot_tracebacks):
    """
    With a 4 KiB body limit, a 64 KiB memory budget and --insecure-admin: any request is answered by the
    rules (see _fuzz).
    """
    _fuzz("small-limits-insecure-admin", request, eliot_tracebacks)


@FUZZ_SETTINGS
@given(request=requests_())
@example(request=Request(b"DELETE", b"/t1/admin/log-levels", (), None, None))
def test_fuzz_admin_token(request, eliot_tracebacks):
    """
    With ADMIN_TOKEN set: any request is answered by the rules (see _fuzz).
    """
    _fuzz("admin-token", request, eliot_tracebacks)


@FUZZ_SETTINGS
@given(request=requests_())
def test_fuzz_defaults(request, eliot_tracebacks):
    """
    With the default settings: any request is answered by the rules (see _fuzz).
    """
    _fuzz("defaults", request, eliot_tracebacks)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(key=st.text(min_size=1, max_size=40), value=st.one_of(json_values, st.sampled_from(SPECIAL_VALUES)),
       ttl=st.one_of(st.none(), st.floats(min_value=0.001, max_value=1e6)))
def test_values_written_with_any_key_read_back_unchanged(key, value, ttl, eliot_tracebacks):
    """
    If a write of any key and any value is accepted, then the value reads back equal, under that key, in GET,
    in the listing and in bulk; if it is refused, nothing is stored.
    """
    node = node_for("defaults")
    encoded_key = quote(key.encode("utf-8", "surrogatepass"), safe="").encode("ascii")
    if isinstance(value, bytes):
        body = b'{"value":%s%s}' % (value, b"" if ttl is None else b',"ttl":' + repr(ttl).encode())
    else:
        write = {"value": value}
        if ttl is not None:
            write["ttl"] = ttl
        body = json.dumps(write).encode("utf-8")
    before = node.snapshot()
    put = check_exchange(node, Request(b"PUT", b"/t1/kv/" + encoded_key,
                                       ((b"Content-Type", b"application/json"),), body, None), before)
    if put.status >= 400:
        return
    assert put.status in (200, 201)
    expected = json.loads(body)["value"]
    got = check_exchange(node, Request(b"GET", b"/t1/kv/" + encoded_key, (), None, None), node.snapshot())
    assert got.status == 200
    answer = json.loads(got.body)
    assert answer["key"] == key and answer["value"] == expected
    bulk = check_exchange(node, Request(b"POST", b"/t1/bulk", (), json.dumps({"get": [key]}).encode(), None),
                          node.snapshot())
    assert json.loads(bulk.body)["get"][key]["value"] == expected
    listing = check_exchange(node, Request(b"GET", b"/t1/kv?limit=10&prefix=" + encoded_key, (), None, None),
                             node.snapshot())
    assert key in json.loads(listing.body)["keys"]
    assert not eliot_tracebacks, eliot_tracebacks[:1]


# -- named cases ------------------------------------------------------------------------------------

def _named_cases():
    json_type = ((b"Content-Type", b"application/json"),)
    cases = {
        "deep-list-put": (b"PUT", b"/t1/kv/d", json_type, b'{"value":' + deep(10000, "list") + b"}"),
        "deep-object-put": (b"PUT", b"/t1/kv/d", json_type, b'{"value":' + deep(10000, "object") + b"}"),
        "deep-unclosed-put": (b"PUT", b"/t1/kv/d", json_type, deep(100000, "open")),
        "deep-bulk": (b"POST", b"/t1/bulk", json_type, b'{"put":[{"key":"d","value":' + deep(10000, "list")
                      + b"}]}"),
        "deep-admin-level": (b"PUT", b"/t1/admin/log-levels", json_type, b'{"level":' + deep(960, "list") + b"}"),
        "deep-admin-levels": (b"PUT", b"/t1/admin/log-levels", json_type,
                              b'{"levels":{"http":' + deep(960, "object") + b"}}"),
        "deep-at-the-edge-put": (b"PUT", b"/t1/kv/edge", json_type, b'{"value":' + deep(960, "list") + b"}"),
        "deep-at-the-edge-bulk": (b"POST", b"/t1/bulk", json_type,
                                  b'{"put":[{"key":"edge2","value":' + deep(955, "list") + b'}],"get":["edge"]}'),
        "1e400-value": (b"PUT", b"/t1/kv/n", json_type, b'{"value":1e400}'),
        "1e400-ttl": (b"PUT", b"/t1/kv/n", json_type, b'{"value":1,"ttl":1e400}'),
        "10**5000-value": (b"PUT", b"/t1/kv/n", json_type, b'{"value":1' + b"0" * 5000 + b"}"),
        "10**5000-ttl": (b"PUT", b"/t1/kv/n", json_type, b'{"value":1,"ttl":1' + b"0" * 5000 + b"}"),
        "10**4000-bulk-ttl": (b"POST", b"/t1/bulk", json_type,
                              b'{"put":[{"key":"n","value":1,"ttl":1' + b"0" * 4000 + b"}]}"),
        "tiny-ttl": (b"PUT", b"/t1/kv/tiny", json_type, b'{"value":1,"ttl":1e-320}'),
        "invalid-utf8-body": (b"PUT", b"/t1/kv/u", json_type, b'{"value":"\xff\xfe\xfd"}'),
        "surrogate-value": (b"PUT", b"/t1/kv/u", json_type, b'{"value":"\\ud800"}'),
        "surrogate-key-bulk": (b"POST", b"/t1/bulk", json_type, b'{"get":["\\ud800"]}'),
        "invalid-utf8-key": (b"GET", b"/t1/kv/%C3%28", (), None),
        "invalid-utf8-query": (b"GET", b"/t1/kv?prefix=%FF", (), None),
        "long-key": (b"PUT", b"/t1/kv/" + b"k" * 5000, json_type, b'{"value":1}'),
        "long-path": (b"GET", b"/t1/health/" + b"x/" * 3000, (), None),
        "dot-segments": (b"GET", b"/t1/kv/./../..", (), None),
        "other-tenant": (b"PUT", b"/t2/kv/a", json_type, b'{"value":1}'),
        "no-tenant": (b"DELETE", b"/kv/a", (), None),
        "odd-method": (b"PROPFIND", b"/t1/kv/a", (), None),
        "odd-method-klein": (b"PROPFIND", b"/t1/admin/log-levels", (), None),
        "form-body-list": (b"GET", b"/t1/kv", ((b"Content-Type", b"application/x-www-form-urlencoded"),),
                           b"limit=0&cursor=%%%"),
        "multipart-put": (b"PUT", b"/t1/kv/m", ((b"Content-Type", b"multipart/form-data; boundary=b"),),
                          b"--b\r\nContent-Disposition: form-data; name=value\r\n\r\n1\r\n--b--\r\n"),
        "huge-header": (b"GET", b"/t1/health", ((b"X-Big", b"v" * 15000),), None),
        "over-limit-body": (b"PUT", b"/t1/kv/big", json_type, b'{"value":"' + b"x" * 2 * 1024 * 1024 + b'"}'),
    }
    return cases


NAMED = _named_cases()


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_hostile_requests(name, eliot_tracebacks):
    """
    If one of the requests the fuzzers may not hit by chance arrives, then the same rules hold.
    """
    node = node_for("defaults")
    method, target, headers, body = NAMED[name]
    response = check_exchange(node, Request(method, target, headers, body, None), node.snapshot())
    assert not eliot_tracebacks, eliot_tracebacks[:1]
    if name.startswith(("deep-list", "deep-object", "deep-unclosed", "deep-bulk", "1e400", "10**",
                        "invalid-utf8", "surrogate", "long-key", "multipart")):
        assert 400 <= response.status < 500, (response.status, response.body[:300])


def test_bulk_get_of_a_repeated_key_answers_it_once():
    """
    If bulk asks for the same key twice, then the answer is JSON with one member for it (RFC 8259: names
    SHOULD be unique; strict parsers refuse duplicates).
    """
    node = node_for("defaults")
    response = check_exchange(node, Request(b"POST", b"/t1/bulk", (), b'{"get":["a","a"]}', None),
                              node.snapshot())
    pairs = json.loads(response.body, object_pairs_hook=lambda items: items)
    get = dict(pairs)["get"]
    assert [name for name, _ in get] == ["a"]


@pytest.mark.parametrize("target", [b"/t1/%FF", b"/t1/health/%FF", b"/t1/admin/%C3", b"/t1/_internal/%FF"])
def test_non_utf8_path_outside_kv_is_a_json_400(target, eliot_tracebacks):
    node = node_for("defaults")
    response = parse_response(node.send(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (target,)))
    assert response.status == 400
    assert response.header(b"content-type") == b"application/json"
    assert set(json.loads(response.body)) == {"error", "message"}


@pytest.mark.parametrize("host", [b"x" * 64, b"a..b", b".", b"\xff", b"\xc3\xa9.example", b"xn--zz", b"h:x"])
@pytest.mark.parametrize("target", [b"/t1/health", b"/t1/peers", b"/t1/nope", b"/t1/_internal/get"])
def test_invalid_host_header_is_not_a_server_error(host, target, eliot_tracebacks):
    """
    If the Host header is not a name IDNA can encode (or not UTF-8), then routing does not fail on it: the
    answer is the route's own, or a JSON error, never a 500 or a text/html 400.
    """
    node = node_for("defaults")
    del eliot_tracebacks[:]
    response = parse_response(node.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host)))
    assert response.status < 500
    assert response.header(b"content-type") == b"application/json", response.raw[:300]
    assert not eliot_tracebacks


HOST_CASES = {
    "none": (b"", "An HTTP/1.1 request needs a Host header."),
    "two": (b"Host: a\r\nHost: b\r\n", "A request may have one Host header, not 2."),
    "two, the same": (b"Host: a\r\nHost: a\r\n", "A request may have one Host header, not 2."),
    "a space": (b"Host: a b\r\n", "The Host header is not a host with an optional port."),
    "UTF-8": (b"Host: \xc3\xa9.example\r\n", "The Host header is not a host with an optional port."),
    "a path": (b"Host: a/b\r\n", "The Host header is not a host with an optional port."),
    "a port that is not a number": (b"Host: h:x\r\n", "The Host header is not a host with an optional port."),
    "user info": (b"Host: u@h\r\n", "The Host header is not a host with an optional port."),
    "not an address in brackets": (b"Host: [zz]\r\n", "The Host header is not a host with an optional port."),
    "half a bracket": (b"Host: [::1\r\n", "The Host header is not a host with an optional port."),
    "an address's characters in no address's order": (b"Host: [1:2:3]\r\n",
                                                       "The Host header is not a host with an optional port."),
    "a colon in brackets": (b"Host: [:]:80\r\n", "The Host header is not a host with an optional port."),
    "a zone id": (b"Host: [fe80::1%25eth0]\r\n", "The Host header is not a host with an optional port."),
    "a bad escape": (b"Host: a%zz\r\n", "The Host header is not a host with an optional port."),
}


@pytest.mark.parametrize("case", sorted(HOST_CASES))
@pytest.mark.parametrize("method, target, body", [
    (b"GET", b"/t1/kv/a", b""), (b"PUT", b"/t1/kv/hosted", b'{"value": 1}'), (b"DELETE", b"/t1/kv/a", b""),
    (b"GET", b"/t1/health", b""), (b"POST", b"/t1/bulk", b'{"put": {"hosted": 1}}')])
def test_a_request_without_one_valid_host_header_is_a_json_400_that_changes_nothing(case, method, target, body):
    """
    If an HTTP/1.1 request has no Host header, more than one, or one that is not a host with an optional port,
    then it is answered 400 with the reason, on the fast lane's routes and on Twisted's alike (RFC 9112, 3.2:
    a proxy in front may have routed it by another reading), and nothing is stored.
    """
    node = node_for("defaults")
    before = node.snapshot()
    hosts, message = HOST_CASES[case]
    framing = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % (len(body),) if body else b""
    response = parse_response(node.send(b"%s %s HTTP/1.1\r\n%s%s\r\n%s" % (method, target, hosts, framing, body)))
    assert response.status == 400, response.raw[:300]
    assert json.loads(response.body) == {"error": "bad_request", "message": message}
    assert node.snapshot() == before


@pytest.mark.parametrize("host", [b"", b"localhost", b"127.0.0.1:3000", b"[::1]:3000", b"cache.acme.svc:80",
                                  b"[2001:db8::ffff:192.0.2.1]", b"[v1.fe80::a+en1]:80",
                                  b"h:", b"xn--e1afmkfd.example", b"a%41b", b"sub-delims!$&'()*+,;="])
def test_a_request_with_one_host_of_any_valid_form_is_served(host):
    """
    If the Host header is one host of any form RFC 3986 allows (empty, a name, an IPv4 or bracketed IPv6
    address, with or without a port), then the request is served as usual, on the fast lane and Twisted's path.
    """
    node = node_for("defaults")
    # A key of its own: the fuzzers write and delete the seeded ones.
    assert parse_response(node.send(b"PUT /t1/kv/host-forms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                    b"application/json\r\nContent-Length: 12\r\n\r\n{\"value\": 1}")).status in (200, 201)
    for target in (b"/t1/kv/host-forms", b"/t1/health"):
        response = parse_response(node.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host)))
        assert response.status == 200, (target, host, response.raw[:300])


@pytest.mark.parametrize("method, target, body, allow", [
    (b"get", b"/t1/health", b"", b"GET, HEAD"),
    (b"get", b"/t1/metrics", b"", b"GET, HEAD"),
    (b"get", b"/t1/kv/a", b"", b"GET, HEAD, PUT, DELETE"),
    (b"put", b"/t1/admin/log-levels", b'{"level": "warning"}', b"GET, HEAD, PUT"),
    (b"Put", b"/t1/kv/lower", b'{"value": 1}', b"GET, HEAD, PUT, DELETE"),
    (b"post", b"/t1/bulk", b'{"put": {"lower": 1}}', b"POST")])
def test_a_method_spelled_in_another_case_is_a_405_that_changes_nothing(method, target, body, allow):
    """
    If a request's method is a route's method in another case, then it is answered 405 with the route's methods
    and nothing changes: methods are case-sensitive (RFC 9110, 9.1), and the router matched them in any case.
    """
    node = node_for("defaults")
    before = node.snapshot()
    framing = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % (len(body),) if body else b""
    response = parse_response(node.send(b"%s %s HTTP/1.1\r\nHost: h\r\n%s\r\n%s" % (method, target, framing, body)))
    assert response.status == 405, response.raw[:300]
    assert response.header(b"allow") == allow
    assert json.loads(response.body)["error"] == "method_not_allowed"
    assert node.snapshot() == before


def test_an_http_1_0_request_with_a_transfer_encoding_is_a_400_that_closes_and_changes_nothing():
    """
    If an HTTP/1.0 request has a Transfer-Encoding (which HTTP/1.0 does not have), then its framing is faulty:
    it is answered 400, nothing is stored, and the connection closes after the answer (RFC 9112, 6.1).
    """
    node = node_for("defaults")
    before = node.snapshot()
    response = parse_response(node.send(
        b"PUT /t1/kv/framed HTTP/1.0\r\nHost: h\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nc\r\n{\"value\": 1}\r\n0\r\n\r\n"))
    assert response.status == 400, response.raw[:300]
    assert json.loads(response.body) == {"error": "bad_request",
                                         "message": "An HTTP/1.0 request cannot have a Transfer-Encoding."}
    assert response.header(b"connection") == b"close"
    assert node.snapshot() == before


@pytest.mark.parametrize("pieces", [
    (b"GET /t1/health HTTP/1.1\nHost: h\n\n",),
    (b"GET /t1/kv/a HTTP/1.1\nHost: h\n\n",),
    (b"GET /t1/kv/a HTTP/1.1\r\nHost: h\n\r\n",),
    (b"PUT /t1/kv/lf HTTP/1.1\nHost: h\nContent-Type: application/json\nContent-Length: 12\n\n{\"value\": 1}",),
    (b"POST /t1/bulk HTTP/1.1\nHost: h\nContent-Length: 36\n\n{\"put\": [{\"key\": \"lf\", \"value\": 1}]}",),
    (b"GET /t1/kv/a HTTP/1.1\n", b"Host: h\n\n"),
    (b"GET /t1/health HTTP/1.1\r\n", b"Host: h\n", b"\n"),
    (b"GET /t1/kv/a HTTP/1.1\rHost: h\r\r",),
    (b"GET /t1/health HTTP/1.1\rHost: h\r\r",),
    (b"PUT /t1/kv/cr HTTP/1.1\r\nHost: h\rContent-Length: 12\r\n\r\n{\"value\": 1}",),
    (b"GET /t1/kv/a HTTP/1.1\r", b"Host: h\r\n\r\n")])
def test_a_request_head_with_a_bare_lf_or_cr_line_end_is_a_400_at_once_that_closes_and_changes_nothing(pieces):
    """
    If a line of the request head ends in LF without CR (netcat, a hand-typed request), or in CR without LF, in
    one read or across several, then it is answered 400 at once and the connection closes (RFC 9112, 2.2, lets
    a server refuse it); before, it waited for the request's deadline and was cut off without an answer.
    """
    node = node_for("defaults")
    before = node.snapshot()
    raw, closed = node.send_pieces(*pieces)
    response = parse_response(raw)
    assert response is not None and response.status == 400, raw[:300]
    assert json.loads(response.body) == {
        "error": "bad_request", "message": "Each line of the request head must end in CRLF, not in a bare LF or CR."}
    assert response.header(b"date")
    assert closed
    assert node.snapshot() == before


TLS_CLIENT_HELLO = bytes.fromhex("16030100a5010000a10303") + bytes(range(32)) + b"\x00\x20"


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "no-lane"])
@pytest.mark.parametrize("pieces, message", [
    ((TLS_CLIENT_HELLO,), "This port serves plain HTTP, not TLS (HTTPS)."),
    ((b"\x00\x01binary",), "The request is not HTTP: no request line starts so."),
    ((b" GET /t1/health HTTP/1.1",), "The request is not HTTP: no request line starts so."),
])
def test_bytes_no_request_line_starts_with_are_a_400_at_once_that_closes(lane, pieces, message):
    """
    If a connection's first bytes cannot start a request line (a TLS ClientHello sent to the plain port, binary
    bytes, a leading space) and hold no line end, then they are answered 400 at once and the connection closes;
    before, they waited for the request's deadline and were cut off without an answer.
    """
    node = node_for("defaults")
    before = node.snapshot()
    raw, closed = node.send_pieces(*pieces, lane=lane)
    response = parse_response(raw)
    assert response is not None and response.status == 400, raw[:300]
    assert json.loads(response.body) == {"error": "bad_request", "message": message}
    assert closed
    assert node.snapshot() == before


@pytest.mark.parametrize("pieces", [
    (b"GET /t1/kv/a HTTP/1.1\r\nHost: h\r\n\r\n\x16\x03\x01",),
    (b"GET /t1/kv/a HTTP/1.1\r\nHost: h\r\n\r\n", b"\x16\x03\x01"),
], ids=["same-read", "next-read"])
def test_bytes_that_cannot_start_a_request_after_a_request_are_a_400(pieces):
    """
    If bytes no request starts with follow a request the lane answered, in its read or the next, then the
    request is answered and they are answered 400 at once: the lane parsed up to them, so they start a request.
    """
    raw, closed = node_for("defaults").send_pieces(*pieces)
    first = parse_response(raw)
    assert first is not None and first.status in (200, 404), raw[:300]
    second = parse_response(raw[raw.index(b"\r\n\r\n") + 4 + len(first.body):])
    assert second is not None and second.status == 400, raw
    assert closed


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "no-lane"])
@pytest.mark.parametrize("pieces", [
    (b"GET", b" /t1/health HTTP/1.1\r\nHost: h\r\n\r\n"),
    (b"GET /t1/health", b" HTTP/1.1\r\nHost: h\r\n\r\n"),
    (b"\r\nGET /t1/health HTTP/1.1\r\nHost: h\r\n\r\n",),
    (b"PUT /t1/kv/sp HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\r\n", b" {\"value\":1}"[:12]),
])
def test_a_request_whose_later_reads_start_with_any_byte_is_served(lane, pieces):
    """
    If a request arrives in reads that start with a space or other byte no request starts with, or after an
    empty line, then it is served: only a request's first byte is held to that.
    """
    raw, closed = node_for("defaults").send_pieces(*pieces, lane=lane)
    response = parse_response(raw)
    assert response is not None and response.status in (200, 201), raw[:300]
    assert not closed


@pytest.mark.parametrize("pieces", [
    (b"GET /t1/health HTTP/1.1\r", b"\nHost: h\r\n\r", b"\n"),
    (b"PUT /t1/kv/split HTTP/1.1\r", b"\nHost: h\r\nContent-Length: 12\r\n\r", b"\n{\"value\": 1}"),
    (b"PUT /t1/kv/lf-body HTTP/1.1\r\nHost: h\r\nContent-Length: 16\r\n\r\n{\n\"value\": 1\n}\n\n",),
    (b"POST /t1/bulk HTTP/1.1\r\nHost: h\r\nContent-Length: 45\r\n\r\n",
     b"{\n\"put\": [{\"key\": \"lf-bulk\", \"value\": 1}]\n}\n\n"),
    # The head's blank line split between two reads, the body behind it holding LFs.
    (b"POST /t1/bulk HTTP/1.1\r\nHost: h\r\nContent-Length: 46\r\n",
     b"\r\n{\n\"put\": [{\"key\": \"lf-split\", \"value\": 1}]\n}\n\n"),
    (b"POST /t1/bulk HTTP/1.1\r\nHost: h\r\nContent-Length: 46\r\n\r",
     b"\n{\n\"put\": [{\"key\": \"lf-split\", \"value\": 1}]\n}\n\n")])
def test_a_crlf_split_between_reads_or_a_bare_lf_in_a_body_is_served(pieces):
    """
    If a CRLF arrives split between two reads, or a body (JSON, where an LF is whitespace) holds bare LFs, then
    the request is served as usual: only the head's line ends must be CRLF.
    """
    node = node_for("defaults")
    raw, _ = node.send_pieces(*pieces)
    response = parse_response(raw)
    assert response is not None and response.status in (200, 201), raw[:300]


@pytest.mark.parametrize("head, body", [
    (b"POST /t1/bulk HTTP/1.1", b'{"put": [{"key": "cr", "value": 1}]}\r'),
    # Over the fast lane's 64 KiB: Twisted's path.
    (b"PUT /t1/kv/cr HTTP/1.1", b'{"value": "%s"}\r' % (b"x" * 70000,))])
def test_a_request_after_a_body_that_ends_in_a_cr_is_served(head, body):
    """
    If a request's body ends in a CR (JSON whitespace) and the next request on the connection arrives in a read
    of its own, then that request is served: the body's CR is no bare CR of its head.
    """
    node = node_for("defaults")
    first = b"%s\r\nHost: h\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
    raw, _ = node.send_pieces(first, b"GET /t1/health HTTP/1.1\r\nHost: h\r\n\r\n")
    assert raw.count(b"HTTP/1.") == 2 and b" 400 " not in raw, raw[:600]


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_a_body_that_is_not_json_gets_415_whatever_brackets_it_holds(version):
    """
    If a PUT's body is sent as text/plain and nests brackets deeper than a value may, then it gets 415
    (the media type is checked first), not the 400 for a value nested too deeply; on the fast lane (HTTP/1.1)
    and on Twisted's path (HTTP/1.0) alike, and nothing is stored.
    """
    node = node_for("defaults")
    before = node.snapshot()
    body = b"[" * 502 + b"]" * 502
    response = parse_response(node.send(b"PUT /t1/kv/deep-text %s\r\nHost: h\r\nContent-Type: text/plain\r\n"
                                        b"Content-Length: %d\r\n\r\n%s" % (version, len(body), body)))
    assert response.status == 415, response.raw[:300]
    assert json.loads(response.body)["error"] == "unsupported_media_type"
    assert node.snapshot() == before


def test_the_documented_lenient_parts_hold():
    """
    If a body names a member twice, a route gets a query parameter it does not list, or a key has a % that
    starts no escape, then the request is served as the API description says: the last value, the parameter
    ignored, the % taken as itself.
    """
    node = node_for("defaults")
    body = b'{"value": 1, "value": 2}'
    assert parse_response(node.send(b"PUT /t1/kv/lenient%%zz HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s"
                                    % (len(body), body))).status in (200, 201)
    read = parse_response(node.send(b"GET /t1/kv/lenient%25zz?unlisted=1 HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert read.status == 200, read.raw[:300]
    assert json.loads(read.body)["key"] == "lenient%zz"
    assert json.loads(read.body)["value"] == 2


def test_an_http_1_0_request_needs_no_host_header():
    """
    If an HTTP/1.0 request has no Host header (it had none), then it is served; with two, it is refused.
    """
    node = node_for("defaults")
    assert parse_response(node.send(b"GET /t1/health HTTP/1.0\r\n\r\n")).status == 200
    assert parse_response(node.send(b"GET /t1/health HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n")).status == 400


@pytest.mark.parametrize("method, target", [(b"GET", b"/t1/health//"), (b"GET", b"/t1/admin//log-levels"),
                                            (b"POST", b"/t1/bulk//")])
def test_doubled_slash_in_a_route_is_a_json_4xx_not_a_redirect(method, target):
    node = node_for("defaults")
    response = check_exchange(node, Request(method, target, (), b"{}" if method == b"POST" else None, None),
                              node.snapshot())
    assert 400 <= response.status < 500, response


FRAMING = {
    "bad-header-line": b"GET /t1/health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    "bad-content-length": b"PUT /t1/kv/c HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "two-content-lengths": b"PUT /t1/kv/c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n12",
    "bad-chunk": b"PUT /t1/kv/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "bad-version": b"GET /t1/health HTTP/2.0\r\nHost: x\r\n\r\n",
    "too-many-headers": b"GET /t1/health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: 1\r\n" % (i,) for i in range(600)) + b"\r\n",
    "raw-non-ascii-path": b"GET /t1/kv/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "star-target": b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    "multipart-post-not-multipart": b"POST /t1/bulk HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                    b"boundary=b\r\nContent-Length: 10\r\n\r\n{\"get\":[]}",
}


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_malformed_http_is_refused_without_a_crash(name, eliot_tracebacks):
    """
    If the bytes are not a well-formed HTTP request, then the node refuses them with a 4xx (Twisted's, at the
    framing level) or closes the connection: never a 5xx, never a traceback.
    """
    node = node_for("defaults")
    before = node.snapshot()
    response = parse_response(node.send(FRAMING[name]))
    assert response is None or 400 <= response.status < 500, response
    assert node.snapshot() == before
    assert not eliot_tracebacks, eliot_tracebacks[:1]


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_malformed_http_is_refused_with_a_json_error(name):
    node = node_for("defaults")
    response = parse_response(node.send(FRAMING[name]))
    assert response is not None and 400 <= response.status < 500
    assert response.header(b"content-type") == b"application/json"
    assert set(json.loads(response.body)) == {"error", "message"}


# -- the internal routes ----------------------------------------------------------------------------

CLUSTER_SECRET = "fuzz-cluster-secret-0123456789"
#: Who may call: peers holding the secret; anyone (--insecure-cluster); no one (neither).
INTERNAL_CONFIGS = {
    "cluster-secret": dict(cluster_secret=CLUSTER_SECRET),
    "insecure-cluster": dict(insecure_cluster="true"),
    "no-secret": {},
}
INTERNAL_ROUTES = ["apply", "get", "keys", "sync/buckets", "sync/versions", "sync/request", "copies"]
INTERNAL_SPELLINGS = ["/t1/_internal/%s", "/t1/%%5Finternal/%s", "/t1/_internal/%s?x=/bulk", "/t1/_internal//%s",
                      "/t1/_internal/%s/", "/t1/_internal/%s/x", "/%%74%%31/_internal/%s"]


class InternalNode(Node):
    """
    A node whose internal routes the fuzzer calls: its clock moves on after each request, so that an
    answer that waits for a timer (a rebalancing pass) arrives.
    """

    def send(self, raw: bytes) -> bytes:
        site = self.api.site
        address = IPv4Address("TCP", "127.0.0.1", 40001)
        protocol = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        try:
            protocol.dataReceived(raw)
            for _ in range(40):
                if transport.value():
                    break
                self.api.clock.advance(0.05)
                self.api.stub.flush()
            return transport.value()
        finally:
            protocol.connectionLost(Failure(ConnectionDone()))


_INTERNAL_NODES: Dict[str, InternalNode] = {}


def internal_node_for(name: str) -> InternalNode:
    if name not in _INTERNAL_NODES:
        node = _INTERNAL_NODES[name] = InternalNode(**INTERNAL_CONFIGS[name])
        node.seed()
    return _INTERNAL_NODES[name]


node_ids = st.one_of(st.sampled_from(["n2", "node-1", "a.b_c-9", "", "bad id", "x" * 63, "x" * 64, "é", "n/2"]),
                     st.text(max_size=8))
wire_keys = st.one_of(st.text(max_size=12), st.sampled_from(["a", "a/b", "", "\ud800", "k" * 1024, "k" * 1025]))
wire_versions = st.one_of(
    st.tuples(st.one_of(st.integers(0, 2 ** 41), st.integers(-2, 2 ** 64)), st.integers(-2, 2 ** 33),
              node_ids).map(list),
    json_values)
stored_values = st.one_of(st.none(), st.sampled_from(['1', '"x"', '{"a":[1,2]}', "not json", "", "[", "NaN"]),
                          json_values.map(json.dumps), json_values)
expiries = st.one_of(st.none(), st.floats(), st.integers(-10, 10 ** 30), st.just(10 ** 400), st.text(max_size=4),
                     st.booleans())
wire_entries = st.fixed_dictionaries({"k": wire_keys, "v": stored_values, "ver": wire_versions},
                                     optional={"exp": expiries, "extra": json_scalars})
digests = st.one_of(st.sampled_from(["0123456789abcdef", "0000000000000000", "0123456789ABCDEF", "xyz"]),
                    st.integers(0, 2 ** 64).map(lambda n: "%016x" % (n,)), json_scalars)
bucket_ids = st.one_of(st.integers(-2, 300).map(str), st.sampled_from(["a", "٣", "00", "0x1", " 1", ""]),
                       st.text(max_size=4))


def _maybe(strategy):
    """Mostly the right shape, sometimes any JSON at all."""
    return st.one_of(strategy, strategy, strategy, json_values)


INTERNAL_SHAPES = {
    "apply": st.fixed_dictionaries({}, optional={"entries": _maybe(st.lists(wire_entries, max_size=4)),
                                                 "task_ids": json_values}),
    "get": st.one_of(st.fixed_dictionaries({}, optional={"key": _maybe(wire_keys)}),
                     st.fixed_dictionaries({}, optional={"keys": _maybe(st.lists(wire_keys, max_size=5))})),
    "keys": st.fixed_dictionaries({}, optional={
        "prefix": _maybe(wire_keys), "after": _maybe(st.one_of(st.none(), wire_keys)),
        "limit": _maybe(st.one_of(st.integers(-2, 20000), st.just(10001), st.just(10002)))}),
    "sync/buckets": st.fixed_dictionaries({}, optional={
        "from": _maybe(node_ids), "buckets": _maybe(st.dictionaries(bucket_ids, digests, max_size=6))}),
    "sync/versions": st.fixed_dictionaries({}, optional={
        "versions": _maybe(st.dictionaries(wire_keys, wire_versions, max_size=5))}),
    "sync/request": st.fixed_dictionaries({}, optional={"from": _maybe(node_ids)}),
    "copies": st.just(None),
}


good_keys = st.text(min_size=1, max_size=12)
good_versions = st.tuples(st.integers(0, 2 ** 41), st.integers(0, 100),
                          st.sampled_from(["n2", "n3", "node-1"])).map(list)
good_entries = st.fixed_dictionaries({"k": good_keys, "v": st.one_of(st.none(), json_values.map(json.dumps)),
                                      "ver": good_versions},
                                     optional={"exp": st.one_of(st.none(), st.floats(1e9, 3e9))})
#: Bodies that fit each route's schema: the fuzzer must also get past the checks, to the handlers.
INTERNAL_VALID = {
    "apply": st.fixed_dictionaries({"entries": st.lists(good_entries, max_size=4)}),
    "get": st.one_of(st.fixed_dictionaries({"key": good_keys}),
                     st.fixed_dictionaries({"keys": st.lists(good_keys, max_size=5)})),
    "keys": st.fixed_dictionaries({}, optional={"prefix": st.text(max_size=3), "after": st.none() | good_keys,
                                                "limit": st.integers(1, 10001)}),
    "sync/buckets": st.fixed_dictionaries({"from": st.sampled_from(["n2", "n3"]), "buckets": st.dictionaries(
        st.integers(0, 255).map(str), st.integers(0, 2 ** 64 - 1).map(lambda n: "%016x" % (n,)), max_size=6)}),
    "sync/versions": st.fixed_dictionaries({"versions": st.dictionaries(good_keys, good_versions, max_size=5)}),
    "sync/request": st.fixed_dictionaries({"from": st.sampled_from(["n2", "n3"])}),
    "copies": st.just(None),
}


@st.composite
def batch_entries(draw) -> bytes:
    """A binary batch of entries with any key, node id, version and expiry the format can carry."""
    entries = []
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(["a", "k" * 1024, "k" * 1025])))
        node = draw(st.one_of(node_ids.filter(lambda text: len(text.encode("utf-8")) < 256), st.just("n2")))
        expires = draw(st.one_of(st.none(), st.floats(allow_nan=False), st.just(float("inf"))))
        value = draw(st.one_of(st.none(), st.sampled_from([b"1", b'"x"', b"not json"])))
        entries.append(Entry(key, value, (draw(st.integers(0, 2 ** 63 - 1)), draw(st.integers(0, 2 ** 32 - 1)),
                                          node), expires))
    data = encode_batch(entries, 0.0)
    if draw(st.integers(0, 3)) == 0 and data:
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=8))
    return data


@st.composite
def internal_requests(draw) -> Tuple[Request, bool]:
    """A request to an internal route, and whether it is to be signed."""
    route = draw(st.sampled_from(INTERNAL_ROUTES * 3 + ["nope", "sync"]))
    spelling = draw(st.one_of(st.just(INTERNAL_SPELLINGS[0]), st.sampled_from(INTERNAL_SPELLINGS)))
    target = (spelling % (route,)).encode("ascii")
    method = b"GET" if route == "copies" else b"POST"
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from([b"GET", b"PUT", b"POST", b"DELETE", b"HEAD"]))
    headers = []
    kind = draw(st.integers(0, 6))
    body: Optional[bytes]
    if route == "copies" and kind < 4:
        body = None
        headers += [(b"Upgrade", draw(st.sampled_from([b"kvresponder-copies/2", b"h2c", b""]))),
                    (b"Connection", b"Upgrade")]
    elif kind <= 2:
        shapes = INTERNAL_VALID if kind == 1 else INTERNAL_SHAPES
        body = json.dumps(draw(shapes.get(route, st.just({})))).encode("utf-8")
    elif kind == 3:
        body = draw(batch_entries())
        headers.append((b"Content-Type", BATCH_TYPE))
    elif kind == 4:
        body = json.dumps(draw(json_values)).encode("utf-8")
    elif kind == 5:
        body = draw(special_bodies())
    else:
        body = draw(st.one_of(st.binary(max_size=200), st.just(b"")))
    if body is not None and not any(name == b"Content-Type" for name, _ in headers) and draw(st.booleans()):
        headers.append((b"Content-Type", draw(st.sampled_from([b"application/json", b"text/plain"]))))
    chunks = None
    if body and draw(st.integers(0, 4)) == 0:
        chunks = tuple(draw(st.lists(st.integers(1, 300), min_size=1, max_size=4)))
    signed = draw(st.integers(0, 3)) > 0
    return Request(method, target, tuple(headers), body, chunks), signed


def _sign(node: InternalNode, request: Request) -> Request:
    """``request`` with the X-KV-Auth header a peer computes: over its method, raw path and body."""
    path = request.target.split(b"?", 1)[0]
    signature = node.api.node.authenticator.sign(request.method, path, request.body or b"")
    return request._replace(headers=request.headers + ((b"X-KV-Auth", signature),))


def _fuzz_internal(config: str, drawn: Tuple[Request, bool], tracebacks: List[dict]) -> None:
    """
    If any request reaches an internal route, then the usual rules hold (see check_exchange: no 5xx, JSON
    errors, no traceback, a refusal changes nothing), and only whom the configuration lets in is let in: no
    one without a secret (403 cluster_disabled), signed peers with one (401 otherwise), anyone with
    --insecure-cluster.
    """
    node = internal_node_for(config)
    request, signed = drawn
    if signed and node.api.node.authenticator is not None:
        request = _sign(node, request)
    del tracebacks[:]
    note(repr(request))
    # An in-memory connection cannot be handed to a copy stream: an upgrade that would open one answers 501,
    # as it does over TLS (tests/test_copystream.py opens real ones over TCP).
    upgrade = [unquote_to_bytes(part) for part in request.target.split(b"?")[0][1:].split(b"/")] == [
        b"t1", b"_internal", b"copies"]
    response = check_exchange(node, request, node.snapshot(), also_allowed=(501,) if upgrade else ())
    assert not tracebacks, tracebacks[:1]
    if response.status in (404, 405, 413):
        # No such route or method; or a body over the limit, refused before any route runs.
        return
    error = json.loads(response.body).get("error") if response.status >= 400 else None
    if config == "no-secret":
        assert (response.status, error) == (403, "cluster_disabled"), response.raw[:300]
    elif config == "cluster-secret" and not signed:
        assert (response.status, error) == (401, "unauthorized"), response.raw[:300]
    else:
        assert error not in ("cluster_disabled", "unauthorized"), response.raw[:300]


@FUZZ_SETTINGS
@given(drawn=internal_requests())
@example(drawn=(Request(b"POST", b"/t1/_internal/sync/buckets", (),
                        b'{"from":"x","buckets":{"a":1}}', None), True))
@example(drawn=(Request(b"POST", b"/t1/_internal/apply", (),
                        b'{"entries":[{"k":"a","v":"1","ver":[1,0,"n2"],"exp":1' + b"0" * 400 + b"}]}", None), True))
def test_fuzz_internal_routes_with_a_cluster_secret(drawn, eliot_tracebacks):
    _fuzz_internal("cluster-secret", drawn, eliot_tracebacks)


@FUZZ_SETTINGS
@given(drawn=internal_requests())
@example(drawn=(Request(b"POST", b"/t1/_internal/sync/buckets", (),
                        b'{"from":"x","buckets":{"a":1}}', None), False))
def test_fuzz_internal_routes_with_insecure_cluster(drawn, eliot_tracebacks):
    _fuzz_internal("insecure-cluster", drawn, eliot_tracebacks)


@hsettings(FUZZ_SETTINGS, max_examples=max(50, FUZZ_EXAMPLES // 5))
@given(drawn=internal_requests())
def test_fuzz_internal_routes_without_a_secret(drawn, eliot_tracebacks):
    _fuzz_internal("no-secret", drawn, eliot_tracebacks)
