"""
PeerClient's batching of replicated writes, on a Clock and a fake ``post`` given to the transport (the calls are
answered by hand, so what is in flight and when is under the test's control).
"""

import json
from collections import namedtuple

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from kvresponder.http.root import build_root
from kvresponder.http.site import KVSite
from kvresponder.node import Node
from kvresponder.peers import MAX_BATCH_BYTES, MAX_BATCHES_IN_FLIGHT, PeerClient, PeerError
from kvresponder.store import Entry
from kvresponder.wire import decode_batch, entry_to_wire

from .support import make_settings, stub_over

Peer = namedtuple("Peer", "node_id address port")
PEER = Peer("n2", "127.0.0.1", 4000)


class _Calls:
    def __init__(self):
        self.pending = []

    def post(self, url, headers, body, timeout, peer_id=""):
        d = Deferred()
        if url.endswith("/_internal/get"):
            self.pending.append((json.loads(body)["keys"], d))
        else:
            self.pending.append((decode_batch(body, 0.0), d))
        return d

    def answer_reads(self, index, held):
        keys, d = self.pending.pop(index)
        d.callback((200, json.dumps({"entries": [
            None if key not in held else entry_to_wire(Entry(key, b"1", (5, 0, "n2")), 0.0)
            for key in keys]}).encode()))
        return keys

    def answer(self, index=0, code=200):
        entries, d = self.pending.pop(index)
        d.callback((code, json.dumps({"results": [[True, False]] * len(entries)}).encode()))
        return entries


def _client(post=None):
    clock = Clock()
    calls = _Calls()
    client = PeerClient(http=None, clock=clock, tenant="t1", timeout=5.0, post=post or calls.post)
    return client, clock, calls


def _entry(i):
    return Entry("k%d" % (i,), b"%d" % (i,), (1000 + i, 0, "n1"))


def test_writes_queued_in_one_turn_leave_as_one_request():
    client, clock, calls = _client()
    waiters = [client.apply_coalesced(PEER, _entry(i)) for i in range(5)]
    assert calls.pending == []
    clock.advance(0)
    assert [len(entries) for entries, _ in calls.pending] == [5]
    calls.answer()
    results = [w.result for w in waiters]
    assert all(result.applied for result in results)


def test_writes_queued_while_batches_are_out_leave_together_when_one_returns():
    """
    If MAX_BATCHES_IN_FLIGHT batches to a peer are out, then later writes wait, however many reactor turns
    pass, and leave as one request as soon as a batch comes back.
    """
    client, clock, calls = _client()
    for batch in range(MAX_BATCHES_IN_FLIGHT):
        client.apply_coalesced(PEER, _entry(batch))
        clock.advance(0)
    assert len(calls.pending) == MAX_BATCHES_IN_FLIGHT
    waiting = []
    for i in range(10, 17):
        waiting.append(client.apply_coalesced(PEER, _entry(i)))
        clock.advance(0)
    assert len(calls.pending) == MAX_BATCHES_IN_FLIGHT
    assert not any(w.called for w in waiting)
    calls.answer(0)
    assert len(calls.pending) == MAX_BATCHES_IN_FLIGHT
    entries, _ = calls.pending[-1]
    assert [entry.key for entry in entries] == ["k%d" % (i,) for i in range(10, 17)]
    calls.answer(len(calls.pending) - 1)
    assert all(w.called and w.result.applied for w in waiting)


def test_a_batch_stops_at_its_byte_limit_and_the_writes_after_it_follow_when_it_returns():
    client, clock, calls = _client()
    big = MAX_BATCH_BYTES // 3 - 1024   # three fit in a batch, with their keys and accounted overhead
    waiters = [client.apply_coalesced(PEER, Entry("k%d" % (i,), b"x" * big, (1000 + i, 0, "n1")))
               for i in range(5)]
    clock.advance(0)
    assert [[entry.key for entry in entries] for entries, _ in calls.pending] == [["k0", "k1", "k2"]]
    calls.answer()
    assert [[entry.key for entry in entries] for entries, _ in calls.pending] == [["k3", "k4"]]
    calls.answer()
    assert all(w.result.applied for w in waiters)


def test_a_single_write_larger_than_the_byte_limit_still_goes():
    client, clock, calls = _client()
    w = client.apply_coalesced(PEER, Entry("k", b"x" * (MAX_BATCH_BYTES + 1), (1000, 0, "n1")))
    clock.advance(0)
    assert [len(entries) for entries, _ in calls.pending] == [1]
    calls.answer()
    assert w.result.applied


def test_a_write_larger_than_the_byte_limit_queued_before_a_small_one_goes_alone_and_the_small_one_follows():
    """
    If a write larger than a batch's byte limit is queued first and a small write to the same peer after it, then
    the large one leaves alone in its batch and the small one in the next, once it returns: neither waits forever
    behind a batch that could never be cut.
    """
    client, clock, calls = _client()
    large = client.apply_coalesced(PEER, Entry("large", b"x" * (MAX_BATCH_BYTES + 1), (1000, 0, "n1")))
    small = client.apply_coalesced(PEER, _entry(1))
    clock.advance(0)
    assert [[entry.key for entry in entries] for entries, _ in calls.pending] == [["large"]]
    calls.answer()
    assert [[entry.key for entry in entries] for entries, _ in calls.pending] == [["k1"]]
    calls.answer()
    assert large.result.applied and small.result.applied


def test_an_idle_peer_gets_each_write_without_waiting():
    """
    If nothing is in flight, then a lone write leaves at the end of its own reactor turn.
    """
    client, clock, calls = _client()
    w = client.apply_coalesced(PEER, _entry(1))
    clock.advance(0)
    assert len(calls.pending) == 1
    calls.answer()
    assert w.result.applied
    w2 = client.apply_coalesced(PEER, _entry(2))
    clock.advance(0)
    assert len(calls.pending) == 1
    calls.answer()
    assert w2.result.applied


def test_a_batch_that_cannot_be_sent_fails_its_writes_and_frees_the_peer(monkeypatch):
    """
    If encoding a batch raises, then its writes fail with PeerError (so they fail over) instead of waiting
    forever, and later writes to the same peer still go out.
    """
    import kvresponder.copysender as peers
    client, clock, calls = _client()
    monkeypatch.setattr(peers, "encode_batch", lambda entries, now: 1 / 0)
    broken = client.apply_coalesced(PEER, _entry(1))
    clock.advance(0)
    failures = []
    broken.addErrback(lambda failure: failures.append(failure.check(PeerError)))
    assert failures == [PeerError]
    monkeypatch.undo()
    later = client.apply_coalesced(PEER, _entry(2))
    clock.advance(0)
    assert len(calls.pending) == 1
    calls.answer()
    assert later.result.applied


def test_reads_queued_in_one_turn_leave_as_one_request_and_each_gets_its_own_answer():
    client, clock, calls = _client()
    reads = {key: client.get_coalesced(PEER, key) for key in ("a", "b", "c")}
    assert calls.pending == []
    clock.advance(0)
    assert len(calls.pending) == 1
    assert calls.answer_reads(0, held={"a", "c"}) == ["a", "b", "c"]
    assert reads["a"].result.key == "a" and reads["a"].result.version == (5, 0, "n2")
    assert reads["b"].result is None
    assert reads["c"].result.key == "c"


def test_reads_wait_for_the_read_batches_out_and_not_for_writes():
    """
    If MAX_BATCHES_IN_FLIGHT read batches to a peer are out, then later reads wait for one of them and leave
    together; a write batch to the same peer does not hold them back (reads and writes are batched apart).
    """
    client, clock, calls = _client()
    first = []
    for index in range(MAX_BATCHES_IN_FLIGHT):
        first.append(client.get_coalesced(PEER, "a%d" % (index,)))
        clock.advance(0)
    write = client.apply_coalesced(PEER, _entry(1))
    later = [client.get_coalesced(PEER, key) for key in ("b", "c")]
    clock.advance(0)
    assert len(calls.pending) == MAX_BATCHES_IN_FLIGHT + 1
    calls.answer(MAX_BATCHES_IN_FLIGHT)
    assert write.result.applied
    assert not any(d.called for d in later)
    calls.answer_reads(0, held={"a0"})
    assert first[0].result.key == "a0"
    assert len(calls.pending) == MAX_BATCHES_IN_FLIGHT
    assert calls.answer_reads(len(calls.pending) - 1, held=set()) == ["b", "c"]
    assert [d.result for d in later] == [None, None]
    while calls.pending:
        calls.answer_reads(0, held=set())
    assert all(d.called for d in first)


def test_a_failed_read_batch_fails_each_of_its_reads_with_peer_error():
    client, clock, calls = _client()
    reads = [client.get_coalesced(PEER, key) for key in ("a", "b")]
    clock.advance(0)
    _, d = calls.pending.pop(0)
    d.errback(ConnectionError("refused"))
    failures = []
    for read in reads:
        read.addErrback(lambda failure: failures.append(failure.check(PeerError)))
    assert failures == [PeerError, PeerError]


def test_calls_queued_behind_an_unanswered_batch_fail_at_once():
    """
    If a batch to a peer goes unanswered (refused, reset, timed out), then the writes and reads queued behind
    it fail with PeerError at once, so they fail over now instead of waiting out another timeout there;
    the next call to the peer tries it again.
    """
    client, clock, calls = _client()
    for index in range(MAX_BATCHES_IN_FLIGHT):
        client.apply_coalesced(PEER, _entry(index)).addErrback(lambda failure: None)
        client.get_coalesced(PEER, "r%d" % (index,)).addErrback(lambda failure: None)
        clock.advance(0)
    assert len(calls.pending) == 2 * MAX_BATCHES_IN_FLIGHT
    queued_write = client.apply_coalesced(PEER, _entry(10))
    queued_read = client.get_coalesced(PEER, "s")
    clock.advance(0)
    assert len(calls.pending) == 2 * MAX_BATCHES_IN_FLIGHT
    for _ in range(2):
        _, d = calls.pending.pop(0)
        d.errback(ConnectionError("timed out"))
    failures = []
    for waiter in (queued_write, queued_read):
        waiter.addErrback(lambda failure: failures.append(failure.check(PeerError)))
    assert failures == [PeerError, PeerError]
    assert len(calls.pending) == 2 * (MAX_BATCHES_IN_FLIGHT - 1)
    while calls.pending:
        calls.pending.pop(0)[1].errback(ConnectionError("timed out"))
    retry = client.apply_coalesced(PEER, _entry(3))
    clock.advance(0)
    assert len(calls.pending) == 1
    calls.answer()
    assert retry.result.applied


def test_calls_queued_behind_a_batch_answered_with_an_error_status_still_go():
    """
    If the peer answered a batch with an error status (it is up), then the calls queued behind it are sent.
    """
    client, clock, calls = _client()
    client.apply_coalesced(PEER, _entry(1)).addErrback(lambda failure: None)
    clock.advance(0)
    queued = client.apply_coalesced(PEER, _entry(2))
    clock.advance(0)
    _, d = calls.pending.pop(0)
    d.callback((503, b"{}"))
    assert len(calls.pending) == 1
    calls.answer()
    assert queued.result.applied


# -- the Agent's endpoints ----------------------------------------------------------------------------


def test_cached_endpoints_reuse_one_endpoint_per_peer_address():
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.web.client import URI

    from kvresponder.peers import CachedEndpoints

    factory = CachedEndpoints(MemoryReactorClock(), timeout=2.5)
    first = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.2:3000/t/_internal/apply"))
    again = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.2:3000/t/_internal/get"))
    other_port = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.2:3001/t/_internal/apply"))
    other_host = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.3:3000/t/_internal/apply"))
    assert isinstance(first, TCP4ClientEndpoint)
    assert again is first
    assert len({id(first), id(other_port), id(other_host)}) == 3


def test_cached_endpoints_connect_to_the_uris_address_with_the_timeout():
    from twisted.web.client import URI

    from kvresponder.peers import CachedEndpoints

    reactor = MemoryReactorClock()
    endpoint = CachedEndpoints(reactor, timeout=2.5).endpointForURI(URI.fromBytes(b"http://127.0.0.1:3123/x"))
    endpoint.connect(_NoProtocolFactory())
    reactor.advance(0)
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 3123, 2.5)


def test_cached_endpoints_refuse_other_schemes_and_stay_bounded():
    import pytest
    from twisted.web.client import URI
    from twisted.web.error import SchemeNotSupported

    from kvresponder.peers import CachedEndpoints

    factory = CachedEndpoints(MemoryReactorClock(), timeout=1.0)
    with pytest.raises(SchemeNotSupported):
        factory.endpointForURI(URI.fromBytes(b"https://10.0.0.2:3000/x"))
    for index in range(CachedEndpoints.LIMIT + 10):
        factory.endpointForURI(URI.fromBytes(b"http://10.0.%d.%d:3000/x" % (index // 250, index % 250)))
    assert len(factory._endpoints) <= CachedEndpoints.LIMIT


def test_if_a_peers_address_refuses_the_connection_then_the_call_fails_at_once():
    """
    If a peer's address refuses connections (its process is gone, its pod's address still there), then connecting
    to it fails as soon as the refusal arrives: not one Happy Eyeballs attempt delay (0.3 s) later, which each
    copy and read for that peer would add to its client's request until the peer expires.
    """
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure
    from twisted.web.client import URI

    from kvresponder.peers import CachedEndpoints

    reactor = MemoryReactorClock()
    endpoint = CachedEndpoints(reactor, timeout=2.5).endpointForURI(URI.fromBytes(b"http://127.0.0.1:3123/x"))
    outcome = []
    endpoint.connect(_NoProtocolFactory()).addBoth(outcome.append)
    reactor.advance(0)
    _, _, factory, _, _ = reactor.tcpClients[0]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    reactor.advance(0.01)
    assert len(outcome) == 1 and isinstance(outcome[0], Failure), outcome
    assert outcome[0].check(ConnectionRefusedError)


class _NoProtocolFactory:
    def doStart(self):
        pass

    def doStop(self):
        pass

    def buildProtocol(self, addr):
        return None


def _call(timeouts, calls):
    """A JSON call through a transport, recording each attempt's timeout: the clock, and the call's outcome."""
    from twisted.internet.defer import ensureDeferred

    def post(url, headers, body, timeout, peer_id=""):
        timeouts.append(timeout)
        d = Deferred()
        calls.append(d)
        return d
    client, clock, _ = _client(post)
    outcome = []
    ensureDeferred(client.transport.call(PEER, "keys", {"prefix": ""}, read=True)).addBoth(outcome.append)
    return clock, outcome


def test_a_call_lost_on_a_kept_connection_is_tried_again_in_the_time_its_timeout_has_left():
    """
    If a pooled connection turns out stale 1.5 s into a call's 5 s, then the call is made once more, with the
    3.5 s left, not a new 5 s.
    """
    from twisted.web.client import ResponseFailed

    timeouts, calls = [], []
    clock, outcome = _call(timeouts, calls)
    clock.advance(1.5)
    calls[0].errback(ResponseFailed([]))
    assert timeouts == [5.0, 3.5] and outcome == []
    calls[1].callback((200, b'{"keys": ["a"]}'))
    assert outcome == [{"keys": ["a"]}]


def test_a_call_lost_after_its_timeout_has_run_is_not_tried_again():
    """
    If the kept connection fails only once the call's whole timeout has passed, then the call fails at once
    (the caller fails over) instead of starting a second attempt.
    """
    from twisted.web.client import ResponseFailed

    timeouts, calls = [], []
    clock, outcome = _call(timeouts, calls)
    clock.advance(5.0)
    calls[0].errback(ResponseFailed([]))
    assert timeouts == [5.0] and len(outcome) == 1 and outcome[0].check(PeerError)


def test_a_copy_and_a_hand_off_refused_by_a_leaving_node_fail_with_its_503_at_once_and_make_no_suspect():
    """
    If a peer has begun leaving, then a write's copy sent to it over HTTP, and a hand-off, each fail with its
    503 in the turn it answers (the write fails over, the hand-off is not counted as delivered), it stores
    neither, and it is no suspect: its reads still go to it.
    """
    clock = Clock()
    leaving = Node(make_settings("t1", "n2", insecure_cluster="true"), clock, http=None)
    stub = stub_over(KVSite(build_root(leaving), clock))
    leaving.begin_leaving()
    client = PeerClient(http=stub, clock=clock, tenant="t1", timeout=5.0)
    copy, hand_off = [], []
    client.apply_coalesced(PEER, _entry(1)).addBoth(copy.append)
    ensureDeferred(client.apply(PEER, [_entry(2), _entry(3)], timeout=10.0)).addBoth(hand_off.append)
    clock.advance(0)
    stub.flush()
    for outcome in (copy, hand_off):
        assert len(outcome) == 1 and outcome[0].check(PeerError), outcome
        assert (outcome[0].value.code, outcome[0].value.error) == (503, "leaving")
    assert not client.suspects.suspected(PEER)
    assert [leaving.store.current("k%d" % (i,)) for i in (1, 2, 3)] == [None, None, None]


def test_the_peer_transport_keeps_no_state_for_addresses_it_is_not_calling():
    """
    If 200 peer addresses (pods get a new one at each restart) have each been called, and every call has been
    answered, then the transport keeps no per-address limit of calls for any of them.
    """
    from types import SimpleNamespace

    clock = Clock()
    peer_node = Node(make_settings("t1", "n2", insecure_cluster="true"), clock, http=None)
    stub = stub_over(KVSite(build_root(peer_node), clock))
    client = PeerClient(http=stub, clock=clock, tenant="t1", timeout=5.0)
    answers = []
    for index in range(200):
        peer = SimpleNamespace(node_id="n2", address="10.0.%d.%d" % (index >> 8, index & 255), port=3000)
        ensureDeferred(client.transport.call(peer, "keys", {"limit": 1}, read=True)).addBoth(
            answers.append)
        stub.flush()
    assert len(answers) == 200 and not any(isinstance(answer, Failure) for answer in answers), answers[:3]
    assert client.transport._in_flight == {}


def test_a_signature_whose_time_is_not_a_finite_number_is_refused_even_with_its_mac():
    """
    If a peer signature's time is ``nan`` or ``inf`` (no window comparison can refuse it), then it is refused,
    whatever its MAC, for the body's signature and the head's signed length alike.
    """
    from kvresponder.peertransport import PeerAuthenticator

    auth = PeerAuthenticator(b"k" * 32, wall=lambda: 1_700_000_000.0)
    for stamp in ("nan", "inf", "-inf"):
        body_header = ("%s:%s" % (stamp, auth._mac(stamp, b"POST", b"/t1/_internal/apply", b"{}"))).encode()
        length_header = ("%s:%s" % (stamp, auth._length_mac(stamp, b"POST", b"/t1/_internal/apply", 2))).encode()
        assert not auth.verify(body_header, b"POST", b"/t1/_internal/apply", b"{}")
        assert not auth.verify_length(length_header, b"POST", b"/t1/_internal/apply", 2)
    fresh = auth.sign(b"POST", b"/t1/_internal/apply", b"{}")
    assert auth.verify(fresh, b"POST", b"/t1/_internal/apply", b"{}")



def _requests_for(node, route: str) -> float:
    # The node's own count of the requests it answered on ``route``, from its metrics exposition.
    total = 0.0
    for line in node.metrics.exposition().decode().splitlines():
        if line.startswith("kv_http_requests_total{") and 'route="%s"' % (route,) in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_read_batch_of_large_entries_is_answered_in_parts_and_the_rest_asked_again():
    """
    If a batch of reads asks a peer for more bytes of entries than MAX_BATCH_BYTES (12 values of 1 MiB), then
    the peer answers about that many and leaves the rest out (``false``), and the reader asks again for those:
    every entry arrives, in two answers, none of them over the bound by more than one entry.
    """
    from kvresponder.wire import OMITTED

    clock = Clock()
    peer_node = Node(make_settings("t1", "n2", insecure_cluster="true", max_memory="64Mi",
                                   max_value_size="2Mi"), clock, http=None)
    stub = stub_over(KVSite(build_root(peer_node), clock, metrics=peer_node.metrics))
    client = PeerClient(http=stub, clock=clock, tenant="t1", timeout=5.0)
    keys = ["big%02d" % (i,) for i in range(12)]
    value = b'"' + b"x" * (1024 * 1024) + b'"'
    for key in keys:
        assert peer_node.store.apply(Entry(key, value, (5, 0, "n2"))).applied

    answer = []
    ensureDeferred(client.transport.call(PEER, "get", {"keys": keys, "partial": True}, read=True)).addBoth(
        answer.append)
    stub.flush()
    entries = answer[0]["entries"]
    sent = [entry for entry in entries if entry is not OMITTED]
    assert 0 < len(sent) < len(keys) and all(entry is OMITTED for entry in entries[len(sent):])
    assert sum(len(entry["v"]) for entry in sent) <= MAX_BATCH_BYTES
    # A caller that does not say it asks again (a node older than this) gets every entry, as before.
    whole = []
    ensureDeferred(client.transport.call(PEER, "get", {"keys": keys}, read=True)).addBoth(whole.append)
    stub.flush()
    assert [entry["k"] for entry in whole[0]["entries"]] == keys

    got = []
    ensureDeferred(client.get_many(PEER, keys + ["absent"])).addBoth(got.append)
    stub.flush()
    stub.flush()
    (found,) = got
    assert [entry.key for entry in found[:-1]] == keys and found[-1] is None
    assert all(entry.value == value for entry in found[:-1])
    # Two calls above, then two for get_many: the whole batch, then the entries left out of its answer.
    assert _requests_for(peer_node, "/_internal/get") == 4


def test_a_peer_that_leaves_out_every_key_asked_fails_the_read_instead_of_being_asked_forever():
    """
    If a peer answers a read batch with every key left out (``false``), then the reads fail with PeerError
    (and fail over) instead of asking it again and again.
    """
    client, clock, calls = _client()
    reads = [client.get_coalesced(PEER, key) for key in ("a", "b")]
    clock.advance(0)
    keys, d = calls.pending.pop(0)
    d.callback((200, json.dumps({"entries": [False] * len(keys)}).encode()))
    failures = []
    for read in reads:
        read.addErrback(lambda failure: failures.append(failure.check(PeerError)))
    assert failures == [PeerError, PeerError]
    assert calls.pending == []


def test_a_read_batch_answered_in_part_settles_each_read_once_the_rest_is_in():
    """
    If a peer leaves some keys of a read batch out (``false``), then the reads it answered wait with the
    others for the second answer, which asks only the keys left out.
    """
    client, clock, calls = _client()
    reads = {key: client.get_coalesced(PEER, key) for key in ("a", "b", "c")}
    clock.advance(0)
    keys, d = calls.pending.pop(0)
    d.callback((200, json.dumps({"entries": [entry_to_wire(Entry("a", b"1", (5, 0, "n2")), 0.0), False,
                                             None]}).encode()))
    assert not any(read.called for read in reads.values())
    assert calls.answer_reads(0, held={"b"}) == ["b"]
    assert reads["a"].result.key == "a" and reads["b"].result.key == "b" and reads["c"].result is None


def test_a_signed_length_grants_its_exemption_from_the_body_budget_once():
    """
    If a head signed for a body's length is shown again (captured, within the signature's window), then the
    second is taken as unsigned: a replayed head with junk bodies of that length must not skip the body budget
    again, as each would while the node reads it before the body's own signature can be checked.
    """
    from twisted.web.http_headers import Headers

    from kvresponder.http.peerguard import SIGNED_BY_PEER, UNSIGNED, PeerGuard
    from kvresponder.peertransport import LENGTH_AUTH_HEADER, PeerAuthenticator

    auth = PeerAuthenticator(b"k" * 32, wall=lambda: 1_700_000_000.0)
    guard = PeerGuard(auth)
    path, length = b"/t1/_internal/apply", 1 << 20
    headers = Headers({LENGTH_AUTH_HEADER: [auth.sign_length(b"POST", path, length)]})
    assert guard.length_signature(headers, b"POST", path, length) == SIGNED_BY_PEER
    assert guard.length_signature(headers, b"POST", path, length) == UNSIGNED
    # Another head for the same call, signed in the same instant (by this peer or another sharing the key), is
    # another signature.
    again = Headers({LENGTH_AUTH_HEADER: [auth.sign_length(b"POST", path, length)]})
    assert guard.length_signature(again, b"POST", path, length) == SIGNED_BY_PEER


def test_a_signature_in_the_format_of_older_nodes_is_still_accepted():
    """
    If an older node signs with its time to the millisecond (no random digits), then its signatures still pass,
    and a newer node's stamp is still a number such a node reads.
    """
    from kvresponder.peertransport import PeerAuthenticator

    auth = PeerAuthenticator(b"k" * 32, wall=lambda: 1_700_000_000.0)
    stamp = "1700000000.000"
    old = ("%s:%s" % (stamp, auth._mac(stamp, b"POST", b"/t1/_internal/apply", b"{}"))).encode()
    assert auth.verify(old, b"POST", b"/t1/_internal/apply", b"{}")
    new = auth.sign(b"POST", b"/t1/_internal/apply", b"{}")
    assert abs(float(new.split(b":")[0]) - 1_700_000_000.0) < 0.001


def test_spent_signatures_are_forgotten_once_past_the_window_and_bounded_in_number():
    """
    If signatures are spent, then each is remembered until its time plus the window has passed on this node's
    clock, and no more than the limit are kept: past it, a new one is refused rather than remembered.
    """
    from kvresponder.peertransport import AUTH_WINDOW, _SpentSignatures

    now = [1000.0]
    spent = _SpentSignatures(lambda: now[0], limit=2000)
    for index in range(1500):
        assert spent.spend("mac%d" % (index,), 1000.0)
    assert not spent.spend("mac7", 1000.0)
    now[0] = 1000.0 + AUTH_WINDOW + 1
    for index in range(1500, 3000):
        assert spent.spend("mac%d" % (index,), now[0])
    assert spent.spend("mac7", now[0])
    for index in range(3000, 6000):
        spent.spend("mac%d" % (index,), now[0])
    assert len(spent._until) <= 2000 + 1


_APPLY = b"/t1/_internal/apply"


def _signer():
    """A peer authenticator on a wall clock the test moves (``now[0]``), and a guard of the internal routes over it."""
    from kvresponder.http.peerguard import PeerGuard
    from kvresponder.peertransport import PeerAuthenticator

    now = [1_700_000_000.0]
    auth = PeerAuthenticator(b"k" * 32, wall=lambda: now[0])
    return auth, PeerGuard(auth), now


def _length_head(auth, method: bytes, path: bytes, length: int):
    from twisted.web.http_headers import Headers

    from kvresponder.peertransport import LENGTH_AUTH_HEADER
    return Headers({LENGTH_AUTH_HEADER: [auth.sign_length(method, path, length)]})


def test_a_fresh_signature_of_the_request_itself_is_accepted():
    """
    If a peer signs a request's method, path and body (and its head the body's length) just now, then the
    signature passes, and the signed length grants its exemption from the body budget.
    """
    from kvresponder.http.peerguard import SIGNED_BY_PEER
    auth, guard, _ = _signer()
    assert auth.verify(auth.sign(b"POST", _APPLY, b"{}"), b"POST", _APPLY, b"{}")
    head = _length_head(auth, b"POST", _APPLY, 2)
    assert guard.length_signature(head, b"POST", _APPLY, 2) == SIGNED_BY_PEER


def test_a_signature_older_than_the_window_is_refused_and_not_taken_as_a_first_use():
    """
    If a captured signature is shown more than AUTH_WINDOW seconds after it was made (or dated that far ahead),
    then it is refused, for the body and the head's signed length alike, and is not taken as a first use: a
    signed request cannot be replayed forever. Within the window it still passes.
    """
    from kvresponder.http.peerguard import UNSIGNED
    from kvresponder.peertransport import AUTH_WINDOW, LENGTH_AUTH_HEADER
    auth, guard, now = _signer()
    body = auth.sign(b"POST", _APPLY, b"{}")
    head = _length_head(auth, b"POST", _APPLY, 2)
    signed_at = now[0]
    now[0] = signed_at + AUTH_WINDOW - 1
    assert auth.verify(body, b"POST", _APPLY, b"{}")
    assert auth.verify_length(head.getRawHeaders(LENGTH_AUTH_HEADER)[0], b"POST", _APPLY, 2)
    for late in (signed_at + AUTH_WINDOW + 1, signed_at - AUTH_WINDOW - 1):
        now[0] = late
        assert not auth.verify(body, b"POST", _APPLY, b"{}")
        assert not auth.verify_length(head.getRawHeaders(LENGTH_AUTH_HEADER)[0], b"POST", _APPLY, 2)
        assert guard.length_signature(head, b"POST", _APPLY, 2) == UNSIGNED
        assert not auth.first_use(body)


def test_a_signature_made_before_this_node_started_is_no_first_use_though_it_still_verifies():
    """
    If a node restarts and is shown, within the window, a signature made before it started (by more than a clock
    behind its own could explain: twice MAX_CLOCK_OFFSET), then it still verifies (every internal operation is
    idempotent), but it is not taken as a first use: the previous process spent it, and its record went with it
    (a captured copy stream upgrade, sent again after the restart, opened a stream). One made since is.
    """
    from kvresponder.peertransport import PeerAuthenticator

    now = [1_700_000_000.0]
    before = PeerAuthenticator(b"k" * 32, wall=lambda: now[0])
    captured = before.sign(b"POST", _APPLY, b"{}")
    now[0] += 10.0
    restarted = PeerAuthenticator(b"k" * 32, wall=lambda: now[0], clock_allowance=1.0)
    assert restarted.verify(captured, b"POST", _APPLY, b"{}")
    assert not restarted.first_use(captured)
    behind = [now[0] - 0.9]  # a peer whose clock is 0.9 s behind, signing just now
    peer = PeerAuthenticator(b"k" * 32, wall=lambda: behind[0])
    assert restarted.first_use(peer.sign(b"POST", _APPLY, b"{}"))
    assert restarted.first_use(restarted.sign(b"POST", _APPLY, b"{}"))


def test_a_node_started_with_its_clock_ahead_and_set_right_since_takes_its_peers_fresh_signatures_as_first_uses():
    """
    If a node starts with its clock an hour ahead and the clock is set right (NTP's first step), then a peer's
    signature made just now is a first use: when the node started is read as its wall clock now less the time
    since, on a clock that does not step, not as the hour-ahead reading taken at its start (every copy stream
    upgrade was refused as a replay for that hour).
    """
    from kvresponder.peertransport import PeerAuthenticator

    right = 1_700_000_000.0
    wall, steady = [right + 3600.0], [50.0]
    node = PeerAuthenticator(b"k" * 32, wall=lambda: wall[0], clock_allowance=1.0, steady=lambda: steady[0])
    steady[0] += 10.0
    wall[0] = right + 10.0
    peer = PeerAuthenticator(b"k" * 32, wall=lambda: right + 10.0)
    assert node.first_use(peer.sign(b"POST", _APPLY, b"{}"))
    # What it still refuses: one made before it started, by the clock as it reads now.
    early = PeerAuthenticator(b"k" * 32, wall=lambda: right - 5.0)
    assert not node.first_use(early.sign(b"POST", _APPLY, b"{}"))


def test_a_signature_made_for_another_path_is_refused():
    """
    If a signature made for one internal route is shown on another (same method, body and time), then it is
    refused, for the body and the head's signed length alike; the head is not spent by that attempt, and still
    passes on its own route.
    """
    from kvresponder.http.peerguard import SIGNED_BY_PEER, UNSIGNED
    auth, guard, _ = _signer()
    other = b"/t1/_internal/get"
    assert not auth.verify(auth.sign(b"POST", _APPLY, b"{}"), b"POST", other, b"{}")
    head = _length_head(auth, b"POST", _APPLY, 2)
    assert guard.length_signature(head, b"POST", other, 2) == UNSIGNED
    assert guard.length_signature(head, b"POST", _APPLY, 2) == SIGNED_BY_PEER


def test_a_signature_made_for_another_method_is_refused():
    """
    If a signature made for a POST to an internal route is shown on another method to that route (same path,
    body and time), then it is refused, for the body and the head's signed length alike; the head is not spent
    by that attempt, and still passes on its own method.
    """
    from kvresponder.http.peerguard import SIGNED_BY_PEER, UNSIGNED
    auth, guard, _ = _signer()
    assert not auth.verify(auth.sign(b"POST", _APPLY, b"{}"), b"PUT", _APPLY, b"{}")
    head = _length_head(auth, b"POST", _APPLY, 2)
    assert guard.length_signature(head, b"PUT", _APPLY, 2) == UNSIGNED
    assert guard.length_signature(head, b"POST", _APPLY, 2) == SIGNED_BY_PEER


def _answering(body: bytes):
    """A peer client whose every call is answered 200 with ``body``."""
    from twisted.internet.defer import succeed

    clock = Clock()
    return PeerClient(http=None, clock=clock, tenant="t1", timeout=5.0,
                      post=lambda url, headers, data, timeout, peer_id="": succeed((200, body)))


def _outcome(coroutine):
    outcomes = []
    ensureDeferred(coroutine).addBoth(outcomes.append)
    assert len(outcomes) == 1
    return outcomes[0]


def test_an_answer_nested_deeper_than_the_decoder_goes_is_a_peer_error():
    """
    If a peer answers 200 with JSON nested deeper than the decoder goes, then the call fails with PeerError
    (the caller fails over) rather than with the decoder's RecursionError.
    """
    outcome = _outcome(_answering(b"[" * 100000).transport.call(PEER, "keys", {"limit": 1}, read=True))
    assert isinstance(outcome, Failure) and outcome.check(PeerError), outcome


def test_an_entry_whose_ttl_is_an_integer_no_float_holds_is_a_peer_error():
    """
    If a peer's entry carries a ``ttl`` of 400 digits, then the read fails with PeerError, not OverflowError.
    """
    body = b'{"entry": {"k": "a", "v": "1", "ver": [1, 0, "n2"], "ttl": 1' + b"0" * 400 + b"}}"
    outcome = _outcome(_answering(body).get(PEER, "a"))
    assert isinstance(outcome, Failure) and outcome.check(PeerError), outcome


def test_anti_entropy_answers_with_elements_of_the_wrong_type_are_peer_errors():
    """
    If a peer answers the bucket comparison with a bucket that is not an integer, or the version comparison
    with a key that is not a string, then the step fails with PeerError (that peer's sync fails, not the pass).
    """
    for differ in ([None], ["7"], [[1]], [1.5]):
        outcome = _outcome(_answering(json.dumps({"differ": differ}).encode()).differing_buckets(PEER, "n1", {}))
        assert isinstance(outcome, Failure) and outcome.check(PeerError), (differ, outcome)
    assert _outcome(_answering(b'{"differ": [3, 7]}').differing_buckets(PEER, "n1", {})) == [3, 7]
    for want in ([["k"]], [{"k": 1}], [1]):
        outcome = _outcome(_answering(json.dumps({"want": want}).encode()).wanted(PEER, {"k": (1, 0, "n1")}))
        assert isinstance(outcome, Failure) and outcome.check(PeerError), (want, outcome)
    assert _outcome(_answering(b'{"want": ["k", "x"]}').wanted(PEER, {"k": (1, 0, "n1")})) == (["k"], set())
    assert _outcome(_answering(b'{"want": ["k"], "lacking": ["k"]}').wanted(PEER, {"k": (1, 0, "n1")})) \
        == (["k"], {"k"})
    for lacking in ("k", [1], None):
        outcome = _outcome(_answering(json.dumps({"want": ["k"], "lacking": lacking}).encode()).wanted(
            PEER, {"k": (1, 0, "n1")}))
        assert isinstance(outcome, Failure) and outcome.check(PeerError), (lacking, outcome)


def test_apply_results_that_are_not_pairs_of_booleans_do_not_count_as_stored_copies():
    """
    If a peer answers a copy with a result that is not ``[applied, had_live]`` (two booleans, and the newer
    version only when it held one), then the copy fails with PeerError: a string, an object or numbers must
    not count toward the write's quorum.
    """
    from kvresponder.copysender import apply_results
    from kvresponder.store import ApplyResult

    for result in ("no", "ab", {"x": 0, "y": 0}, [1, 0], [True], [True, False, None, None], [True, "no"]):
        try:
            apply_results({"results": [result]}, PEER, 1)
        except PeerError:
            continue
        raise AssertionError("%r counted as a stored copy" % (result,))
    assert apply_results({"results": [[True, False], [False, True, [9, 0, "n3"]]]}, PEER, 2) == [
        ApplyResult(True, False), ApplyResult(False, True, (9, 0, "n3"))]


def test_a_call_waiting_for_its_turn_behind_unanswered_calls_fails_within_its_own_timeout():
    """
    If MAX_IN_FLIGHT calls to a peer go unanswered and one more is made, then that one fails with PeerError
    when its own timeout has run (its wait for a turn counts), not a timeout after the calls ahead of it; and
    the transport keeps no state for the peer once every call has ended.
    """
    from kvresponder.peertransport import MAX_IN_FLIGHT

    clock = Clock()
    sent = []

    def post(url, headers, data, timeout, peer_id=""):
        sent.append(Deferred())  # never answered (the transport's own timeout would end it)
        return sent[-1]
    client = PeerClient(http=None, clock=clock, tenant="t1", timeout=5.0, post=post)
    outcomes = []
    for _ in range(MAX_IN_FLIGHT + 1):
        ensureDeferred(client.transport.call(PEER, "keys", {"limit": 1}, read=True)).addBoth(outcomes.append)
    assert len(sent) == MAX_IN_FLIGHT and outcomes == []
    clock.advance(5.0)
    assert len(outcomes) == 1 and outcomes[0].check(PeerError), outcomes
    assert len(sent) == MAX_IN_FLIGHT
    for call in sent:
        call.errback(Failure(TimeoutError()))
    assert len(outcomes) == MAX_IN_FLIGHT + 1 and client.transport._in_flight == {}


def _blocked_transport():
    """
    A peer client whose ``keys`` calls hang until answered, and whose ``get`` calls time out as the real
    transport's do (their own timeout cancels them): the calls sent, and a way to answer one ``keys`` call.
    """
    from twisted.internet.defer import CancelledError

    clock = Clock()
    sent = []

    def post(url, headers, data, timeout, peer_id=""):
        d = Deferred()
        sent.append((url.rsplit("/", 1)[1], d))
        if url.endswith("/get"):
            clock.callLater(timeout, lambda: d.called or d.errback(Failure(CancelledError())))
        return d
    client = PeerClient(http=None, clock=clock, tenant="t1", timeout=5.0, post=post)
    return client, clock, sent


def _fill_the_turns(client, sent) -> list:
    from kvresponder.peertransport import MAX_IN_FLIGHT

    outcomes = []
    for _ in range(MAX_IN_FLIGHT):
        ensureDeferred(client.transport.call(PEER, "keys", {"limit": 1}, read=True, timeout=60)).addBoth(
            outcomes.append)
    assert len(sent) == MAX_IN_FLIGHT
    return outcomes


def test_a_call_whose_turn_comes_as_its_timeout_is_due_is_not_sent():
    """
    If a call waits for its turn behind MAX_IN_FLIGHT calls and a turn comes exactly as its timeout is due,
    then it fails with PeerError without sending a request that could not be answered.
    """
    from kvresponder.peertransport import MAX_IN_FLIGHT

    client, clock, sent = _blocked_transport()
    _fill_the_turns(client, sent)
    clock.callLater(5.0, lambda: sent[0][1].callback((200, b'{"keys": []}')))
    late = []
    ensureDeferred(client.transport.call(PEER, "keys", {"limit": 1}, read=True)).addBoth(late.append)
    clock.advance(5.0)
    assert len(late) == 1 and late[0].check(PeerError) and "no time left" in str(late[0].value), late
    assert len(sent) == MAX_IN_FLIGHT
    for _, d in sent[1:]:
        d.callback((200, b'{"keys": []}'))


def test_a_read_timed_out_makes_its_peer_a_suspect_unless_it_waited_for_its_turn():
    """
    If a read gets no answer within its whole timeout, then its peer becomes a suspect; if it waited for its
    turn behind other calls first (so the peer had less than its timeout), then its timeout alone does not make
    the peer one.
    """
    client, clock, sent = _blocked_transport()
    _fill_the_turns(client, sent)
    clock.callLater(1.0, lambda: sent[0][1].callback((200, b'{"keys": []}')))
    waited = []
    ensureDeferred(client.get(PEER, "k")).addBoth(waited.append)
    clock.advance(1.0)
    assert sent[-1][0] == "get"
    clock.advance(4.0)
    assert waited and waited[0].check(PeerError) and not client.transport.suspects.suspected(PEER), waited
    for _, d in sent[1:-1]:
        d.callback((200, b'{"keys": []}'))
    prompt = []
    ensureDeferred(client.get(PEER, "k")).addBoth(prompt.append)
    clock.advance(5.0)
    assert prompt and prompt[0].check(PeerError) and client.transport.suspects.suspected(PEER), prompt


def test_a_listing_page_timed_out_makes_its_peer_a_suspect_so_the_next_page_does_not_wait_for_it():
    """
    If a peer does not answer a listing's page of keys within the call's timeout, then it becomes a suspect, as
    for a read: the next page's call to it fails at once, instead of waiting the whole timeout again.
    """
    from twisted.internet.defer import CancelledError

    clock = Clock()
    sent = []

    def post(url, headers, data, timeout, peer_id=""):
        d = Deferred()
        sent.append(d)
        clock.callLater(timeout, lambda: d.called or d.errback(Failure(CancelledError())))
        return d
    client = PeerClient(http=None, clock=clock, tenant="t1", timeout=5.0, post=post)
    first = []
    ensureDeferred(client.keys(PEER, "", None, 11)).addBoth(first.append)
    clock.advance(5.0)
    assert first and first[0].check(PeerError) and client.transport.suspects.suspected(PEER), first
    second = []
    ensureDeferred(client.keys(PEER, "", None, 11)).addBoth(second.append)
    assert second and second[0].check(PeerError) and len(sent) == 1, second


@pytest.mark.parametrize("answer, named", [
    (b'{"error":"leaving","message":"..."}', "leaving"),
    (b'{"message":"no error named"}', None),
    (b'{"error":5}', None),
    (b'["leaving"]', None),
    (b"not JSON", None),
    (b"[" * 100000, None),
])
def test_an_error_answer_names_an_error_only_when_its_json_body_does(answer, named):
    """
    If a peer's error answer is a JSON object with a string ``error``, then that is the error it names; anything
    else (another shape, not JSON, nested past the parser's limit) names none, and raises nothing.
    """
    from kvresponder.peertransport import error_named

    assert error_named(answer) == named


def test_a_batchs_task_ids_stay_within_half_the_peers_header_limit_the_ones_past_it_sent_as_none():
    """
    If a batch of coalesced writes carries more task ids than half of ``MAX_HEADER_BYTES`` holds (256 writes carry
    some 11 KiB of them), then the ids past it are each sent as ``-`` (the peer logs those copies in trees of their
    own) and the header keeps one id for each write: sent whole, the peer refused the batch's headers, and every
    copy of the batch failed over. Without a limit, or within it, every id is sent.
    """
    from kvresponder.peertransport import TASKS_HEADER, PeerTransport, task_ids_header

    ids = [b"%036d@/%d" % (index, index % 7) for index in range(256)]
    assert task_ids_header(ids, None) == b" ".join(ids)
    assert task_ids_header(ids[:3], 512) == b" ".join(ids[:3])
    for budget in (512, 4096, 8192):
        header = task_ids_header(ids, budget)
        parts = header.split(b" ")
        assert len(header) <= budget and len(parts) == len(ids)
        kept = [part for part in parts if part != b"-"]
        assert parts[:len(kept)] == ids[:len(kept)] and set(parts[len(kept):]) == {b"-"}
        # A budget that holds a "-" for each write and no more keeps no id.
        assert bool(kept) == (budget > 2 * len(ids))
        assert len(header) > budget - 2 * len(ids[0])
    sent = []

    def post(url, headers, body, timeout, peer_id=""):
        sent.append(headers[TASKS_HEADER][0])
        return succeed((200, b'{"results": []}'))

    clock = Clock()
    for limit, expected in ((1024, task_ids_header(ids, 512)), (None, b" ".join(ids))):
        transport = PeerTransport(None, clock, "t1", 5.0, post=post, max_header_bytes=limit)
        d = ensureDeferred(transport.call(PEER, "apply", b"", task_ids=ids))
        assert d.called, limit
        assert sent[-1] == expected, limit

