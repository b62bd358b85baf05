"""
The internal routes (``/<tenant>/_internal/*``): who may call them, and what bodies they take.

In memory, through the real site and resource tree (tests/test_api.py's :class:`API`).
"""

import json

import pytest
from eliot import MemoryLogger
from eliot.testing import swap_logger

from kvresponder.http.schemas import SCHEMAS
from kvresponder.rebalance import BUCKETS
from kvresponder.store import Entry
from kvresponder.wire import BATCH_TYPE, encode_batch

from .test_api import API

SECRET = "internal-routes-secret-0123456789"
ENTRY = {"k": "a", "v": "1", "ver": [1_700_000_000_000, 0, "n2"], "exp": None}

#: A well-formed body for each internal route.
GOOD = {
    "/apply": {"entries": [ENTRY]},
    "/get": {"key": "a"},
    "/keys": {"prefix": "", "after": None, "limit": 10},
    "/sync/buckets": {"from": "n2", "buckets": {"0": "0123456789abcdef"}},
    "/sync/versions": {"versions": {"a": [1, 0, "n2"]}},
    "/sync/request": {"from": "n2"},
}


def send(api, route: str, body=None, signed: bool = True, raw: bytes = None, content_type=b"application/json",
         method: str = "POST", headers=None):
    """``route`` below /t1/_internal, with ``body`` as JSON (or ``raw`` bytes), signed with the node's key."""
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode("utf-8"))
    path = "/t1/_internal" + route
    headers = dict(headers or {})
    if content_type is not None:
        headers["Content-Type"] = content_type
    if signed and api.node.authenticator is not None:
        headers["X-KV-Auth"] = api.node.authenticator.sign(method.encode(), path.encode(), data)
    response, content = api.raw(method, path, data or None, headers)
    return response.code, response.headers.getRawHeaders(b"content-type"), content


def error_of(code, content_type, content):
    assert content_type == [b"application/json"], (code, content)
    body = json.loads(content)
    assert set(body) == {"error", "message"} and body["message"], body
    return code, body["error"]


@pytest.fixture
def logged():
    """Every message logged during the test (tracebacks included)."""
    logger = MemoryLogger()
    previous = swap_logger(logger)
    yield logger.messages
    swap_logger(previous)


def tracebacks(messages):
    return [message for message in messages if message.get("message_type") == "eliot:traceback"]


def test_every_route_has_a_schema():
    """
    If a route is served under /_internal/, then a schema declares its body (the copy stream takes none).
    """
    from kvresponder.http.internal import InternalAPI
    routes = {rule.rule for rule in InternalAPI.app.url_map.iter_rules()}
    assert routes == set(SCHEMAS) == set(GOOD)


# -- who may call ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", sorted(GOOD) + ["/copies", "/nope"])
def test_without_a_secret_every_internal_route_answers_403_naming_the_settings(route, logged):
    """
    If the node has no CLUSTER_SECRET and no --insecure-cluster, then every internal route (the copy-stream
    upgrade too) answers 403 cluster_disabled, naming both settings, and changes nothing.
    """
    api = API()
    if route == "/copies":
        code, content_type, content = send(api, route, method="GET", content_type=None,
                                           headers={"Upgrade": "kvresponder-copies/2", "Connection": "Upgrade"})
    else:
        code, content_type, content = send(api, route, GOOD.get(route, {}))
    if route == "/nope":
        assert code == 404
        return
    assert error_of(code, content_type, content) == (403, "cluster_disabled")
    message = json.loads(content)["message"]
    assert "CLUSTER_SECRET" in message and "--insecure-cluster" in message
    assert api.node.store.current("a") is None
    assert not tracebacks(logged)


def test_with_insecure_cluster_an_unsigned_call_is_served():
    api = API(insecure_cluster="true")
    code, _, content = send(api, "/apply", GOOD["/apply"], signed=False)
    assert code == 200, content
    assert api.node.store.current("a").value == b"1"


@pytest.mark.parametrize("route", sorted(GOOD))
def test_with_a_secret_an_unsigned_call_gets_401_and_a_signed_one_is_served(route):
    api = API(cluster_secret=SECRET)
    assert error_of(*send(api, route, GOOD[route], signed=False)) == (401, "unauthorized")
    code, content_type, content = send(api, route, GOOD[route])
    assert code == 200, content
    assert content_type == [b"application/json"]
    json.loads(content)


def test_a_secret_wins_over_insecure_cluster():
    api = API(cluster_secret=SECRET, insecure_cluster="true")
    assert error_of(*send(api, "/get", GOOD["/get"], signed=False)) == (401, "unauthorized")


# -- what they take -------------------------------------------------------------------------------------

BAD = [
    # the issue's own case: a bucket id that is not a number answered 500
    ("/sync/buckets", {"from": "x", "buckets": {"a": 1}}),
    ("/sync/buckets", {"from": "x", "buckets": {"0": 1}}),
    ("/sync/buckets", {"from": "x", "buckets": {str(BUCKETS): "0123456789abcdef"}}),
    ("/sync/buckets", {"from": "x", "buckets": {"-1": "0123456789abcdef"}}),
    ("/sync/buckets", {"from": "x", "buckets": {"٣": "0123456789abcdef"}}),
    ("/sync/buckets", {"from": "x", "buckets": {"0": "0123456789ABCDEG"}}),
    ("/sync/buckets", {"from": "x", "buckets": []}),
    ("/sync/buckets", {"from": 7, "buckets": {}}),
    ("/sync/buckets", {"from": "no spaces", "buckets": {}}),
    ("/sync/buckets", {"buckets": {}}),
    ("/sync/versions", {"versions": {"a": [1, 0]}}),
    ("/sync/versions", {"versions": {"a": [1.5, 0, "n"]}}),
    ("/sync/versions", {"versions": {"a": [True, 0, "n"]}}),
    ("/sync/versions", {"versions": {"a": [-1, 0, "n"]}}),
    ("/sync/versions", {"versions": {"a": [2 ** 63, 0, "n"]}}),
    ("/sync/versions", {"versions": {"a": [1, 2 ** 32, "n"]}}),
    ("/sync/versions", {"versions": {"a": [1, 0, "bad node"]}}),
    ("/sync/versions", {"versions": {"": [1, 0, "n"]}}),
    ("/sync/versions", {"versions": {"k" * 1025: [1, 0, "n"]}}),
    ("/sync/versions", {"versions": {"\ud800": [1, 0, "n"]}}),
    ("/sync/versions", {"versions": [["a", [1, 0, "n"]]]}),
    ("/sync/request", {"from": None}),
    ("/sync/request", {"from": "x" * 64}),
    ("/sync/request", {}),
    ("/get", {"key": 1}),
    ("/get", {"key": ""}),
    ("/get", {"key": "\udc00"}),
    ("/get", {"keys": "a"}),
    ("/get", {"keys": ["a", None]}),
    ("/get", {"keys": ["a"] * 50001}),
    ("/get", {}),
    ("/keys", {"limit": 0}),
    ("/keys", {"limit": 10002}),
    ("/keys", {"limit": True}),
    ("/keys", {"limit": 1.0}),
    ("/keys", {"prefix": None}),
    ("/keys", {"prefix": "\ud800"}),
    ("/keys", {"after": 3}),
    ("/apply", {"entries": {}}),
    ("/apply", {"entries": [dict(ENTRY, k="")]}),
    ("/apply", {"entries": [dict(ENTRY, k="\ud800")]}),
    ("/apply", {"entries": [dict(ENTRY, v=1)]}),
    ("/apply", {"entries": [dict(ENTRY, v="not json")]}),
    ("/apply", {"entries": [dict(ENTRY, exp=True)]}),
    ("/apply", {"entries": [dict(ENTRY, exp="soon")]}),
    ("/apply", {"entries": [dict(ENTRY, exp=10 ** 400)]}),
    ("/apply", {"entries": [dict(ENTRY, ver=[1, 0, ""])]}),
    ("/apply", {"entries": [dict(ENTRY, ver=None)]}),
    ("/apply", {"entries": [ENTRY, 5]}),
    ("/apply", [ENTRY]),
    ("/apply", "entries"),
    ("/apply", None),
]


@pytest.mark.parametrize("route, body", BAD, ids=[str(i) for i in range(len(BAD))])
@pytest.mark.parametrize("secret", [SECRET, None])
def test_a_body_that_does_not_fit_its_schema_gets_a_json_400(route, body, secret, logged):
    """
    If a peer (signed, or anyone under --insecure-cluster) sends a body that does not fit the route's
    schema, then it gets a JSON 400, nothing is stored, and no traceback is logged.
    """
    api = API(cluster_secret=secret) if secret else API(insecure_cluster="true")
    before = sorted((entry.key, entry.version) for entry in api.node.store.entries())
    code, error = error_of(*send(api, route, body))
    assert code == 400 and error in ("invalid_body", "invalid_json"), (code, error)
    assert sorted((entry.key, entry.version) for entry in api.node.store.entries()) == before
    assert not tracebacks(logged)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff", b"[" * 100000, b"NaN", b'{"a":1', b"1" * 5000, b'"\\ud800"'])
@pytest.mark.parametrize("route", sorted(GOOD))
def test_a_body_that_is_not_json_gets_a_json_400(route, raw, logged):
    api = API(insecure_cluster="true")
    assert error_of(*send(api, route, raw=raw))[0] == 400
    assert not tracebacks(logged)


def _entry(node="n2", expires_at=None, key="a"):
    return Entry(key, b"1", (1_700_000_000_000, 0, node), expires_at)


@pytest.mark.parametrize("raw", [
    b"\x00\x05", encode_batch([_entry()], 0.0)[:-1], encode_batch([_entry(node="bad node")], 0.0),
    encode_batch([_entry(expires_at=float("inf"))], 0.0), encode_batch([_entry(node="")], 0.0),
    encode_batch([_entry(), _entry(node="x" * 64)], 0.0),
])
def test_a_binary_batch_that_does_not_fit_gets_a_json_400(raw, logged):
    api = API(cluster_secret=SECRET)
    assert error_of(*send(api, "/apply", raw=raw, content_type=BATCH_TYPE)) == (400, "invalid_body")
    assert api.node.store.current("a") is None
    assert not tracebacks(logged)


def test_a_binary_batch_is_applied():
    api = API(cluster_secret=SECRET)
    code, _, content = send(api, "/apply", raw=encode_batch([_entry()], 0.0), content_type=BATCH_TYPE)
    assert code == 200 and json.loads(content) == {"results": [[True, False]]}
    assert api.node.store.current("a").value == b"1"


def test_a_binary_batch_sent_to_another_route_gets_415():
    api = API(cluster_secret=SECRET)
    code, error = error_of(*send(api, "/get", raw=encode_batch([_entry()], 0.0), content_type=BATCH_TYPE))
    assert (code, error) == (415, "unsupported_media_type")


def test_the_copy_stream_upgrade_takes_no_body():
    api = API(cluster_secret=SECRET)
    code, error = error_of(*send(api, "/copies", raw=b"{}", method="GET", content_type=None,
                                 headers={"Upgrade": "kvresponder-copies/2", "Connection": "Upgrade"}))
    assert (code, error) == (400, "invalid_body")


def test_sync_buckets_compares_well_formed_buckets():
    """
    If the digest is well formed, then the answer lists the buckets that differ, as numbers.
    """
    api = API(cluster_secret=SECRET)
    code, _, content = send(api, "/sync/buckets", {"from": "n2", "buckets": {"3": "0123456789abcdef",
                                                                              "255": "0000000000000000"}})
    assert code == 200
    assert json.loads(content) == {"differ": [3, 255]}


def test_sync_buckets_tells_the_digest_whether_the_sender_asks_for_its_periodic_pass():
    """
    If a peer's anti-entropy pass asks for this node's digest (``"background": true``), then the digest's walk
    is asked to go in the background; a request without the member (a re-replication, or an older peer) is not;
    and a member that is not a boolean is a 400 that asks for nothing.
    """
    api = API(cluster_secret=SECRET)
    asked = []

    async def digest(sender, background=False):
        asked.append((sender, background))
        return {}
    api.node.rebalancer.shared_digest = digest
    assert send(api, "/sync/buckets", GOOD["/sync/buckets"])[0] == 200
    assert send(api, "/sync/buckets", dict(GOOD["/sync/buckets"], background=True))[0] == 200
    assert error_of(*send(api, "/sync/buckets", dict(GOOD["/sync/buckets"], background="yes"))) == (
        400, "invalid_body")
    assert asked == [("n2", False), ("n2", True)]


@pytest.mark.parametrize("error", [ValueError("bad"), TypeError("bad"), KeyError("bad")])
def test_a_failure_inside_a_coroutine_goes_through_the_same_mapping(error, logged):
    """
    If a route's coroutine fails later with what a malformed request raises, then the answer is the same JSON
    400 a failure at once gets, not a 500.
    """
    api = API(cluster_secret=SECRET)

    async def failing(sender, background=False):
        raise error
    api.node.rebalancer.shared_digest = failing
    assert error_of(*send(api, "/sync/buckets", GOOD["/sync/buckets"])) == (400, "invalid_body")
    assert not tracebacks(logged)


def test_a_bug_inside_a_coroutine_is_a_json_500_without_a_traceback_to_the_client(logged):
    """
    If a route's coroutine fails with an unexpected error (a bug), then the client gets a JSON 500 with no
    traceback, and the log gets the traceback.
    """
    api = API(cluster_secret=SECRET)

    async def failing(sender, background=False):
        raise RuntimeError("secret internals")
    api.node.rebalancer.shared_digest = failing
    code, content_type, content = send(api, "/sync/buckets", GOOD["/sync/buckets"])
    assert error_of(code, content_type, content) == (500, "internal_error")
    assert b"secret internals" not in content
    assert len(tracebacks(logged)) == 1
    del logged[:]


# -- a node that is leaving ------------------------------------------------------------------------------


@pytest.mark.parametrize("stopped", [False, True], ids=["draining", "stopped"])
def test_a_node_that_has_begun_leaving_answers_copies_503_leaving_and_stores_none(stopped, logged):
    """
    If a node has begun leaving (draining; or stopped, its drain over, its process about to exit), then
    ``/apply`` answers 503 ``leaving`` to a write's copy, a hand-off or a repair, as a JSON body or as a binary
    batch, and stores none of them: the sender fails them over to the next node. Its reads still answer.
    """
    api = API(cluster_secret=SECRET)
    api.node.store.apply(_entry(key="held"))
    api.node.begin_leaving()
    if stopped:
        api.node.stop()
    assert error_of(*send(api, "/apply", GOOD["/apply"])) == (503, "leaving")
    batch = encode_batch([_entry(), _entry(key="b")], 0.0)
    assert error_of(*send(api, "/apply", raw=batch, content_type=BATCH_TYPE)) == (503, "leaving")
    assert api.node.store.current("a") is None and api.node.store.current("b") is None
    code, _, content = send(api, "/get", {"key": "held"})
    assert code == 200 and json.loads(content)["entry"]["v"] == "1"
    assert not tracebacks(logged)


def test_a_node_that_has_begun_leaving_tells_anti_entropy_it_lacks_nothing():
    """
    If a node has begun leaving, then a co-owner's anti-entropy hears that no bucket differs and no version is
    wanted, whatever the node holds: it would refuse the copies, and its store is on its way out (no walk over
    it is made for the peer).
    """
    api = API(cluster_secret=SECRET)
    walked = []

    async def digest(sender, background=False):
        walked.append(sender)
        return {}
    api.node.rebalancer.shared_digest = digest
    api.node.begin_leaving()
    code, _, content = send(api, "/sync/buckets", GOOD["/sync/buckets"])
    assert code == 200 and json.loads(content) == {"differ": []}
    code, _, content = send(api, "/sync/versions", GOOD["/sync/versions"])
    assert code == 200 and json.loads(content) == {"want": [], "lacking": []}
    assert walked == []


def test_work_cancelled_because_its_client_hung_up_is_no_error_to_log():
    """
    If a route's work is cancelled because its client hung up (Klein cancels the Deferred: a peer that gave up on a
    long ``/sync/buckets``), then nothing is logged as a traceback and nothing is written.
    """
    from eliot import MemoryLogger
    from eliot.testing import swap_logger
    from twisted.internet.defer import CancelledError
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web.http import Request
    from twisted.web.test.requesthelper import DummyChannel

    from kvresponder.http.api import failure_body

    logger = MemoryLogger()
    previous = swap_logger(logger)
    try:
        gone = Request(DummyChannel())
        gone.connectionLost(Failure(ConnectionDone()))
        assert failure_body(gone, Failure(CancelledError())) is None
        assert [m for m in logger.messages if m.get("message_type") == "eliot:traceback"] == []
    finally:
        swap_logger(previous)


def test_a_binary_batch_holds_at_most_as_many_entries_as_a_json_one():
    """
    If a binary batch (``/apply``'s binary form, or a copy stream's frame) holds more than MAX_SYNC_KEYS entries,
    then it is refused, as the JSON form is: a frame of small tombstones could hold hundreds of thousands, all
    applied in one reactor turn. One at the limit passes.
    """
    import pytest

    from kvresponder.http.schemas import MAX_SYNC_KEYS, SchemaError, check_entries
    from kvresponder.store import Entry

    tombstone = Entry("k", None, (1, 0, "n1"))
    assert len(check_entries([tombstone] * MAX_SYNC_KEYS)) == MAX_SYNC_KEYS
    with pytest.raises(SchemaError, match="at most %d entries" % (MAX_SYNC_KEYS,)):
        check_entries([tombstone] * (MAX_SYNC_KEYS + 1))


def _copy_with_five_seconds_left(measured: float, signer: float):
    """
    A node whose two peers' heartbeats measure their clocks ``measured`` seconds from its own, sent a copy with
    5 s left, signed just now by a peer whose clock reads ``signer`` seconds from its own: the node's API and what
    it stored.
    """
    from kvresponder.discovery import derive_key
    from kvresponder.peertransport import PeerAuthenticator

    api = API(tenant="t1", cluster_secret=SECRET)
    node = api.node
    node.clock_offsets.heard("n2", 1, measured)
    node.clock_offsets.heard("n3", 1, measured)
    assert node.clock_offsets.skew == pytest.approx(-measured)
    peer = PeerAuthenticator(derive_key(SECRET, "peer"), lambda: api.clock.seconds() + signer)
    version = [int((api.clock.seconds() + signer) * 1000), 0, "n2"]
    data = json.dumps({"entries": [{"k": "session", "v": "1", "ver": version, "ttl": 5.0}]}).encode()
    path = b"/t1/_internal/apply"
    response, _ = api.raw("POST", path.decode(), data, {"Content-Type": "application/json",
                                                        "X-KV-Auth": peer.sign(b"POST", path, data)})
    assert response.code == 200
    return api, node.store.current("session")


def test_a_node_whose_clock_is_ahead_of_its_peers_keeps_a_copys_ttl_whole():
    """
    If a node's clock is 10 s ahead of its peers' (as its peers' heartbeats measure it) and a peer sends it a copy
    with 5 s left, signed just now by the peer's clock, then it stores the copy live with its 5 s: how late a call
    came is judged with the node's lead taken off (else the copy came "10 s late", its TTL was cut to nothing,
    and it was stored as a tombstone of the write, which then won every read of it through the cluster).
    """
    api, stored = _copy_with_five_seconds_left(measured=-10.0, signer=-10.0)
    assert stored is not None and stored.value == b"1", stored
    assert stored.expires_at == pytest.approx(api.clock.seconds() + 5.0, abs=0.5)


def test_a_node_behind_its_peers_takes_no_lateness_from_its_skew():
    """
    If a node's peers measure it 10 s behind (an estimate that trails the clock's setting right by a few
    heartbeats) and a peer whose clock agrees with the node's own sends it a copy with 5 s left, then the copy
    keeps its 5 s: only a lead is taken off the node's clock when it judges how late a call came.
    """
    api, stored = _copy_with_five_seconds_left(measured=10.0, signer=0.0)
    assert stored is not None and stored.value == b"1", stored
    assert stored.expires_at == pytest.approx(api.clock.seconds() + 5.0, abs=0.5)
