"""
Zero-configuration discovery: heartbeats over UDP multicast, plus unicast to DNS seeds.

The wire format is a small JSON object, versioned by ``"v"``. With a cluster secret, each datagram also
carries a timestamp and an HMAC-SHA256 over everything else; a bad MAC, a stale timestamp or a replayed one
is dropped. Every datagram that is not ours (another tenant, garbage, too large) is counted under
``kv_discovery_messages_total{result}`` and dropped: nothing raises out of ``datagramReceived``.

The protocol feeds :class:`~kvresponder.membership.Membership` and nothing else.
"""

import hashlib
import hmac
import ipaddress
import json
import math
import socket
import threading
from typing import Callable, Dict, List, Optional, Set, Tuple

from attr import attrib, attrs
from eliot import write_failure, write_traceback
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from .clockskew import RECOVER_SHARE, start_time
from .hlc import NODE_ID_PATTERN
from .log.discovery import (CLOCK_AHEAD, DATAGRAM_DROPPED, DISCOVERY_STARTED, HEARTBEAT_IGNORED,
                            HEARTBEAT_UNAUTHENTICATED, MULTICAST_FAILED, NODE_ID_TAKEN, PEER_AT_LOOPBACK, SEEDS_FAILED,
                            SEEDS_RESOLVED)
from .membership import ALIVE, GONE, LEAVING, Heartbeat, Membership

WIRE_VERSION = 1
MAX_DATAGRAM = 1400
#: Seconds a signed datagram's timestamp may differ from our clock (plus MAX_CLOCK_OFFSET, which clocks may
#: differ by).
REPLAY_WINDOW = 30.0
#: Seconds between two log lines about one peer's heartbeats refused for a clock ahead of ours.
CLOCK_AHEAD_LOG_EVERY = 60.0
#: Seconds between two log lines about one sender's heartbeats that failed their HMAC.
UNAUTHENTICATED_LOG_EVERY = 600.0
#: Seconds between two log lines about one peer's heartbeats ignored by a node that serves alone.
IGNORED_LOG_EVERY = 600.0
#: Seconds between two log lines about another node sending under this node's id.
ID_TAKEN_LOG_EVERY = 60.0
#: The most warnings of one kind about senders (heartbeats unauthenticated or ignored, ids taken, loopback addresses)
#: a minute.
WARNINGS_A_MINUTE = 8
_HEX = frozenset("0123456789abcdef")


def interface_problem(address: str) -> Optional[str]:
    """
    Why multicast cannot be sent out of the interface of ``address``, or ``None``: it must be an IPv4 address of
    this host, not the wildcard (with which the kernel picks the interface by its routes, and the default route
    may lead out of the host).
    """
    if address == "0.0.0.0":
        return "0.0.0.0 names no interface"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError as error:
        return "%s is not an address of this host (%s)" % (address, error.strerror or error)
    return None


class Malformed(ValueError):
    def __init__(self, result: str, detail: str) -> None:
        ValueError.__init__(self, detail)
        self.result = result


def derive_key(secret: str, purpose: str) -> bytes:
    """
    A key for one purpose (``discovery``, ``peer``), so that one leaked derived key does not open the other.
    """
    return hmac.new(secret.encode("utf-8"), b"kvresponder:" + purpose.encode("ascii"), hashlib.sha256).digest()


class HeartbeatCodec:
    """
    Encodes and checks discovery datagrams for one tenant.

    :param str tenant: datagrams of other tenants are refused.
    :param key: the HMAC key, or ``None`` for unauthenticated datagrams.
    """

    def __init__(self, tenant: str, key: Optional[bytes] = None) -> None:
        self.tenant = tenant
        self._key = key

    @property
    def authenticated(self) -> bool:
        return self._key is not None

    def encode(self, beat: Heartbeat, want_reply: bool, now: float, sequence: Optional[int] = None) -> bytes:
        """
        :param sequence: the heartbeat's number among those this incarnation sent (``seq``), which only grows
            whatever the sender's wall clock does: receivers refuse a signed heartbeat whose number is not above
            the last they took in, rather than one whose time is not.
        """
        body = {
            "v": WIRE_VERSION, "tenant": self.tenant, "node": beat.node_id, "inc": beat.incarnation,
            "addr": beat.address, "port": beat.port, "state": beat.state, "ring": beat.ring_size,
            "want": want_reply,
        }
        # The sender's clock, always: receivers measure clock offsets from it (kvresponder.clockskew).
        body["ts"] = round(now, 3)
        if sequence is not None:
            body["seq"] = sequence
        if beat.ring_digest is not None:
            body["members"] = beat.ring_digest
        if beat.joining:
            # Only while true: older nodes read none, and take none for false.
            body["joining"] = True
        if beat.settled is not None:
            # Only once true, as ``joining``.
            body["settled"] = beat.settled
        if beat.moving:
            body["moving"] = True
        if self._key is not None:
            body["mac"] = self._mac(body)
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")

    def _mac(self, body: dict) -> str:
        signed = json.dumps({k: v for k, v in body.items() if k != "mac"}, separators=(",", ":"),
                            sort_keys=True).encode("utf-8")
        return hmac.new(self._key, signed, hashlib.sha256).hexdigest()

    def decode(self, data: bytes) -> Tuple[Heartbeat, bool, Optional[float]]:
        """
        :return: the heartbeat, whether the sender wants an answer, and its timestamp (see
            :meth:`decode_sequenced`).
        """
        return self.decode_sequenced(data)[:3]

    def decode_sequenced(self, data: bytes) -> Tuple[Heartbeat, bool, Optional[float], Optional[int]]:
        """
        :return: the heartbeat, whether the sender wants an answer, and its timestamp (or ``None`` if it sent
            none). With a key, the timestamp is signed, but not checked against our clock: the protocol
            measures the sender's clock offset from it first. Last, its sequence number (``seq``), or ``None``
            from a node older than that field.
        :raises Malformed: with ``result`` naming the metric outcome.
        """
        if len(data) > MAX_DATAGRAM:
            raise Malformed("oversized", "%d bytes" % (len(data),))
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise Malformed("malformed", "not JSON")
        if not isinstance(body, dict) or body.get("v") != WIRE_VERSION:
            raise Malformed("malformed", "unknown wire version")
        if body.get("tenant") != self.tenant:
            raise Malformed("foreign_tenant", "tenant %r" % (str(body.get("tenant"))[:64],))
        if self._key is not None:
            mac = body.get("mac")
            # compare_digest raises TypeError on non-ASCII text: a forged MAC must count as bad_mac, not crash.
            if not isinstance(mac, str) or not mac.isascii() or not hmac.compare_digest(mac, self._mac(body)):
                raise Malformed("bad_mac", "bad or missing MAC")
        timestamp = body.get("ts")
        # Signed heartbeats must carry their time; unsigned ones from older nodes may not.
        if (timestamp is not None or self._key is not None) and not _is_time(timestamp):
            raise Malformed("replayed" if self._key is not None else "malformed", "bad or missing timestamp")
        node, inc, addr, port = body.get("node"), body.get("inc"), body.get("addr"), body.get("port")
        state, ring, want = body.get("state"), body.get("ring"), body.get("want", False)
        # The pattern a node's own id must match (NODE_ID): a lone surrogate, say, would be taken in as a peer
        # whose id cannot be encoded, and every ring built after it, and every scrape, would fail.
        if not (isinstance(node, str) and NODE_ID_PATTERN.match(node)):
            raise Malformed("malformed", "bad node id")
        if type(inc) is not int or inc < 0:
            raise Malformed("malformed", "bad incarnation")
        if type(port) is not int or not 0 < port < 65536:
            raise Malformed("malformed", "bad port")
        if type(ring) is not int or ring < 0:
            raise Malformed("malformed", "bad ring size")
        if state not in (ALIVE, LEAVING, GONE) or not isinstance(want, bool):
            raise Malformed("malformed", "bad state")
        if not _is_ipv4(addr):
            raise Malformed("malformed", "bad address")
        sequence = body.get("seq")
        if sequence is not None and (type(sequence) is not int or sequence < 0):
            raise Malformed("malformed", "bad sequence number")
        members = body.get("members")
        if members is not None and not _is_digest(members):
            raise Malformed("malformed", "bad ring digest")
        joining = body.get("joining", False)
        if not isinstance(joining, bool):
            raise Malformed("malformed", "bad joining flag")
        settled = body.get("settled")
        if settled is not None and not _is_digest(settled):
            raise Malformed("malformed", "bad settled ring digest")
        moving = body.get("moving", False)
        if not isinstance(moving, bool):
            raise Malformed("malformed", "bad moving flag")
        return (Heartbeat(node, inc, addr, port, state, ring, members, joining, settled, moving), want, timestamp,
                sequence)


#: Incarnations whose floors (and last sequence numbers taken) a node keeps: the most recently heard, so that a
#: cluster's churn of pods over months forgets the dead ones, never a live peer's.
MAX_FLOORS = 4096


def _remember(floors: dict, slot, value) -> None:
    # Moved to the end on every update (a dict keeps its order of insertion): the first is the longest unheard.
    floors.pop(slot, None)
    floors[slot] = value
    if len(floors) > MAX_FLOORS:
        del floors[next(iter(floors))]


def _is_digest(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 32 and all(c in _HEX for c in value)


def _is_time(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        # An integer past a float's range: isfinite converts it first.
        return False


def _is_ipv4(value) -> bool:
    """
    Whether ``value`` is an IPv4 address in its one dotted-decimal form: ``inet_aton`` also takes ``0x7f.0.0.1``
    and a trailing word, which a receiver's check for a loopback address (by its ``127.``) would not see.
    """
    if not isinstance(value, str) or not value.isascii():
        return False
    try:
        return str(ipaddress.IPv4Address(value)) == value
    except ValueError:
        return False


class DiscoveryProtocol(DatagramProtocol):
    """
    Sends this node's heartbeats and feeds the peers' into membership.

    :param codec: a :class:`HeartbeatCodec`.
    :param membership: the table to feed.
    :param clock: an ``IReactorTime`` (``callLater``, ``seconds``).
    :param wall: returns wall time in seconds, for signed timestamps.
    :param own_heartbeat: returns this node's current :class:`Heartbeat`.
    :param group: the multicast group, or ``None`` when multicast is off.
    :param str interface: the outgoing multicast interface address; always set explicitly.
    :param int port: the discovery port, where peers listen.
    :param metrics: receives ``discovery(result)`` and ``clock_rejected(source)``.
    :param clock_offsets: a :class:`~kvresponder.clockskew.ClockOffsets` measuring the peers' clocks from the
        heartbeats' timestamps, or ``None``.
    :param float max_clock_offset: a heartbeat whose time is further ahead of ``wall`` than twice this is refused
        (after its offset is measured): no node takes in a peer whose clock runs ahead of the cluster's.
    :param bool alone: the node serves alone (no CLUSTER_SECRET, no --insecure-cluster): it sends no heartbeat
        and ignores every one it receives (``insecure_ignored``), so that no node puts it in its ring.
    :param stalls: a :class:`~kvresponder.stalls.StallWatch`, ticked by :class:`DiscoveryService`: a heartbeat
        read while it says this node was just stalled is taken in, but its time is no sample of its sender's
        clock (it waited in the socket); or ``None``, to measure every heartbeat.
    :param bool unicast_peers: with DNS seeds: also send heartbeats (and answers to a node that asks for one) to
        the peers heard from at addresses the seeds do not list. A seed list names a new pod only once its DNS
        record is published and looked up again, and multicast may not reach it: until then, only what is sent
        to its address reaches it, and it would otherwise hear no peer, serve alone, and time its peers out.
    """

    def __init__(self, codec: HeartbeatCodec, membership: Membership, clock, wall: Callable[[], float],
                 own_heartbeat: Callable[[], Heartbeat], group: Optional[str], interface: str, port: int,
                 ttl: int = 1, metrics=None, clock_offsets=None, max_clock_offset: Optional[float] = None,
                 alone: bool = False, stalls=None, unicast_peers: bool = False) -> None:
        self.codec = codec
        self.membership = membership
        self.clock = clock
        self.wall = wall
        self.own_heartbeat = own_heartbeat
        self.group = group
        self.interface = interface
        self.port = port
        self.ttl = ttl
        self.metrics = metrics
        self.clock_offsets = clock_offsets
        self.max_clock_offset = max_clock_offset
        self.stalls = stalls
        self.unicast_peers = unicast_peers
        #: Whether heartbeats go to the group: not if the outgoing interface could not be set.
        self._to_group = group is not None
        #: When a warning was last logged, by its kind and what it is about (a sender's address, a node id); and each
        #: kind's minute so far: when it began and how many it logged.
        self._warned: Dict[str, Dict[str, float]] = {}
        self._warnings: Dict[str, Tuple[float, int]] = {}
        self.seeds: Set[str] = set()
        self._reply_pending = None
        #: Without a multicast group, or with ``unicast_peers``, the nodes that asked for an answer: it goes to each
        #: of them too, since this node's DNS seeds name a new pod only from their next lookup.
        self._reply_to: Set[str] = set()
        self._last_timestamps: Dict[Tuple[str, int], float] = {}
        #: The sequence number of the last heartbeat taken in from each incarnation (``None`` from a node older
        #: than them): the same one again is a ``duplicate`` (it came by two ways), any other at or below the floor a
        #: ``replayed``. An incarnation in it has been taken in since this node started.
        self._taken: Dict[Tuple[str, int], Optional[int]] = {}
        #: When this node started, by its wall clock as it reads now (:func:`~kvresponder.clockskew.start_time`):
        #: its floors of sequence numbers (above) begin empty, so a signed heartbeat from before then may be one it
        #: took before a restart, captured and sent again.
        self._start_time = start_time(wall, clock.seconds)
        self._ahead_logged: Dict[str, float] = {}
        #: The peers whose last heartbeat was refused for a clock too far ahead.
        self._ahead: Dict[str, bool] = {}
        self.alone = alone
        #: Heartbeats this incarnation sent: each carries the next number (``seq``).
        self._sent = 0
        #: Whether this node has said it is gone (:meth:`depart`): it sends nothing after.
        self._departed = False

    # -- sending --------------------------------------------------------------------------------------

    def startProtocol(self):
        if self.group is None:
            return None
        # Never let the kernel pick the interface: its default route may lead out of the host. An interface that
        # cannot be set (not an address of this host) stops the heartbeats to the group, not just this call.
        try:
            outgoing = self.transport.setOutgoingInterface(self.interface)
        except Exception:
            outgoing = fail()
        outgoing.addErrback(self._multicast_failed)
        self.transport.setTTL(self.ttl)
        self.transport.setLoopbackMode(True)
        joined = self.transport.joinGroup(self.group, self.interface)
        joined.addErrback(self._join_failed)
        return joined

    def _multicast_failed(self, failure) -> None:
        if self._to_group:
            self._to_group = False
            MULTICAST_FAILED.log(interface=self.interface, reason=str(failure.value)[:200])

    def _join_failed(self, failure) -> None:
        # Heartbeats still go to the group on the interface set; this node hears none of its peers' there.
        MULTICAST_FAILED.log(interface=self.interface, reason="joining %s: %s" % (self.group, str(failure.value)[:200]))

    def use_seeds(self, addresses: Set[str]) -> bool:
        """
        Send heartbeats to ``addresses`` (a DNS seed's A records) from now on, besides the multicast group.

        :return: whether any of them is new.
        """
        new = bool(addresses - self.seeds)
        self.seeds = set(addresses)
        return new

    def announce(self, want_reply: bool = False, state: Optional[str] = None) -> None:
        """
        Send one heartbeat to the group and to every seed, with this node's own state (alive, or leaving
        while it drains) unless ``state`` overrides it.
        """
        if self.alone or self._departed:
            return
        beat = self.own_heartbeat()
        if state is not None and state != beat.state:
            beat = beat._replace(state=state)
        self._sent += 1
        data = self.codec.encode(beat, want_reply, self.wall(), self._sent)
        targets = []
        if self._to_group:
            targets.append(self.group)
        unicast = self.seeds | self._reply_to
        if self.unicast_peers:
            unicast = unicast | {peer.address for peer in self.membership.alive_peers()}
        targets.extend(sorted(unicast - {beat.address}))
        self._reply_to = set()
        for address in targets:
            self._send(data, address)

    def _send(self, data: bytes, address: str) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, (address, self.port))
        except Exception:
            # A full socket buffer or an unreachable seed loses one heartbeat; the next one follows.
            if self.metrics is not None:
                self.metrics.discovery("send_failed")

    # -- receiving ------------------------------------------------------------------------------------

    def datagramReceived(self, data: bytes, address) -> None:
        try:
            self._received(data, address)
        except Exception:
            write_traceback()

    def _received(self, data: bytes, address) -> None:
        try:
            beat, want_reply, timestamp, sequence = self.codec.decode_sequenced(data)
        except Malformed as error:
            self._drop(error.result, str(error), address)
            if error.result == "bad_mac":
                self._warn("unauthenticated", address[0], UNAUTHENTICATED_LOG_EVERY,
                           lambda: HEARTBEAT_UNAUTHENTICATED.log(source="%s:%s" % tuple(address[:2])))
            return
        if beat.node_id == self.membership.node_id:
            if beat.incarnation != self.own_heartbeat().incarnation:
                # Another process with this node's id: its peers keep one of the two, whichever spoke last.
                self._drop("id_taken", "another node sends under this node's id", address)
                self._warn("id_taken", beat.node_id, ID_TAKEN_LOG_EVERY, lambda: NODE_ID_TAKEN.log(
                    source="%s:%s" % tuple(address[:2]), incarnation=beat.incarnation))
                return
            # Our own heartbeat, back through multicast loopback: counted (the contract has "self"), not fed.
            if self.metrics is not None:
                self.metrics.discovery("self")
            return
        if self.alone:
            self._ignore(beat, address)
            return
        if beat.address.startswith("127.") and not str(address[0]).startswith("127."):
            # A peer on another host that says it is at loopback (started without ADVERTISE_ADDRESS): taken in, this
            # node would send that peer's copies to itself.
            self._drop("bad_address", "a loopback address from %s" % (address[0],), address)
            self._warn("bad_address", beat.node_id, ID_TAKEN_LOG_EVERY, lambda: PEER_AT_LOOPBACK.log(
                peer=beat.node_id, source="%s:%s" % tuple(address[:2])))
            return
        first = unproven = False
        if timestamp is not None and self.codec.authenticated:
            # A signed heartbeat is taken once: one resent later (captured on the network) would otherwise feed
            # a stale time into the clock offsets below. Told by its sequence number where it has one: by its
            # time, a sender whose wall clock stepped back would have every heartbeat dropped until its clock
            # caught up again, and fall out of every ring meanwhile.
            slot = (beat.node_id, beat.incarnation)
            order = sequence if sequence is not None else timestamp
            first = slot not in self._last_timestamps
            unproven = slot not in self._taken
            last = self._last_timestamps.get(slot, -1.0)
            if order <= last:
                if sequence is not None and self._taken.get(slot) == order and address[0] == beat.address:
                    # The heartbeat just taken, again, from its sender, by another way: to the group and to a seed,
                    # or to two seeds that name this node. (One refused for its time and sent again, or sent again
                    # from another address, is a replay.)
                    self._drop("duplicate", "sequence number already taken", address)
                else:
                    self._drop("replayed", "%s not above the last one" % (
                        "sequence number" if sequence is not None else "timestamp",), address)
                return
            # The floor is set before the checks on its time, so that a heartbeat refused for it (a clock far
            # ahead) cannot be sent again to be measured again, nor taken in once real time has come close to
            # it. A sender whose clock is then set right is not locked out: its sequence numbers go on rising
            # (only a node older than them, which sends none, is kept out until real time passes its last).
            _remember(self._last_timestamps, slot, order)
        # Signed before this node started, by more than two clocks within the bound can differ, and nothing of its
        # incarnation taken in since: the floor that would tell it from a replay was lost with the previous process.
        # Taken in, a dead node's last heartbeats, captured and sent again, would put it back in the ring (its
        # first sets the floor, and the next are above it). A live peer's next heartbeats, signed after the start,
        # are taken.
        before_start = (unproven and self.max_clock_offset is not None
                        and timestamp < self._start_time() - 2 * self.max_clock_offset)
        if before_start and first:
            # Not even measured: one alone, captured long ago, would make this node's own clock look wrong.
            self._drop("replayed", "signed before this node started", address)
            return
        if timestamp is not None:
            offset = timestamp - self.wall()
            # Measured before the checks on the time itself: a clock far off is exactly what must show (a node
            # started with its own clock an hour ahead hears every peer's heartbeats as signed before it started,
            # and this is how it learns that its clock is wrong). Not when it may have waited unread while this
            # node was stalled: it would say the sender's clock is behind by as long, and a burst of them that
            # this node's own is ahead.
            if (self.clock_offsets is not None and beat.state != GONE
                    and (self.stalls is None or self.stalls.fresh())):
                self.clock_offsets.heard(beat.node_id, beat.incarnation, offset)
            if before_start:
                self._drop("replayed", "signed before this node started", address)
                return
            # Refused past twice the bound: a node that far ahead of this one cannot be within the bound of a
            # cluster this node is within the bound of, while two nodes each within the bound of the cluster (up
            # to twice the bound apart) always take each other in.
            # Once refused, a peer is taken in again only below RECOVER_SHARE of that: a clock that sits near the
            # line (or drifts across it) would otherwise have some heartbeats taken and some refused, and the peer
            # would leave the ring and join it again, each time with a pass, as the delays of its datagrams varied.
            limit = 2 * self.max_clock_offset if self.max_clock_offset is not None else None
            if limit is not None and beat.node_id in self._ahead:
                limit *= RECOVER_SHARE
            if limit is not None and offset <= limit:
                self._ahead.pop(beat.node_id, None)
            elif limit is not None:
                _remember(self._ahead, beat.node_id, True)
                now = self.clock.seconds()
                if now - self._ahead_logged.get(beat.node_id, float("-inf")) >= CLOCK_AHEAD_LOG_EVERY:
                    # Once a minute a peer: its every heartbeat would be a line.
                    if len(self._ahead_logged) > 4096:
                        self._ahead_logged.clear()
                    self._ahead_logged[beat.node_id] = now
                    CLOCK_AHEAD.log(peer=beat.node_id, offset=round(offset, 6))
                if self.metrics is not None:
                    self.metrics.clock_rejected("heartbeat")
                self._drop("clock_ahead", "its clock is %.3f s ahead of ours" % (offset,), address)
                return
            if self.codec.authenticated and abs(offset) > REPLAY_WINDOW + (self.max_clock_offset or 0.0):
                self._drop("replayed", "timestamp outside the replay window", address)
                return

        if self.metrics is not None:
            self.metrics.discovery("accepted")
        if timestamp is not None and self.codec.authenticated:
            _remember(self._taken, (beat.node_id, beat.incarnation), sequence)
        self.membership.observe(beat)
        if want_reply and beat.state == ALIVE:
            if (not self._to_group or self.unicast_peers) and len(self._reply_to) < 256:
                self._reply_to.add(beat.address)
            self._schedule_reply()

    def depart(self) -> None:
        """
        Say, twice (datagrams get lost), that this node is gone, and send nothing after: not even an answer to a
        joiner already due, which, numbered above them, would list this node again, as leaving, until the peer
        timeout.
        """
        if self._reply_pending is not None and self._reply_pending.active():
            self._reply_pending.cancel()
        self._reply_pending = None
        self.announce(state=GONE)
        self.announce(state=GONE)
        self._departed = True

    def _drop(self, result: str, detail: str, address) -> None:
        if self.metrics is not None:
            self.metrics.discovery(result)
        DATAGRAM_DROPPED.log(reason="%s: %s" % (result, detail), source="%s:%s" % tuple(address[:2]))

    def _warn(self, kind: str, about: str, every: float, log: Callable[[], None]) -> None:
        """
        ``log()``, unless the warning of this ``kind`` ``about`` this sender was logged less than ``every`` seconds
        ago, or this kind has had its :data:`WARNINGS_A_MINUTE` already: a line a datagram would flood the log, and
        so would one a sender, from datagrams with forged sources.
        """
        now = self.clock.seconds()
        warned = self._warned.setdefault(kind, {})
        if now - warned.get(about, float("-inf")) < every:
            return
        started, count = self._warnings.get(kind, (now, 0))
        if now - started >= 60.0:
            started, count = now, 0
        if count >= WARNINGS_A_MINUTE:
            return
        self._warnings[kind] = (started, count + 1)
        if len(warned) > 4096:
            warned.clear()
        warned[about] = now
        log()

    def _ignore(self, beat: Heartbeat, address) -> None:
        self._drop("insecure_ignored", "no CLUSTER_SECRET: this node serves alone", address)
        self._warn("insecure_ignored", beat.node_id, IGNORED_LOG_EVERY, lambda: HEARTBEAT_IGNORED.log(
            peer=beat.node_id, source="%s:%s" % tuple(address[:2])))

    def _schedule_reply(self) -> None:
        # Answer a joining node at once, but only once for a burst of joiners.
        if self._reply_pending is None or not self._reply_pending.active():
            self._reply_pending = self.clock.callLater(0.02, self.announce)


#: Seconds between two ``seeds-failed`` lines while the DNS seeds keep failing for the same reason.
SEEDS_FAILED_REPEAT = 300.0


@attrs(slots=True)
class _SeedFailures:
    """
    While lookups of the DNS seeds fail: when each reason was last logged, and the failures since the last line.
    """
    logged: Dict[str, float] = attrib(factory=dict)
    failures: int = attrib(default=0)


class DiscoveryService(Service):
    """
    Runs a :class:`DiscoveryProtocol`: listens, announces at once, then heartbeats, expires silent peers and
    refreshes DNS seeds, all on the injected clock. On stop it announces that the node is leaving.

    :param listen: ``listen(protocol)`` opens the UDP port (``reactor.listenMulticast`` with
        ``listenMultiple=True``) and returns the port.
    :param resolve: ``resolve(name)`` returns a Deferred list of IPv4 addresses, or ``None`` without seeds.
    """

    def __init__(self, protocol: DiscoveryProtocol, listen: Callable, heartbeat_interval: float,
                 dns_name: Optional[str] = None, resolve: Optional[Callable[[str], Deferred]] = None,
                 dns_interval: float = 10.0, mode: str = "both") -> None:
        self.protocol = protocol
        self._listen = listen
        self.heartbeat_interval = heartbeat_interval
        self.dns_name = dns_name
        self._resolve = resolve
        self.dns_interval = dns_interval
        self.mode = mode
        self._port = None
        self._loops: List[LoopingCall] = []
        #: While lookups fail: what was logged of them.
        self._seeds_failing = _SeedFailures()

    def privilegedStartService(self):
        # The port is opened before any service starts: one another process holds fails the start there, with the
        # client port's failure (KVResponderService), before this node says a word to its peers.
        Service.privilegedStartService(self)
        if self._port is None:
            self._port = self._listen(self.protocol)

    def startService(self):
        Service.startService(self)
        if self._port is None:
            self._port = self._listen(self.protocol)
        clock = self.protocol.clock
        DISCOVERY_STARTED.log(group=self.protocol.group, interface=self.protocol.interface,
                              port=self.protocol.port, mode=self.mode, seeds=self.dns_name,
                              authenticated=self.protocol.codec.authenticated)
        if self.dns_name and self._resolve is not None:
            self._loop(self.refresh_seeds, self.dns_interval, clock)
        self.protocol.announce(want_reply=True)
        # Datagrams get lost: ask again shortly, so that a join never waits a whole heartbeat interval.
        clock.callLater(min(0.25, self.heartbeat_interval / 2), self._ask_again)
        self._loop(self.protocol.announce, self.heartbeat_interval, clock, now=False)
        self._loop(self.expire, min(1.0, self.heartbeat_interval / 2), clock, now=False)
        stalls = self.protocol.stalls
        if stalls is not None:
            self._loop(stalls.tick, stalls.interval, clock)

    def expire(self) -> None:
        """
        Forget the peers silent for ``PEER_TIMEOUT``, unless this node itself was just stalled: then their
        heartbeats may be waiting unread in its socket, and it reads them only after its timers have run (a node
        back from a 16 s SIGSTOP declared every peer dead, alone in its ring acknowledged writes with its one copy,
        then heard them again). The next round, once what waited is read, expires whoever is still silent.

        Only a stall that could make a live peer look dead counts (a heartbeat interval, or what the timeout leaves
        beyond one): a node whose turns are merely long, under load, still expires the dead.
        """
        stalls = self.protocol.stalls
        if stalls is not None:
            membership = self.protocol.membership
            interval = self.heartbeat_interval
            if stalls.held_for() > max(stalls.tolerance, min(interval, membership.peer_timeout - interval)):
                return
        self.protocol.membership.expire()

    def _ask_again(self):
        if self.running:
            try:
                self.protocol.announce(want_reply=True)
            except Exception:
                write_traceback()

    def _loop(self, function, interval, clock, now=True):
        def safely():
            # A LoopingCall stops for good on an exception, or on a Deferred that fails (a lookup's callback that
            # raised); a bug in one round must not end heartbeats, nor the DNS seeds' refreshes.
            try:
                result = function()
            except Exception:
                write_traceback()
                return None
            if isinstance(result, Deferred):
                result.addErrback(write_failure)
            return result
        loop = LoopingCall(safely)
        loop.clock = clock
        loop.start(interval, now=now)
        self._loops.append(loop)

    def refresh_seeds(self) -> Deferred:
        """
        Resolve the DNS name and keep its A records as unicast heartbeat targets. A failed lookup keeps the
        previous seeds.
        """
        d = maybeDeferred(self._resolve, self.dns_name)

        def resolved(addresses):
            self._seeds_failing = _SeedFailures()
            new = set(addresses)
            if self.protocol.use_seeds(new):
                SEEDS_RESOLVED.log(name=self.dns_name, addresses=sorted(new))
                self.protocol.announce(want_reply=True)

        return d.addCallbacks(resolved, self._seeds_failed)

    def _seeds_failed(self, failure) -> None:
        # A name that does not resolve (no Service yet, a typo) fails every DNS_INTERVAL for as long as the node
        # runs: each reason is logged when it starts, then at most once every SEEDS_FAILED_REPEAT seconds (an
        # overloaded resolver alternates between two).
        failing = self._seeds_failing
        failing.failures += 1
        reason = str(failure.value)[:200]
        now = self.protocol.clock.seconds()
        if now - failing.logged.get(reason, float("-inf")) < SEEDS_FAILED_REPEAT:
            return
        SEEDS_FAILED.log(name=self.dns_name, reason=reason, failures=failing.failures)
        if len(failing.logged) >= 16:
            failing.logged.clear()
        failing.logged[reason] = now
        failing.failures = 0

    def stopService(self):
        """
        :meth:`stop_heartbeats`, then :meth:`depart`.
        """
        self.stop_heartbeats()
        return self.depart()

    def stop_heartbeats(self) -> None:
        """
        Stop heartbeating and expiring peers, and say once more that this node is leaving. The port stays
        open for :meth:`depart`.
        """
        if self.running:
            Service.stopService(self)
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        # Twice: a lost datagram would otherwise leave the peers waiting a whole peer timeout.
        self.protocol.announce(state=LEAVING)
        self.protocol.announce(state=LEAVING)

    def depart(self) -> Optional[Deferred]:
        """
        Say (twice) that this node serves nothing more, as it exits, and close the port: its peers forget it at
        once, rather than keep asking it, as they ask a leaving node, until its silence times out.
        """
        if self._port is None:
            return None
        self.protocol.depart()
        port, self._port = self._port, None
        return maybeDeferred(port.stopListening)


def resolve_all(reactor, name: str) -> Deferred:
    """
    Every IPv4 address of ``name``, from the system resolver (``/etc/hosts`` and cluster DNS alike), looked up on a
    daemon thread of its own: not the reactor's thread pool, which the reactor joins as it stops, so that a lookup
    hanging on a failing resolver (tens of seconds, with Kubernetes' search list) held the exit past the pod's
    grace period. The refreshes wait for each lookup, so there is at most one such thread.
    """
    done: Deferred = Deferred()

    def lookup():
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_DGRAM)
            outcome = sorted({info[4][0] for info in infos})
        except Exception:
            outcome = Failure()
        reactor.callFromThread(done.errback if isinstance(outcome, Failure) else done.callback, outcome)

    threading.Thread(target=lookup, name="kvresponder-dns-seeds", daemon=True).start()
    return done
