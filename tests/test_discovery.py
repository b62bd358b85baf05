"""
Tests for :mod:`kvresponder.discovery`, on a ``task.Clock`` and a fake multicast transport.
"""

import json
from typing import List
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from kvresponder import discovery
from kvresponder.discovery import (
    MAX_DATAGRAM, REPLAY_WINDOW, DiscoveryProtocol, DiscoveryService, HeartbeatCodec, derive_key,
)
from kvresponder.membership import ALIVE, GONE, LEAVING, Heartbeat, Membership

NOW = 1700000000.0
GROUP = "239.255.30.167"
OWN_ADDRESS = "10.0.0.1"
PORT = 9999
PEER_TIMEOUT = 15.0
KEY = derive_key("a-cluster-secret-of-some-length", "discovery")
OWN = Heartbeat("self-node", 1, OWN_ADDRESS, 3000, ALIVE, 1)
PEER = Heartbeat("n2", 4, "10.0.0.2", 3001, ALIVE, 2)


class FakeMulticastTransport:
    """
    Records what a ``DatagramProtocol`` asks of its multicast port.
    """

    def __init__(self) -> None:
        self.written: list = []
        self.calls: list = []
        self.fail_writes = False
        self.stopped = 0

    def write(self, data, addr):
        if self.fail_writes:
            raise OSError("no buffer space available")
        self.written.append((data, addr))

    def setOutgoingInterface(self, address):
        self.calls.append(("setOutgoingInterface", address))
        return succeed(1)

    def setTTL(self, ttl):
        self.calls.append(("setTTL", ttl))

    def setLoopbackMode(self, mode):
        self.calls.append(("setLoopbackMode", mode))

    def joinGroup(self, address, interface=""):
        self.calls.append(("joinGroup", address, interface))
        return succeed(None)

    def stopListening(self):
        self.stopped += 1


class FakeMetrics:
    def __init__(self) -> None:
        self.results: List[str] = []

    def discovery(self, result: str) -> None:
        self.results.append(result)


class Harness:
    """
    A started protocol with its clock, membership, transport and metrics.
    """

    def __init__(self, key=None, group=GROUP, start=True, alone=False, at=NOW, unicast_peers=False,
                 clock_offsets=None, wall=None) -> None:
        self.clock = Clock()
        self.clock.advance(at)
        self.membership = Membership(self.clock.seconds, OWN.node_id, PEER_TIMEOUT)
        self.metrics = FakeMetrics()
        self.transport = FakeMulticastTransport()
        self.protocol = DiscoveryProtocol(HeartbeatCodec("t1", key), self.membership, self.clock,
                                          wall or self.clock.seconds, lambda: OWN, group, OWN_ADDRESS, PORT, ttl=2,
                                          metrics=self.metrics, alone=alone, unicast_peers=unicast_peers,
                                          clock_offsets=clock_offsets)
        if start:
            self.protocol.makeConnection(self.transport)

    def receive(self, data: bytes) -> None:
        self.protocol.datagramReceived(data, ("10.0.0.2", PORT))

    def sent(self):
        return [(json.loads(data), addr) for data, addr in self.transport.written]


def encode(beat=PEER, want=False, key=None, tenant="t1", at=NOW) -> bytes:
    return HeartbeatCodec(tenant, key).encode(beat, want, at)


def body_of(beat=PEER, want=False) -> dict:
    return json.loads(encode(beat, want))


def raw(body) -> bytes:
    return json.dumps(body).encode("utf-8")


@pytest.fixture
def tracebacks():
    """
    Every exception that reached ``datagramReceived``'s last-resort handler.
    """
    caught = []
    with mock.patch.object(discovery, "write_traceback", lambda *a, **k: caught.append(a)):
        yield caught


# -- sending -------------------------------------------------------------------------------------------

def test_start_sets_the_outgoing_interface_and_joins_the_group_on_it():
    """
    If the protocol starts with a group, then it sets the outgoing interface explicitly before anything
    else, and joins the group on that same interface.
    """
    harness = Harness()
    assert harness.transport.calls == [
        ("setOutgoingInterface", OWN_ADDRESS),
        ("setTTL", 2),
        ("setLoopbackMode", True),
        ("joinGroup", GROUP, OWN_ADDRESS),
    ]


def test_start_without_a_group_touches_no_multicast_setting():
    """
    If multicast is off (no group), then starting asks nothing of the transport.
    """
    harness = Harness(group=None)
    assert harness.transport.calls == []


def test_announce_goes_to_the_group_and_every_seed_but_not_to_ourselves():
    """
    If the node announces itself, then one datagram goes to the group and one to each seed on the
    discovery port, none to our own address, and each decodes to our heartbeat.
    """
    harness = Harness()
    harness.protocol.seeds = {"10.0.0.5", OWN_ADDRESS, "10.0.0.3"}
    harness.protocol.announce(want_reply=True)
    sent = harness.sent()
    assert [addr for _, addr in sent] == [(GROUP, PORT), ("10.0.0.3", PORT), ("10.0.0.5", PORT)]
    assert all(body == sent[0][0] for body, _ in sent)
    beat, want, _ = HeartbeatCodec("t1").decode(harness.transport.written[0][0])
    assert (beat, want) == (OWN, True)


def test_announce_without_a_group_goes_to_seeds_only():
    """
    If multicast is off, then an announcement goes only to the seeds.
    """
    harness = Harness(group=None)
    harness.protocol.transport = harness.transport
    harness.protocol.seeds = {"10.0.0.5"}
    harness.protocol.announce()
    assert [addr for _, addr in harness.sent()] == [("10.0.0.5", PORT)]


def test_leaving_announcement_carries_the_leaving_state():
    """
    If the node announces with ``state=leaving``, then the datagram says leaving.
    """
    harness = Harness()
    harness.protocol.announce(state=LEAVING)
    assert harness.sent()[0][0]["state"] == LEAVING


def test_a_draining_nodes_regular_heartbeat_says_leaving():
    """
    If the node itself is leaving (draining), then its regular heartbeats say leaving: peers must stop
    sending it writes at once, not when its drain ends.
    """
    harness = Harness()
    harness.protocol.own_heartbeat = lambda: OWN._replace(state=LEAVING)
    harness.protocol.announce()
    harness.protocol.announce(want_reply=True)
    assert [body["state"] for body, _ in harness.sent()] == [LEAVING, LEAVING]


def test_failed_send_is_counted_and_does_not_raise():
    """
    If the socket refuses a datagram, then ``announce`` returns normally and counts ``send_failed`` per
    target.
    """
    harness = Harness()
    harness.protocol.seeds = {"10.0.0.5"}
    harness.transport.fail_writes = True
    harness.protocol.announce()
    assert harness.metrics.results == ["send_failed", "send_failed"]


# -- receiving -----------------------------------------------------------------------------------------

def test_valid_heartbeat_creates_a_peer(tracebacks):
    """
    If a valid heartbeat of our tenant arrives, then the sender becomes a peer with the advertised details,
    the datagram counts as ``accepted``, and no reply is sent since none was asked for.
    """
    harness = Harness()
    harness.receive(encode())
    peer = harness.membership.peer("n2")
    assert (peer.incarnation, peer.address, peer.port, peer.state, peer.ring_size) == (4, "10.0.0.2", 3001,
                                                                                       ALIVE, 2)
    assert harness.metrics.results == ["accepted"]
    harness.clock.advance(10)
    assert harness.transport.written == []
    assert tracebacks == []


def test_a_heartbeat_carries_the_digest_of_the_senders_ring_and_an_older_nodes_none():
    """
    If a heartbeat names the members of its sender's ring by digest, then the peer keeps it (a joining node
    compares it with its own ring); one from a node older than that field leaves it ``None``.
    """
    from kvresponder.ring import members_digest

    harness = Harness()
    digest = members_digest(["n1", "n2"])
    harness.receive(encode(PEER._replace(ring_digest=digest)))
    assert harness.membership.peer("n2").ring_digest == digest
    other = Harness()
    other.receive(encode())
    assert other.membership.peer("n2").ring_digest is None
    assert harness.metrics.results == other.metrics.results == ["accepted"]


def test_a_heartbeat_says_whether_its_sender_is_joining_and_an_older_nodes_says_it_is_not():
    """
    If a heartbeat says its sender is joining, then the peer is marked joining until a heartbeat says otherwise
    (a joining node leaves such peers out of the ring its data came from); a heartbeat without the field, as
    an older node sends, marks it not joining. The field is sent only while true.
    """
    harness = Harness()
    joining = encode(PEER._replace(joining=True))
    assert json.loads(joining)["joining"] is True
    harness.receive(joining)
    assert harness.membership.peer("n2").joining is True
    ready = encode(PEER)
    assert "joining" not in json.loads(ready)
    harness.receive(ready)
    assert harness.membership.peer("n2").joining is False
    assert harness.metrics.results == ["accepted", "accepted"]


def test_a_heartbeat_says_which_ring_its_sender_has_handed_off_under_and_an_older_nodes_says_none():
    """
    If a heartbeat names the ring its sender has handed off under (``settled``), then the peer keeps that
    digest until a heartbeat without it (the sender's ring changed), as one from an older node has: ``None``.
    The field is sent only once the sender has handed off.
    """
    from kvresponder.ring import members_digest

    harness = Harness()
    digest = members_digest(["n1", "n2"])
    settled = encode(PEER._replace(ring_digest=digest, settled=digest))
    assert json.loads(settled)["settled"] == digest
    harness.receive(settled)
    assert harness.membership.peer("n2").settled == digest
    unsettled = encode(PEER._replace(ring_digest=digest))
    assert "settled" not in json.loads(unsettled)
    harness.receive(unsettled)
    assert harness.membership.peer("n2").settled is None
    assert harness.metrics.results == ["accepted", "accepted"]


def test_a_heartbeat_says_whether_its_sender_moves_data_under_another_ring_and_an_older_nodes_says_not():
    """
    If a heartbeat says its sender is running a pass under a ring other than its current one (``moving``),
    then the peer is marked so until a heartbeat without it, as one from an older node is. The field is sent
    only while true.
    """
    harness = Harness()
    moving = encode(PEER._replace(moving=True))
    assert json.loads(moving)["moving"] is True
    harness.receive(moving)
    assert harness.membership.peer("n2").moving is True
    still = encode(PEER)
    assert "moving" not in json.loads(still)
    harness.receive(still)
    assert harness.membership.peer("n2").moving is False


def test_own_heartbeat_is_counted_as_self_and_ignored():
    """
    If our own heartbeat comes back through multicast loopback, then it counts as ``self`` and does not
    touch membership.
    """
    harness = Harness()
    harness.receive(encode(OWN, want=True))
    harness.clock.advance(1)
    assert harness.metrics.results == ["self"]
    assert harness.membership.peers() == []
    assert harness.transport.written == []


def test_a_node_that_serves_alone_ignores_every_heartbeat_and_says_so_once_per_peer_per_ten_minutes(tracebacks):
    """
    If the node serves alone (no CLUSTER_SECRET, no --insecure-cluster), then a valid heartbeat, even one
    asking for a reply, counts as ``insecure_ignored``, adds no peer, gets no reply, and is logged as a warning
    once per sender, and again for a sender still heard ten minutes later.
    """
    from eliot import MemoryLogger
    from eliot.testing import swap_logger

    from kvresponder.log.discovery import HEARTBEAT_IGNORED
    harness = Harness(alone=True)
    logger = MemoryLogger()
    previous = swap_logger(logger)
    try:
        for _ in range(3):
            harness.receive(encode(want=True))
        harness.receive(encode(PEER._replace(node_id="n3")))
        harness.clock.advance(599)
        harness.receive(encode(want=True, at=NOW + 599))
        harness.clock.advance(1)
        harness.receive(encode(want=True, at=NOW + 600))
    finally:
        swap_logger(previous)
    harness.clock.advance(5)
    assert harness.metrics.results == ["insecure_ignored"] * 6
    assert harness.membership.peers() == []
    assert harness.transport.written == []
    warned = [message["peer"] for message in logger.messages
              if message.get("message_type") == HEARTBEAT_IGNORED.message_type]
    assert warned == ["n2", "n3", "n2"]
    assert tracebacks == []


def test_a_node_that_serves_alone_sends_no_heartbeat():
    """
    If the node serves alone, then its service sends nothing at start, on its interval, or when it stops:
    no other node, not even one started with --insecure-cluster, puts it in its ring.
    """
    harness = Harness(start=False, alone=True)
    listener = Listener()
    service = DiscoveryService(harness.protocol, listener, 1.0)
    service.startService()
    harness.clock.advance(10)
    service.stopService()
    assert listener.protocols == [harness.protocol]
    assert listener.transport.written == []


def test_want_reply_triggers_one_coalesced_reply_shortly():
    """
    If several joiners ask for a reply at once, then one announcement follows shortly after, not one per
    joiner and not before the short delay.
    """
    harness = Harness()
    for node in ("n2", "n3", "n4"):
        harness.receive(encode(PEER._replace(node_id=node), want=True))
    assert harness.transport.written == []
    harness.clock.advance(0.05)
    sent = harness.sent()
    assert [addr for _, addr in sent] == [(GROUP, PORT)]
    assert sent[0][0]["node"] == OWN.node_id
    harness.clock.advance(1)
    assert len(harness.transport.written) == 1
    harness.receive(encode(PEER._replace(node_id="n5"), want=True))
    harness.clock.advance(0.05)
    assert len(harness.transport.written) == 2


def test_without_a_group_the_reply_goes_to_each_asker_as_well_as_the_seeds_and_once():
    """
    If nodes ask for a reply while discovery has no multicast group (DNS only), then the one reply goes to each
    asker's advertised address as well as to the seeds (a new pod is not among this node's seeds until their
    next lookup, so it would hear no answer to its join); the next heartbeat goes to the seeds only. With a
    group, the reply goes to the group and the seeds alone.
    """
    harness = Harness(group=None)
    harness.protocol.use_seeds({"10.0.0.9"})
    for node, address in (("n2", "10.0.0.2"), ("n3", "10.0.0.3")):
        harness.receive(encode(PEER._replace(node_id=node, address=address), want=True))
    harness.clock.advance(0.05)
    assert sorted(addr for _, addr in harness.sent()) == [("10.0.0.2", PORT), ("10.0.0.3", PORT), ("10.0.0.9", PORT)]
    harness.transport.written.clear()
    harness.protocol.announce()
    assert [addr for _, addr in harness.sent()] == [("10.0.0.9", PORT)]


def test_leaving_node_asking_for_a_reply_gets_none():
    """
    If a leaving node's heartbeat asks for a reply, then no reply is sent.
    """
    harness = Harness()
    harness.receive(encode())
    harness.receive(encode(PEER._replace(state=LEAVING), want=True))
    harness.clock.advance(1)
    assert harness.transport.written == []


def oversized() -> bytes:
    body = body_of()
    body["padding"] = "x" * MAX_DATAGRAM
    return raw(body)


#: Marks a field ``mutated`` removes.
DELETE = object()


def mutated(**changes) -> bytes:
    body = body_of()
    for name, value in changes.items():
        if value is DELETE:
            del body[name]
        else:
            body[name] = value
    return raw(body)


DROPPED = [
    ("another tenant", encode(tenant="t2"), "foreign_tenant"),
    ("no tenant", mutated(tenant=DELETE), "foreign_tenant"),
    ("garbage", b"\x00\x01garbage\xfe", "malformed"),
    ("empty", b"", "malformed"),
    ("invalid utf-8", b'{"v":1,"tenant":"t1\xff\xfe"}', "malformed"),
    ("truncated json", encode()[:-5], "malformed"),
    ("json list", b"[1, 2, 3]", "malformed"),
    ("json number", b"1", "malformed"),
    ("json string", b'"t1"', "malformed"),
    ("json null", b"null", "malformed"),
    ("deep nesting", b'{"v":' + b"[" * 1390 + b"]" * 5, "malformed"),
    ("wrong wire version", mutated(v=2), "malformed"),
    ("wire version as text", mutated(v="1"), "malformed"),
    ("no wire version", mutated(v=DELETE), "malformed"),
    ("oversized", oversized(), "oversized"),
    ("no node", mutated(node=DELETE), "malformed"),
    ("empty node", mutated(node=""), "malformed"),
    ("long node", mutated(node="n" * 64), "malformed"),
    ("node not text", mutated(node=7), "malformed"),
    ("negative incarnation", mutated(inc=-1), "malformed"),
    ("incarnation as text", mutated(inc="4"), "malformed"),
    ("incarnation as bool", mutated(inc=True), "malformed"),
    ("incarnation as float", mutated(inc=4.0), "malformed"),
    ("no port", mutated(port=DELETE), "malformed"),
    ("port zero", mutated(port=0), "malformed"),
    ("port too high", mutated(port=65536), "malformed"),
    ("port as text", mutated(port="3001"), "malformed"),
    ("negative ring", mutated(ring=-1), "malformed"),
    ("ring as float", mutated(ring=2.5), "malformed"),
    ("unknown state", mutated(state="dead"), "malformed"),
    ("want as text", mutated(want="yes"), "malformed"),
    ("no address", mutated(addr=DELETE), "malformed"),
    ("host name address", mutated(addr="kv-0.kv"), "malformed"),
    ("short address", mutated(addr="10.0.2"), "malformed"),
    ("address as list", mutated(addr=[10, 0, 0, 2]), "malformed"),
    ("ring digest as number", mutated(members=7), "malformed"),
    ("empty ring digest", mutated(members=""), "malformed"),
    ("ring digest not hex", mutated(members="zz" * 8), "malformed"),
    ("long ring digest", mutated(members="0" * 33), "malformed"),
    ("joining flag as text", mutated(joining="yes"), "malformed"),
    ("joining flag as number", mutated(joining=1), "malformed"),
    ("settled digest as number", mutated(settled=7), "malformed"),
    ("settled digest as true", mutated(settled=True), "malformed"),
    ("empty settled digest", mutated(settled=""), "malformed"),
    ("settled digest not hex", mutated(settled="zz" * 8), "malformed"),
    ("long settled digest", mutated(settled="0" * 33), "malformed"),
    ("moving flag as text", mutated(moving="yes"), "malformed"),
    ("moving flag as number", mutated(moving=1), "malformed"),
]


@pytest.mark.parametrize("data, result", [(data, result) for _, data, result in DROPPED],
                         ids=[name for name, _, _ in DROPPED])
def test_datagram_that_is_not_a_valid_heartbeat_is_dropped_and_counted(data, result, tracebacks):
    """
    If a datagram is from another tenant, is not JSON, is not an object, has the wrong wire version, is
    oversized, or has a missing or mistyped field, then it is counted under its result, creates no peer,
    sends nothing and raises nothing.
    """
    harness = Harness()
    harness.receive(data)
    harness.clock.advance(1)
    assert harness.metrics.results == [result]
    assert harness.membership.peers() == []
    assert harness.transport.written == []
    assert tracebacks == []


def test_valid_heartbeat_just_under_the_size_limit_is_accepted():
    """
    If a valid heartbeat is exactly the maximum datagram size, then it is accepted.
    """
    body = body_of()
    body["padding"] = ""
    body["padding"] = "x" * (MAX_DATAGRAM - len(raw(body)))
    data = raw(body)
    assert len(data) == MAX_DATAGRAM
    harness = Harness()
    harness.receive(data)
    assert harness.metrics.results == ["accepted"]


# -- authenticated datagrams ---------------------------------------------------------------------------

def test_signed_heartbeat_with_the_cluster_key_is_accepted():
    """
    If a cluster key is set and a heartbeat is signed with it, then the sender becomes a peer.
    """
    harness = Harness(key=KEY)
    harness.receive(encode(key=KEY))
    assert harness.metrics.results == ["accepted"]
    assert harness.membership.peer("n2") is not None


def tampered() -> bytes:
    body = json.loads(encode(key=KEY))
    body["addr"] = "10.6.6.6"
    return raw(body)


AUTH_DROPPED = [
    ("unsigned", encode(), "bad_mac"),
    ("wrong key", encode(key=derive_key("another-secret-of-some-length", "discovery")), "bad_mac"),
    ("peer-call key", encode(key=derive_key("a-cluster-secret-of-some-length", "peer")), "bad_mac"),
    ("tampered after signing", tampered(), "bad_mac"),
    ("mac not text", mutated(mac=12, ts=NOW), "bad_mac"),
    ("mac not ascii", mutated(mac="é" * 64, ts=NOW), "bad_mac"),
    ("mac with a lone surrogate", mutated(mac="\ud800" * 64, ts=NOW), "bad_mac"),
    ("stale timestamp", encode(key=KEY, at=NOW - REPLAY_WINDOW - 1), "replayed"),
    ("future timestamp", encode(key=KEY, at=NOW + REPLAY_WINDOW + 1), "replayed"),
]


@pytest.mark.parametrize("data, result", [(data, result) for _, data, result in AUTH_DROPPED],
                         ids=[name for name, _, _ in AUTH_DROPPED])
def test_unauthenticated_or_stale_datagram_is_dropped(data, result, tracebacks):
    """
    If a cluster key is set and a datagram is unsigned, signed with another key, altered after signing, or
    signed outside the replay window, then it is counted as ``bad_mac`` or ``replayed`` and creates no peer.
    """
    harness = Harness(key=KEY)
    harness.receive(data)
    assert harness.metrics.results == [result]
    assert harness.membership.peers() == []
    assert tracebacks == []


def test_same_signed_datagram_twice_is_replayed_the_second_time():
    """
    If a signed datagram is received twice, then the second copy counts as ``replayed``; and a replay after
    the peer has timed out does not bring it back.
    """
    harness = Harness(key=KEY)
    data = encode(key=KEY, at=NOW)
    harness.receive(data)
    harness.receive(data)
    assert harness.metrics.results == ["accepted", "replayed"]
    short = Membership(harness.clock.seconds, OWN.node_id, 5.0)
    harness.protocol.membership = short
    harness.receive(encode(key=KEY, at=NOW + 1))
    harness.clock.advance(6)
    assert [peer.node_id for peer in short.expire()] == ["n2"]
    harness.receive(encode(key=KEY, at=NOW + 1))
    assert short.peers() == []
    assert harness.metrics.results[-1] == "replayed"


def test_later_signed_heartbeat_is_accepted_after_an_earlier_one():
    """
    If a peer's next signed heartbeat carries a later timestamp, then it is accepted; a new incarnation may
    start with any timestamp inside the window.
    """
    harness = Harness(key=KEY)
    harness.receive(encode(key=KEY, at=NOW))
    harness.receive(encode(key=KEY, at=NOW + 0.001))
    harness.receive(encode(PEER._replace(incarnation=5), key=KEY, at=NOW - 1))
    assert harness.metrics.results == ["accepted"] * 3
    assert harness.membership.peer("n2").incarnation == 5


# -- fuzzing -------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["t1", "alive", "leaving", "10.0.0.2", "n2", ""]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
FIELDS = st.sampled_from(["v", "tenant", "node", "inc", "addr", "port", "state", "ring", "want", "ts", "mac"])
JSONISH = st.one_of(
    st.dictionaries(FIELDS | st.text(max_size=6), JSON_VALUES, max_size=12),
    # Close to a real heartbeat: every field present, some replaced.
    st.dictionaries(FIELDS, JSON_VALUES, max_size=4).map(
        lambda changes: dict(json.loads(encode(key=KEY)), **changes)),
)


def received_once(harness: Harness, data: bytes) -> None:
    before = len(harness.metrics.results)
    harness.receive(data)
    assert len(harness.metrics.results) == before + 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_DATAGRAM + 100))
def test_arbitrary_bytes_never_raise_and_never_create_a_peer(data):
    """
    If arbitrary bytes arrive, then nothing raises, each datagram is counted once, and no peer appears.
    """
    with mock.patch.object(discovery, "write_traceback") as traceback:
        for key in (None, KEY):
            harness = Harness(key=key)
            received_once(harness, data)
            assert harness.membership.peers() == []
        assert not traceback.called


@settings(max_examples=300, deadline=None)
@given(JSONISH)
def test_arbitrary_json_objects_never_raise_and_never_create_a_phantom_peer(body):
    """
    If arbitrary JSON objects arrive, then nothing raises and each is counted once; with a cluster key no
    peer ever appears (a valid MAC cannot be guessed), and without one a peer appears only for an object
    that is a complete, valid heartbeat, with exactly what it says.
    """
    data = json.dumps(body).encode("utf-8")
    with mock.patch.object(discovery, "write_traceback") as traceback:
        signed = Harness(key=KEY)
        received_once(signed, data)
        assert signed.membership.peers() == [] or body == json.loads(encode(key=KEY))
        unsigned = Harness()
        received_once(unsigned, data)
        peers = unsigned.membership.peers()
        if peers:
            assert unsigned.metrics.results == ["accepted"]
            assert len(data) <= MAX_DATAGRAM
            (peer,) = peers
            assert (body["tenant"], body["node"], body["inc"], body["addr"], body["port"], body["state"]) == (
                "t1", peer.node_id, peer.incarnation, peer.address, peer.port, peer.state)
        assert not traceback.called


# -- the service ---------------------------------------------------------------------------------------

class Listener:
    """
    A fake ``listen``: connects the protocol to a fake transport and returns it as the port.
    """

    def __init__(self) -> None:
        self.transport = FakeMulticastTransport()
        self.protocols = []

    def __call__(self, protocol):
        self.protocols.append(protocol)
        protocol.makeConnection(self.transport)
        return self.transport


def make_service(resolve=None, dns_name=None, interval=5.0):
    harness = Harness(start=False)
    listener = Listener()
    service = DiscoveryService(harness.protocol, listener, interval, dns_name=dns_name, resolve=resolve,
                               dns_interval=10.0)
    return service, harness, listener


def wants(listener: Listener, to=GROUP):
    return [json.loads(data)["want"] for data, addr in listener.transport.written if addr == (to, PORT)]


def test_service_listens_and_announces_at_once_asking_for_replies():
    """
    If the service starts, then it listens through the injected ``listen``, announces at once asking for
    replies, asks once more shortly after, then heartbeats every interval without asking.
    """
    service, harness, listener = make_service()
    service.startService()
    assert listener.protocols == [harness.protocol]
    assert wants(listener) == [True]
    harness.clock.advance(0.25)
    assert wants(listener) == [True, True]
    harness.clock.advance(4.75)
    assert wants(listener) == [True, True, False]
    for _ in range(3):
        harness.clock.advance(5)
    assert wants(listener) == [True, True, False, False, False, False]
    service.stopService()


def test_service_expires_silent_peers():
    """
    If a peer stops sending heartbeats, then the running service forgets it within about a second after the
    peer timeout.
    """
    service, harness, listener = make_service()
    service.startService()
    harness.receive(encode())
    assert harness.membership.peer("n2") is not None
    harness.clock.pump([1] * int(PEER_TIMEOUT))
    assert harness.membership.peer("n2") is not None
    harness.clock.pump([1, 1])
    assert harness.membership.peer("n2") is None
    service.stopService()


def test_service_keeps_heartbeating_after_a_failing_round():
    """
    If one expiry round raises (a bug), then the loops keep running: later heartbeats are still sent.
    """
    service, harness, listener = make_service()
    with mock.patch.object(discovery, "write_traceback") as traceback:
        with mock.patch.object(harness.membership, "expire", side_effect=RuntimeError("bug")):
            service.startService()
            harness.clock.pump([1] * 11)
    assert traceback.called
    assert wants(listener).count(False) == 2
    service.stopService()


def test_refresh_seeds_uses_the_resolver_and_announces_to_new_seeds():
    """
    If the service starts with a DNS name, then it resolves it through the injected resolver, keeps the
    addresses as seeds and announces to every seed but itself, asking for replies.
    """
    names = []

    def resolve(name):
        names.append(name)
        return succeed(["10.0.0.7", OWN_ADDRESS])

    service, harness, listener = make_service(resolve=resolve, dns_name="kv-headless")
    service.startService()
    assert names == ["kv-headless"]
    assert harness.protocol.seeds == {"10.0.0.7", OWN_ADDRESS}
    assert wants(listener, to="10.0.0.7")[:1] == [True]
    assert wants(listener, to=OWN_ADDRESS) == []
    harness.clock.advance(10)
    assert names == ["kv-headless"] * 2
    service.stopService()


def test_seed_lookups_go_on_after_a_lookups_answer_fails_to_be_taken_in(eliot_logger):
    """
    If taking in one lookup's answer raises (a bug, after the lookup's Deferred has fired), then the error is
    logged and lookups go on every ``DNS_INTERVAL``: a LoopingCall whose Deferred fails stops for good, and the node
    would keep its first seeds forever.
    """
    names = []

    def resolve(name):
        names.append(name)
        return succeed(["10.0.0.%d" % (6 + len(names))])

    service, harness, _ = make_service(resolve=resolve, dns_name="kv-headless")
    with mock.patch.object(harness.protocol, "use_seeds", side_effect=RuntimeError("bug")):
        service.startService()
    assert len(eliot_logger.flush_tracebacks(RuntimeError)) == 1
    harness.clock.advance(10)
    harness.clock.advance(10)
    assert names == ["kv-headless"] * 3
    assert harness.protocol.seeds == {"10.0.0.9"}
    service.stopService()


def test_failed_seed_lookup_keeps_the_previous_seeds():
    """
    If a DNS lookup fails after a good one, then the previous seeds stay in use and lookups go on.
    """
    answers = [succeed(["10.0.0.7", "10.0.0.8"]), fail(OSError("SERVFAIL")), succeed(["10.0.0.9"])]
    service, harness, _ = make_service(resolve=lambda name: answers.pop(0), dns_name="kv-headless")
    service.startService()
    assert harness.protocol.seeds == {"10.0.0.7", "10.0.0.8"}
    harness.clock.advance(10)
    assert harness.protocol.seeds == {"10.0.0.7", "10.0.0.8"}
    harness.clock.advance(10)
    assert harness.protocol.seeds == {"10.0.0.9"}
    service.stopService()


def test_a_name_that_keeps_failing_is_logged_when_it_starts_failing_and_then_every_five_minutes(eliot_logger):
    """
    If the DNS seeds' name fails every lookup (no Service yet, a typo), then ``seeds-failed`` is logged at the first
    failure, at once for a new reason, and otherwise once every five minutes a reason with the number of failures
    since the last line: not every ``DNS_INTERVAL`` for as long as the node runs, even when two reasons alternate.
    After a lookup succeeds, the next failure is logged at once.
    """
    answers = {"next": lambda: fail(OSError("Name or service not known"))}
    service, harness, _ = make_service(resolve=lambda name: answers["next"](), dns_name="kv-headless")
    service.startService()

    def lines():
        return [(m["reason"], m["failures"]) for m in eliot_logger.messages
                if m.get("message_type") == "kvresponder:discovery:seeds-failed"]

    assert lines() == [("Name or service not known", 1)]
    harness.clock.pump([10] * 29)  # 290 s: 29 more failures
    assert lines() == [("Name or service not known", 1)]
    harness.clock.advance(10)
    assert lines()[1:] == [("Name or service not known", 30)]
    answers["next"] = lambda: fail(OSError("Temporary failure in name resolution"))
    harness.clock.advance(10)
    assert lines()[2:] == [("Temporary failure in name resolution", 1)]
    answers["next"] = lambda: fail(OSError("Name or service not known"))
    harness.clock.advance(10)
    assert lines()[3:] == []  # this reason was logged 20 s ago: an alternating pair is not a line each lookup
    answers["next"] = lambda: succeed(["10.0.0.7"])
    harness.clock.advance(10)
    answers["next"] = lambda: fail(OSError("Temporary failure in name resolution"))
    harness.clock.advance(10)
    assert lines()[3:] == [("Temporary failure in name resolution", 1)]
    service.stopService()


def test_resolver_that_raises_keeps_the_previous_seeds():
    """
    If the resolver raises instead of failing its Deferred, then the seeds are kept and nothing escapes.
    """
    def resolve(name):
        raise OSError("no resolver")

    service, harness, _ = make_service(resolve=resolve, dns_name="kv-headless")
    harness.protocol.seeds = {"10.0.0.7"}
    results = []
    service.refresh_seeds().addBoth(results.append)
    assert results == [None]
    assert harness.protocol.seeds == {"10.0.0.7"}


def test_stop_announces_leaving_twice_then_gone_twice_and_stops_listening():
    """
    If the service stops, then it sends two ``leaving`` heartbeats to the group and to each seed, then two
    ``gone`` ones, closes the port, and sends nothing afterwards.
    """
    service, harness, listener = make_service()
    service.startService()
    harness.protocol.seeds = {"10.0.0.7"}
    listener.transport.written.clear()
    service.stopService()
    sent = [(json.loads(data)["state"], addr) for data, addr in listener.transport.written]
    assert sent == ([(LEAVING, (GROUP, PORT)), (LEAVING, ("10.0.0.7", PORT))] * 2
                    + [(GONE, (GROUP, PORT)), (GONE, ("10.0.0.7", PORT))] * 2)
    assert listener.transport.stopped == 1
    listener.transport.written.clear()
    harness.clock.advance(60)
    assert listener.transport.written == []


def test_a_node_stopping_heartbeats_keeps_its_port_until_it_departs():
    """
    If the node stops heartbeating as its exit begins (``stop_heartbeats``), then it says ``leaving`` twice, sends
    no more heartbeats, and keeps the port; ``depart`` then says ``gone`` twice and closes it.
    """
    service, harness, listener = make_service()
    service.startService()
    listener.transport.written.clear()
    service.stop_heartbeats()
    harness.clock.advance(60)
    assert [json.loads(data)["state"] for data, _ in listener.transport.written] == [LEAVING, LEAVING]
    assert listener.transport.stopped == 0
    listener.transport.written.clear()
    service.depart()
    assert [json.loads(data)["state"] for data, _ in listener.transport.written] == [GONE, GONE]
    assert listener.transport.stopped == 1
    assert service.depart() is None


def test_a_departed_node_sends_nothing_more_not_even_an_answer_to_a_joiner_already_due():
    """
    If a joiner asks for answers just before the node departs, then the answer due 20 ms later is not sent after
    the ``gone`` pair (numbered above them, it would list the node again, as leaving, until the peer timeout);
    nothing else is sent either.
    """
    service, harness, listener = make_service()
    service.startService()
    service.stop_heartbeats()
    harness.receive(encode(want=True))
    listener.transport.written.clear()
    service.depart()
    harness.protocol.announce()
    harness.clock.advance(10)
    assert [json.loads(data)["state"] for data, _ in listener.transport.written] == [GONE, GONE]


def test_a_gone_heartbeat_adds_no_clock_sample():
    """
    If a peer's last heartbeat says it is gone, then it adds no sample of its clock's offset: the peer is
    forgotten, and its offset with it (``Node``), and a second ``gone`` heard after must not bring it back.
    """
    from kvresponder.clockskew import ClockOffsets

    offsets = ClockOffsets(lambda: NOW, 0.5, 15.0)
    harness = Harness(clock_offsets=offsets)
    harness.receive(encode(PEER._replace(state=GONE)))
    assert offsets.offsets() == {}
    harness.receive(encode())
    assert list(offsets.offsets()) == [PEER.node_id]


def test_a_heartbeat_signed_before_this_node_started_is_refused_as_a_replay():
    """
    If a node restarts and then receives a signed heartbeat captured before its restart (a peer that has left
    since), then it refuses it as replayed: the floors of sequence numbers that refused it before the restart
    were lost with the process, and the dead node would be back in its ring. One signed since the start passes.
    """
    codec = HeartbeatCodec("t1", KEY)
    captured = codec.encode(PEER, False, NOW, 10)
    from kvresponder.clockskew import ClockOffsets

    restarted = Harness(KEY, at=NOW + 20)
    restarted.protocol.max_clock_offset = 0.5
    restarted.protocol.clock_offsets = offsets = ClockOffsets(restarted.clock.seconds, 0.5, PEER_TIMEOUT)
    restarted.receive(captured)
    assert restarted.metrics.results == ["replayed"] and "n2" not in restarted.membership.ring_members()
    # Nor is its time measured: old samples would make the new node's own clock look wrong.
    assert "n2" not in offsets.offsets()
    restarted.receive(codec.encode(PEER, False, NOW + 20.2, 11))
    assert restarted.metrics.results == ["replayed", "accepted"] and "n2" in restarted.membership.ring_members()


def test_a_node_started_with_its_clock_ahead_and_set_right_since_takes_in_its_peers_heartbeats():
    """
    If a node starts with its clock an hour ahead, its peers' heartbeats look signed before it started and are
    refused; once its clock is set right, the next ones are taken in: when it started is its wall clock now less
    the time since on the reactor's clock, which does not step (it heard no peer for the hour, and served alone).
    """
    codec = HeartbeatCodec("t1", KEY)
    wall = [NOW + 3600.0]
    harness = Harness(KEY, wall=lambda: wall[0])
    harness.protocol.max_clock_offset = 0.5
    harness.receive(codec.encode(PEER, False, NOW + 0.1, 1))
    assert harness.metrics.results == ["replayed"] and "n2" not in harness.membership.ring_members()
    harness.clock.advance(5)
    wall[0] = NOW + 5.0
    harness.receive(codec.encode(PEER, False, NOW + 5.1, 2))
    assert harness.metrics.results == ["replayed", "accepted"] and "n2" in harness.membership.ring_members()


def test_a_dead_nodes_captured_heartbeats_replayed_after_a_restart_never_bring_it_back():
    """
    If a node restarts and then receives several signed heartbeats of a peer that has left since, captured before
    the restart, then it refuses every one as replayed: the first sets the incarnation's floor, and the rest, above
    it, must not pass for a live peer's (the dead node would be back in the ring until the peer timeout). Each but
    the first is measured (that is how a node whose own clock is far ahead learns it), none taken in.
    """
    from kvresponder.clockskew import ClockOffsets

    codec = HeartbeatCodec("t1", KEY)
    restarted = Harness(KEY, at=NOW + 20)
    restarted.protocol.max_clock_offset = 0.5
    restarted.protocol.clock_offsets = ClockOffsets(restarted.clock.seconds, 0.5, PEER_TIMEOUT)
    for number in range(10, 14):
        restarted.receive(codec.encode(PEER, False, NOW + (number - 10) * 0.5, number))
    assert restarted.metrics.results == ["replayed"] * 4
    assert "n2" not in restarted.membership.ring_members()
    # A live peer's heartbeat signed since the start is taken in, and its incarnation's later ones with it, even
    # should its clock step back before the start (its sequence numbers go on rising).
    restarted.receive(codec.encode(PEER, False, NOW + 20.2, 14))
    restarted.receive(codec.encode(PEER, False, NOW + 18.0, 15))
    assert restarted.metrics.results[4:] == ["accepted", "accepted"]
    assert "n2" in restarted.membership.ring_members()


def test_the_replay_floors_forget_the_longest_unheard_incarnations_first_never_all_at_once():
    """
    If more incarnations are heard than the floors keep (pods come and go for months), then the one unheard the
    longest is forgotten, not every floor at once: a live peer's floor stays, so its heartbeat captured a moment
    ago is still refused as replayed.
    """
    from kvresponder import discovery

    harness = Harness(key=KEY)
    codec = HeartbeatCodec("t1", KEY)
    harness.receive(codec.encode(PEER, False, NOW, 5))
    for number in range(discovery.MAX_FLOORS + 10):
        other = PEER._replace(node_id="x%d" % number, address="10.1.%d.%d" % (number // 250, number % 250 + 1))
        harness.receive(codec.encode(other, False, NOW, 1))
        if number % 100 == 0:
            harness.receive(codec.encode(PEER, False, NOW, 6 + number))  # the live peer, heard now and then
    assert len(harness.protocol._last_timestamps) <= discovery.MAX_FLOORS
    assert len(harness.protocol._taken) <= discovery.MAX_FLOORS
    del harness.metrics.results[:]
    harness.receive(codec.encode(PEER, False, NOW, 5))
    harness.receive(codec.encode(PEER._replace(node_id="x0", address="10.1.0.1"), False, NOW, 1))
    assert harness.metrics.results == ["replayed", "accepted"]


@pytest.mark.parametrize("field, value", [("ts", 10 ** 400), ("ts", -(10 ** 400)), ("addr", "0x7f.0.0.1"),
                                          ("addr", "10.0.0.2 junk"), ("addr", "010.0.0.2"), ("addr", "１0.0.0.2"),
                                          ("node", "\ud800n2"), ("node", "n2 x"), ("node", "-n2"), ("node", "n" * 64)],
                         ids=["ts-huge", "ts-huge-negative", "addr-hex", "addr-junk", "addr-octal", "addr-fullwidth",
                              "node-surrogate", "node-space", "node-dash-first", "node-too-long"])
def test_a_bad_timestamp_address_or_node_id_is_malformed_and_raises_nothing(field, value, eliot_logger):
    """
    If a datagram's time is an integer too large for a float, its address is not in IPv4's one dotted-decimal
    form (``inet_aton`` takes hex parts and a trailing word: ``0x7f.0.0.1`` would pass for a peer's address where
    the check for loopback looks for ``127.``), or its node id is not one a node may take (``NODE_ID``: a lone
    surrogate, taken in, made every later ring rebuild and every scrape fail), then it is counted ``malformed``
    and dropped, with no traceback.
    """
    harness = Harness()
    body = json.loads(encode())
    body[field] = value
    harness.receive(json.dumps(body).encode())
    assert harness.metrics.results == ["malformed"]
    assert harness.membership.peers() == []
    assert not [m for m in eliot_logger.messages if m.get("message_type") == "eliot:traceback"]


# -- a new pod that DNS does not list yet; misconfiguration ------------------------------------------------

def _messages(logger, type_name):
    return [m for m in logger.messages if m.get("message_type") == type_name]


def test_with_unicast_peers_heartbeats_reach_peers_the_seeds_do_not_list_and_an_asker_gets_its_answer_directly():
    """
    If DNS seeds are on (``unicast_peers``) and a peer is heard at an address the seeds do not list yet (a new pod
    whose record is not published, where multicast does not reach it), then the answer to its request and every
    later heartbeat go to its address too, besides the group and the seeds: otherwise it would hear no peer, serve
    alone in a ring of one, and time its peers out. Without the option, nothing goes to it.
    """
    for unicast, expected in ((True, [(GROUP, PORT), ("10.0.0.2", PORT), ("10.0.0.5", PORT)]),
                              (False, [(GROUP, PORT), ("10.0.0.5", PORT)])):
        harness = Harness(unicast_peers=unicast)
        harness.protocol.seeds = {"10.0.0.5"}
        harness.receive(encode(want=True))
        harness.clock.advance(0.05)  # the answer
        assert [addr for _, addr in harness.sent()] == expected, unicast
        del harness.transport.written[:]
        harness.protocol.announce()  # a later heartbeat
        assert [addr for _, addr in harness.sent()] == expected, unicast


def test_the_same_heartbeat_received_twice_by_two_ways_is_a_duplicate_not_a_replay():
    """
    If a signed heartbeat arrives twice with the same sequence number (to the group and to a DNS seed, in ``both``
    mode), then the second is counted ``duplicate``, not ``replayed`` (which tells an operator of old datagrams
    sent again); one with a lower number, or the same sent from another address, is still ``replayed``.
    """
    harness = Harness(key=KEY)
    codec = HeartbeatCodec("t1", KEY)
    harness.receive(codec.encode(PEER, False, NOW, 5))
    harness.receive(codec.encode(PEER, False, NOW, 5))
    harness.receive(codec.encode(PEER, False, NOW, 4))
    # The same heartbeat from another address: captured and sent again by someone else.
    harness.protocol.datagramReceived(codec.encode(PEER, False, NOW, 5), ("10.0.0.66", PORT))
    harness.receive(codec.encode(PEER, False, NOW + 0.5, 6))
    assert harness.metrics.results == ["accepted", "duplicate", "replayed", "replayed", "accepted"]


def test_an_outgoing_interface_that_cannot_be_set_sends_nothing_to_the_group_and_says_so(eliot_logger):
    """
    If the multicast interface cannot be set (an address that is not this host's), then no heartbeat goes to the
    group (the kernel would send it by the default route), the seeds still get theirs, and an error says why.
    """
    class NoSuchInterface(FakeMulticastTransport):
        def setOutgoingInterface(self, address):
            self.calls.append(("setOutgoingInterface", address))
            return fail(OSError(99, "Cannot assign requested address"))

        def joinGroup(self, address, interface=""):
            return fail(OSError(19, "No such device"))

    harness = Harness(start=False)
    harness.protocol.makeConnection(NoSuchInterface())
    harness.protocol.seeds = {"10.0.0.5"}
    harness.protocol.announce()
    assert [addr for _, addr in harness.protocol.transport.written] == [("10.0.0.5", PORT)]
    lines = _messages(eliot_logger, "kvresponder:discovery:multicast-failed")
    assert [line["interface"] for line in lines] == [OWN_ADDRESS] * 2
    assert "Cannot assign" in lines[0]["reason"] and lines[1]["reason"].startswith("joining " + GROUP)


def test_a_group_that_cannot_be_joined_still_gets_this_nodes_heartbeats_and_an_error_says_so(eliot_logger):
    """
    If the interface is set but the group cannot be joined, then heartbeats still go to the group (others may hear
    them) and an error says the join failed; an asker then gets its answer at its own address too.
    """
    class NoJoin(FakeMulticastTransport):
        def joinGroup(self, address, interface=""):
            return fail(OSError(105, "No buffer space available"))

    harness = Harness(start=False)
    harness.protocol.makeConnection(NoJoin())
    harness.protocol.announce()
    assert [addr for _, addr in harness.protocol.transport.written] == [(GROUP, PORT)]
    (line,) = _messages(eliot_logger, "kvresponder:discovery:multicast-failed")
    assert line["reason"].startswith("joining " + GROUP)


def test_heartbeats_that_fail_their_mac_are_dropped_and_said_once_in_ten_minutes_a_sender(eliot_logger):
    """
    If heartbeats of this tenant come signed with another secret, then each is dropped as ``bad_mac``, and a
    warning names the sender, once in ten minutes (a node with a wrong CLUSTER_SECRET otherwise looked healthy,
    alone in its ring, with nothing in any log).
    """
    harness = Harness(key=KEY)
    other = derive_key("another-secret-of-some-length", "discovery")
    for _ in range(3):
        harness.receive(encode(key=other))
    harness.clock.advance(discovery.UNAUTHENTICATED_LOG_EVERY)
    harness.receive(encode(key=other))
    assert harness.metrics.results == ["bad_mac"] * 4
    assert [m["source"] for m in _messages(eliot_logger, "kvresponder:discovery:heartbeat-unauthenticated")] == [
        "10.0.0.2:%d" % (PORT,)] * 2


def test_a_heartbeat_of_another_node_under_this_nodes_id_is_counted_and_said_once_a_minute(eliot_logger):
    """
    If a heartbeat names this node's id with another incarnation (a second node started with the same NODE_ID),
    then it is counted ``id_taken``, not ``self``, and a warning says so at most once a minute; this node's own
    heartbeats coming back stay ``self``.
    """
    harness = Harness()
    impostor = OWN._replace(incarnation=OWN.incarnation + 1, address="10.0.0.9")
    harness.receive(encode(OWN))
    harness.receive(encode(impostor))
    harness.receive(encode(impostor))
    assert harness.metrics.results == ["self", "id_taken", "id_taken"]
    assert len(_messages(eliot_logger, "kvresponder:discovery:node-id-taken")) == 1
    harness.clock.advance(discovery.ID_TAKEN_LOG_EVERY)
    harness.receive(encode(impostor))
    assert len(_messages(eliot_logger, "kvresponder:discovery:node-id-taken")) == 2
    assert harness.membership.peers() == []


def test_a_peer_on_another_host_that_says_it_is_at_loopback_is_dropped_and_said_once_a_minute(eliot_logger):
    """
    If a heartbeat from another host gives a loopback address (a node started without ADVERTISE_ADDRESS), then it is
    dropped as ``bad_address`` with a warning, at most once a minute: taken in, this node would send that peer's
    copies to itself, and acknowledge writes with one real copy. From loopback (the local cluster), it is taken.
    """
    harness = Harness()
    at_loopback = PEER._replace(address="127.0.0.1")
    harness.receive(encode(at_loopback))
    harness.receive(encode(at_loopback))
    assert harness.membership.peers() == []
    harness.protocol.datagramReceived(encode(at_loopback), ("127.0.0.1", PORT))
    assert harness.metrics.results == ["bad_address", "bad_address", "accepted"]
    assert [m["peer"] for m in _messages(eliot_logger, "kvresponder:discovery:peer-at-loopback")] == ["n2"]
    harness.clock.advance(60.0)
    harness.receive(encode(at_loopback))
    assert [m["peer"] for m in _messages(eliot_logger, "kvresponder:discovery:peer-at-loopback")] == ["n2", "n2"]


def test_warnings_about_senders_are_at_most_a_few_a_minute_whatever_the_senders_and_each_kind_its_own(eliot_logger):
    """
    If datagrams with forged sources flood a node (heartbeats of the tenant with a wrong MAC, each from another
    address), then each is dropped, but at most WARNINGS_A_MINUTE warnings a minute say so; a flood of one kind takes
    nothing from another kind's, and the next minute warns again.
    """
    harness = Harness(key=KEY)
    other = derive_key("another-secret-of-some-length", "discovery")
    for index in range(500):
        harness.protocol.datagramReceived(encode(key=other), ("10.1.%d.%d" % (index // 250, index % 250), PORT))
    harness.protocol.datagramReceived(encode(OWN._replace(incarnation=9), key=KEY), ("10.0.0.9", PORT))
    assert harness.metrics.results.count("bad_mac") == 500
    assert len(_messages(eliot_logger, "kvresponder:discovery:heartbeat-unauthenticated")) == discovery.WARNINGS_A_MINUTE
    assert len(_messages(eliot_logger, "kvresponder:discovery:node-id-taken")) == 1
    harness.clock.advance(60.0)
    harness.protocol.datagramReceived(encode(key=other), ("10.2.0.1", PORT))
    assert len(_messages(eliot_logger, "kvresponder:discovery:heartbeat-unauthenticated")) == (
        discovery.WARNINGS_A_MINUTE + 1)
