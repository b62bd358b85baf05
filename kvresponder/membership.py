"""
The peer table: who is in the cluster, as discovery reports it.

Membership knows nothing of sockets. Discovery feeds it :class:`Heartbeat` observations; it keeps one
:class:`Peer` per node id, replaces a node's old incarnation when it restarts, forgets a peer that says it is
gone (as it exits) at once, and peers that stay silent for ``peer_timeout`` seconds (checked on the injected
clock). Every change is announced to the subscribers (the ring, the rebalancer, metrics), in that one direction.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from eliot import write_traceback

ALIVE = "alive"
LEAVING = "leaving"
#: Said by a node's last heartbeats, as it exits: it serves nothing more, and is forgotten at once. Also the change
#: its peers' subscribers hear then.
GONE = "gone"

JOINED = "joined"
RESTARTED = "restarted"
LEFT = "left"
DEAD = "dead"
MOVED = "moved"


#: Gone incarnations remembered (:meth:`Membership.observe`); the oldest is forgotten first.
MAX_GONE = 1024
#: Seconds an incarnation that said it is gone stays refused. Longer than a heartbeat signed before its ``gone`` can
#: still be taken in (discovery refuses one signed more than 30 s plus the clock bound ago); not for good, since a
#: container restarted in the same pod keeps its node id, and, after a step back of the wall clock its incarnation
#: is drawn from, may come back with a lower one.
GONE_REMEMBERED = 60.0


class Heartbeat(NamedTuple):
    """
    What a node says about itself in one discovery datagram.
    """
    node_id: str
    incarnation: int
    address: str
    port: int
    state: str
    ring_size: int
    #: :func:`~kvresponder.ring.members_digest` of the sender's ring, or ``None`` from a node older than it.
    ring_digest: Optional[str] = None
    #: Whether the sender is starting or joining: its place in the ring holds nothing yet, or not all it will.
    #: ``False`` from a node older than it.
    joining: bool = False
    #: The digest of the sender's ring if it has handed off all that ring places elsewhere, by a pass that began
    #: once all its peers named that ring (``Node._watch_settling``); else ``None``, as from a node older than it.
    settled: Optional[str] = None
    #: Whether the sender is running a pass under a ring of other members than its current one: that pass may
    #: still move entries onto nodes that have already handed off under the current ring. ``False`` from a node
    #: older than it.
    moving: bool = False


class Peer:
    """
    One other node as this node last saw it.
    """

    __slots__ = ("node_id", "incarnation", "address", "port", "state", "ring_size", "ring_digest", "joining",
                 "settled", "settled_at", "moving", "first_seen", "last_seen")

    def __init__(self, beat: Heartbeat, now: float) -> None:
        self.node_id = beat.node_id
        self.incarnation = beat.incarnation
        self.address = beat.address
        self.port = beat.port
        self.state = beat.state
        self.ring_size = beat.ring_size
        self.ring_digest = beat.ring_digest
        self.joining = beat.joining
        self.settled = beat.settled
        #: When this node first heard the peer say ``settled`` as it does now.
        self.settled_at = now
        self.moving = beat.moving
        self.first_seen = now
        self.last_seen = now

    def as_json(self, now: float) -> dict:
        return {
            "id": self.node_id,
            "address": self.address,
            "port": self.port,
            "state": self.state,
            "incarnation": self.incarnation,
            "last_seen_s_ago": round(max(0.0, now - self.last_seen), 3),
            "ring_size": self.ring_size,
        }


class Membership:
    """
    :param seconds: the clock.
    :param str node_id: this node's id; heartbeats from it are ignored.
    :param float peer_timeout: seconds of silence after which a peer is dead.
    """

    def __init__(self, seconds: Callable[[], float], node_id: str, peer_timeout: float) -> None:
        self._seconds = seconds
        self.node_id = node_id
        self.peer_timeout = peer_timeout
        self._peers: Dict[str, Peer] = {}
        self._subscribers: List[Callable[[str, Peer], None]] = []
        self._ring_subscribers: List[Callable[[Peer, Optional[str]], None]] = []
        self.generation = 0
        #: The incarnations that said they are gone, and when, by node id: a heartbeat of theirs heard after (a
        #: datagram delayed, or forged without a secret) does not list them again, for ``GONE_REMEMBERED`` seconds.
        self._gone: Dict[str, Tuple[int, float]] = {}

    def subscribe(self, callback: Callable[[str, Peer], None]) -> None:
        """
        Call ``callback(change, peer)`` after each change, where change is one of ``joined``,
        ``restarted``, ``moved``, ``left`` (announced leaving), ``gone`` (said it exits: forgotten, after ``left``
        if its leaving was not heard) or ``dead`` (timed out).
        """
        self._subscribers.append(callback)

    def subscribe_rings(self, callback: Callable[[Peer, Optional[str]], None]) -> None:
        """
        Call ``callback(peer, before)`` when a known peer's heartbeats name another ring than before
        (``peer.ring_digest`` now, ``before`` until then): no membership change, but what the peer writes under.
        """
        self._ring_subscribers.append(callback)

    def _changed(self, change: str, peer: Peer) -> None:
        self.generation += 1
        for callback in list(self._subscribers):
            try:
                callback(change, peer)
            except Exception:
                # The table has changed already: every other subscriber (the ring among them) must still hear it.
                write_traceback()

    def observe(self, beat: Heartbeat) -> Optional[str]:
        """
        Take in one heartbeat.

        :return: the change it caused, or ``None``.
        """
        if beat.node_id == self.node_id:
            return None
        now = self._seconds()
        gone = self._gone.get(beat.node_id)
        if gone is not None:
            if now - gone[1] >= GONE_REMEMBERED:
                del self._gone[beat.node_id]
            elif gone[0] >= beat.incarnation:
                return None
        known = self._peers.get(beat.node_id)
        if beat.state == GONE:
            return self._forget_gone(beat, known)
        if known is None:
            if beat.state != ALIVE:
                # First heard already leaving (this node started while it drains): listed as leaving, never in
                # the ring, and no change to announce. It still holds what it has not handed off, which reads
                # while the ring settles ask leaving nodes for.
                self._peers[beat.node_id] = Peer(beat, now)
                return None
            peer = self._peers[beat.node_id] = Peer(beat, now)
            self._changed(JOINED, peer)
            return JOINED
        if beat.incarnation < known.incarnation:
            return None
        if beat.incarnation > known.incarnation:
            if beat.state != ALIVE:
                # The newer incarnation is already leaving: the old one is gone either way.
                del self._peers[beat.node_id]
                self._changed(LEFT, known)
                return LEFT
            peer = self._peers[beat.node_id] = Peer(beat, now)
            self._changed(RESTARTED, peer)
            return RESTARTED
        known.last_seen = now
        known.ring_size = beat.ring_size
        named_before, known.ring_digest = known.ring_digest, beat.ring_digest
        known.joining = beat.joining
        if beat.settled != known.settled:
            known.settled = beat.settled
            known.settled_at = now
        known.moving = beat.moving
        if named_before != beat.ring_digest:
            for callback in list(self._ring_subscribers):
                try:
                    callback(known, named_before)
                except Exception:
                    # The heartbeat's own news (leaving, a new address) must still be taken in.
                    write_traceback()
        if known.state == LEAVING:
            return None
        if beat.state == LEAVING:
            known.state = LEAVING
            self._changed(LEFT, known)
            return LEFT
        if (beat.address, beat.port) != (known.address, known.port):
            known.address, known.port = beat.address, beat.port
            self._changed(MOVED, known)
            return MOVED
        return None

    def _forget_gone(self, beat: Heartbeat, known: Optional[Peer]) -> Optional[str]:
        """
        The node has stopped serving and is exiting: forgotten now. A leaving node is otherwise kept, and asked
        for what it may not have handed off, until its heartbeats have been missing for the peer timeout; once
        it has exited, and its address is gone with its pod, each such call waits for its whole timeout.
        """
        if known is None or beat.incarnation < known.incarnation:
            return None
        if len(self._gone) >= MAX_GONE:
            del self._gone[next(iter(self._gone))]
        self._gone[beat.node_id] = (beat.incarnation, self._seconds())
        del self._peers[beat.node_id]
        if known.state == ALIVE:
            # Its leaving heartbeats were lost: it leaves the ring now.
            known.state = LEAVING
            self._changed(LEFT, known)
        self._changed(GONE, known)
        return GONE

    def expire(self) -> List[Peer]:
        """
        Forget every peer silent for longer than the peer timeout.

        :return: the peers declared dead.
        """
        cutoff = self._seconds() - self.peer_timeout
        dead = [peer for peer in self._peers.values() if peer.last_seen < cutoff]
        for peer in dead:
            del self._peers[peer.node_id]
            if peer.state == ALIVE:
                self._changed(DEAD, peer)
            else:
                self.generation += 1
        return dead

    def peers(self) -> List[Peer]:
        """
        Every known peer, alive or leaving, ordered by id.
        """
        return sorted(self._peers.values(), key=lambda peer: peer.node_id)

    def peer(self, node_id: str) -> Optional[Peer]:
        return self._peers.get(node_id)

    def alive_peers(self) -> List[Peer]:
        return [peer for peer in self.peers() if peer.state == ALIVE]

    def ring_members(self, include_self: bool = True) -> List[str]:
        """
        The node ids that own data: this node (unless it is leaving) and every alive peer.
        """
        members = [peer.node_id for peer in self._peers.values() if peer.state == ALIVE]
        if include_self:
            members.append(self.node_id)
        return sorted(members)
