"""
How far each peer's clock is from this node's, and whether this node's own clock can be trusted.

Versions are hybrid-logical-clock stamps, and the newest version wins, so a node whose wall clock is wrong
stamps its writes wrongly. Every node therefore measures each peer's clock offset (positive: the peer is
ahead) from what peers tell it:

- every heartbeat carries the sender's wall clock: one sample, off by the datagram's one-way delay;
- every answer to a peer call carries the peer's wall clock (``X-KV-Clock``): a round-trip sample, the
  peer's time against the middle of the call, kept only when the call was quick enough for its error to be a
  small part of the bound.

A peer's offset is the median of its last :data:`SAMPLES` samples, so one late datagram does not move it and
a stepped clock shows within a few heartbeats. A peer not heard from for ``forget_after`` seconds is forgotten.

This node is *skewed* when a strict majority of the clocks it measures, its own included, sit on one side of
its own clock and further than ``max_offset`` from it. With one peer there is no majority: neither node of a
pair can tell which clock is wrong, so neither is marked skewed, and only the per-peer offsets show it. A
skewed node stops coordinating writes and reports itself not ready (see :class:`~kvresponder.node.Node`),
and comes back by itself once its clock does.

A node whose own versions run ahead of its wall clock by more than the bound (its clock ran ahead, then was
set back: its :class:`~kvresponder.hlc.HybridLogicalClock` never goes back) is *leading*, with the same effect,
until its wall clock reaches them: every write it stamped meanwhile would carry a version from the future, which
the bound on clocks exists to rule out, although no peer sees its clock as wrong any more.
"""

from collections import deque
from typing import Callable, Deque, Dict, List, Optional

from .log.discovery import CLOCK_RECOVERED, CLOCK_SKEWED, VERSIONS_AHEAD, VERSIONS_CAUGHT_UP

#: Samples a peer's offset is the median of.
SAMPLES = 5
#: A round trip is a sample only if half of it, the most its estimate can be wrong by, is at most this
#: share of the bound.
ROUND_TRIP_SHARE = 0.25
#: Seconds between two round-trip samples of one peer: a busy node makes thousands of peer calls a second,
#: and heartbeats already give a sample every interval.
ROUND_TRIP_EVERY = 1.0
#: A skewed node is back once its offset is within this share of the bound, so that a clock hovering at the
#: bound does not flap the node in and out of service.
RECOVER_SHARE = 0.8


class _PeerClock:
    __slots__ = ("incarnation", "samples", "heard", "round_trip_at")

    def __init__(self, incarnation: Optional[int], now: float) -> None:
        self.incarnation = incarnation
        self.samples: Deque[float] = deque(maxlen=SAMPLES)
        self.heard = now
        self.round_trip_at = float("-inf")

    def offset(self) -> float:
        ordered = sorted(self.samples)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2


def start_time(wall: Callable[[], float], steady: Callable[[], float]) -> Callable[[], float]:
    """
    When the process started, by the wall clock as it reads each time it is asked: its time now less the time
    since, on ``steady``, a clock that does not step (the reactor's). A wall reading kept from the start would stay
    ahead for as long as a clock started ahead and set right since had been ahead: what a peer signed since would
    look signed before the start (discovery's and signatures' replay checks).
    """
    started = steady()
    return lambda: wall() - (steady() - started)


class ClockOffsets:
    """
    :param seconds: the clock that ages samples: a monotonic one, so that a jump of the wall clock does not
        forget every peer at once.
    :param float max_offset: ``MAX_CLOCK_OFFSET``, in seconds.
    :param float forget_after: seconds of silence after which a peer's offset is dropped (the peer timeout).
    :param version_lead: returns how far this node's versions are ahead of its wall clock, in seconds
        (:meth:`~kvresponder.hlc.HybridLogicalClock.lead`); or ``None``.
    """

    def __init__(self, seconds: Callable[[], float], max_offset: float, forget_after: float,
                 version_lead: Optional[Callable[[], float]] = None) -> None:
        self._seconds = seconds
        self.max_offset = max_offset
        self.forget_after = forget_after
        self._version_lead = version_lead
        #: How far this node's versions were ahead of its wall clock at the last evaluation, in seconds.
        self.lead = 0.0
        #: Whether that was past the bound: it coordinates no write while it is.
        self.leading = False
        self._peers: Dict[str, _PeerClock] = {}
        #: This node's offset from the clocks it measures (positive: this node is ahead), as last worked out.
        self.skew = 0.0
        #: Whether this node's clock is past the bound: it coordinates no write while it is.
        self.skewed = False

    # -- samples ---------------------------------------------------------------------------------------

    def heard(self, node_id: str, incarnation: Optional[int], offset: float) -> None:
        """
        A heartbeat from ``node_id`` whose clock read ``offset`` seconds ahead of ours when it arrived.
        """
        peer = self._peer(node_id, incarnation)
        if peer is None:
            return
        peer.samples.append(offset)
        self.evaluate()

    def round_trip(self, node_id: str, sent: float, peer_time: float, received: float) -> None:
        """
        A call to ``node_id`` sent at ``sent`` and answered at ``received`` (our clock), whose answer said the
        peer's clock read ``peer_time``.
        """
        half = (received - sent) / 2
        if half < 0 or half > self.max_offset * ROUND_TRIP_SHARE:
            return
        peer = self._peers.get(node_id)
        if peer is None:
            # Only peers whose heartbeats are measured: a call's answer alone says nothing of a restart.
            return
        now = self._seconds()
        if now - peer.round_trip_at < ROUND_TRIP_EVERY:
            return
        peer.round_trip_at = now
        peer.heard = now
        peer.samples.append(peer_time - (sent + half))
        self.evaluate()

    def _peer(self, node_id: str, incarnation: Optional[int]) -> Optional[_PeerClock]:
        now = self._seconds()
        peer = self._peers.get(node_id)
        if (peer is not None and incarnation is not None and peer.incarnation is not None
                and incarnation < peer.incarnation):
            # An older incarnation's heartbeat (late, or resent): it says nothing of the clock now.
            return None
        if peer is None or (incarnation is not None and peer.incarnation != incarnation):
            # A restarted node may have come back with its clock fixed: its old samples say nothing now.
            if len(self._peers) >= 4096:
                self._forget(now)
            peer = self._peers[node_id] = _PeerClock(incarnation, now)
        peer.heard = now
        return peer

    # -- what they say ---------------------------------------------------------------------------------

    def offset(self, node_id: str) -> Optional[float]:
        """
        ``node_id``'s clock offset from ours in seconds (positive: it is ahead), or ``None`` if unknown.
        """
        peer = self._peers.get(node_id)
        if peer is None or not peer.samples:
            return None
        return peer.offset()

    def offsets(self) -> Dict[str, float]:
        """
        Every measured peer's offset, by node id.
        """
        return {node_id: peer.offset() for node_id, peer in sorted(self._peers.items()) if peer.samples}

    def lead_now(self) -> float:
        """
        How far this node's versions are ahead of its wall clock now, in seconds.
        """
        return self._version_lead() if self._version_lead is not None else 0.0

    def evaluate(self) -> None:
        """
        Forget silent peers and work out this node's skew and its versions' lead again, logging when either
        crosses the bound. Called on every sample and by the node's once-a-second timer.
        """
        lead = self.lead = self.lead_now()
        if not self.leading and lead > self.max_offset:
            self.leading = True
            VERSIONS_AHEAD.log(lead=round(lead, 6), max_offset=self.max_offset)
        elif self.leading and lead <= self.max_offset:
            self.leading = False
            VERSIONS_CAUGHT_UP.log(lead=round(lead, 6), max_offset=self.max_offset)
        self._forget(self._seconds())
        offsets = list(self.offsets().values())
        if self.skewed and len(offsets) < 2:
            # One peer left is no majority, and none is none: this node cannot tell that its clock came back, so
            # it stays skewed until a majority says so. Not even alone: cut off by a partition, its writes,
            # stamped by its wrong clock, would beat writes its peers acknowledged after them, once it heals.
            return
        skew = _own_offset(offsets)
        self.skew = skew
        bound = self.max_offset
        if not self.skewed and abs(skew) > bound:
            self.skewed = True
            CLOCK_SKEWED.log(skew=round(skew, 6), max_offset=bound, peers=len(self._peers))
        elif self.skewed and abs(skew) <= bound * RECOVER_SHARE:
            self.skewed = False
            CLOCK_RECOVERED.log(skew=round(skew, 6), max_offset=bound)

    def forget(self, node_id: str) -> None:
        """
        Drop ``node_id``'s offset now: it has left the cluster (it said it is gone).
        """
        self._peers.pop(node_id, None)

    def _forget(self, now: float) -> None:
        cutoff = now - self.forget_after
        for node_id in [node_id for node_id, peer in self._peers.items() if peer.heard < cutoff]:
            del self._peers[node_id]

    def as_json(self) -> dict:
        return {"skew_s": round(self.skew, 6), "skewed": self.skewed, "max_offset_s": self.max_offset,
                "version_lead_s": round(self.lead, 6), "leading": self.leading,
                "peers": {node_id: round(offset, 6) for node_id, offset in self.offsets().items()}}


def _own_offset(offsets: List[float]) -> float:
    """
    This node's offset from the clocks of the cluster, given each peer's offset from it: zero unless a strict
    majority of all the clocks, this node's (offset 0) included, lie on one side of it; then the distance to
    the nearest of the middle ones, negated (positive when this node is ahead).
    """
    if len(offsets) < 2:
        return 0.0
    clocks = sorted(offsets + [0.0])
    low, high = clocks[(len(clocks) - 1) // 2], clocks[len(clocks) // 2]
    if high < 0:
        return -high
    if low > 0:
        return -low
    return 0.0
