"""
Peers that just failed to answer in time, or could not be reached: calls to them fail at once for a while.

A peer that is gone without a word (its pod deleted, its network cut off) stays in the membership table until
its heartbeats time out (``PEER_TIMEOUT``). Until then, every call to it would wait out
``PEER_REQUEST_TIMEOUT`` before its caller went on: each batch of write copies for it, each read of a key it
owns, each handoff. The first call that cannot connect to it, or gets no answer in time, makes it a suspect for
:data:`SUSPECT_FOR` seconds. Meanwhile calls to it fail at once: a write's copy fails over to the next node on
the ring (a hint), a read asks the other owners. Then calls try the peer again.

A refused connection fails at once anyway, and an error answer means the peer is there: neither makes a
suspect.
"""

import errno
from typing import Dict, Tuple

from twisted.internet.error import ConnectBindError, ConnectError, NoRouteError, TCPTimedOutError
from twisted.internet.error import TimeoutError as ConnectTimeout

from .log.replication import PEER_SUSPECTED

#: Seconds a peer stays a suspect after a call to it found it unreachable.
SUSPECT_FOR = 5.0

#: How late past its due time a call's timeout may fire and still count against the peer. Later, the node itself
#: stalled (its timers run before it reads what arrived meanwhile): the peer may well have answered.
LATE_TIMEOUT = 0.5

_UNREACHABLE_ERRNOS = (errno.EHOSTUNREACH, errno.ENETUNREACH)


def unreachable(error: BaseException) -> bool:
    """
    Whether ``error``, what connecting to a peer failed with, says that the peer cannot be reached: the
    connection timed out, or there is no route to it. Not a refusal (the peer's host is there), nor this node's
    own shortage (no file descriptor or port left to connect with), nor a cancellation. A call's own timeout is
    told by its time (see :meth:`SuspectPeers.timed_out`).
    """
    if isinstance(error, ConnectBindError):
        return False
    if isinstance(error, (ConnectTimeout, TCPTimedOutError, NoRouteError)):
        return True
    return type(error) is ConnectError and getattr(error, "osError", None) in _UNREACHABLE_ERRNOS


def suspect_refusal(peer, op: str) -> str:
    """
    Why a call ``op`` to a suspect ``peer`` failed without being sent: the message of the caller's error.
    """
    return "%s unreachable for %s: no answer to a call moments ago" % (peer.node_id, op)


class SuspectPeers:
    """
    The peers calls fail at once for. Peers are known by address and port, as their connections are.

    :param clock: ``IReactorTime``.
    :param float hold: seconds a peer stays a suspect.
    :param metrics: reads ``kv_peers_suspected`` from :meth:`count`, or ``None``.
    """

    def __init__(self, clock, hold: float = SUSPECT_FOR, metrics=None) -> None:
        # The clock is the reactor's (wall time): a step back must not stretch a suspicion, so a suspect whose
        # end lies further ahead than ``hold`` is one no more.
        self._clock = clock
        self._hold = hold
        self._until: Dict[Tuple[str, int], float] = {}
        if metrics is not None:
            metrics.register_gauge("kv_peers_suspected", self.count)

    def failed(self, peer, reason: str) -> None:
        """
        A call to ``peer`` (with ``node_id``, ``address`` and ``port``) found it unreachable, for ``reason``.
        """
        key = (peer.address, peer.port)
        now = self._clock.seconds()
        until = self._until.get(key)
        # Forget the suspects whose time is over, so that peers gone for good (a pod's address is not reused
        # for long) are not kept.
        for other in [other for other, when in self._until.items() if not now < when <= now + self._hold]:
            del self._until[other]
        self._until[key] = now + self._hold
        if until is None or not now < until <= now + self._hold:
            PEER_SUSPECTED.log(peer=peer.node_id, reason=reason, seconds=self._hold)

    def timed_out(self, peer, due: float) -> None:
        """
        A call to ``peer`` got no answer by ``due``, when it was to time out: the peer becomes a suspect, unless
        the timeout fired more than :data:`LATE_TIMEOUT` late (this node stalled, not the peer).
        """
        if self._clock.seconds() - due <= LATE_TIMEOUT:
            self.failed(peer, "no answer in time")

    def answered(self, peer) -> None:
        """
        ``peer`` answered a call, or a new incarnation of it announced itself: it is no suspect any more.
        """
        if self._until:
            self._until.pop((peer.address, peer.port), None)

    def suspected(self, peer) -> bool:
        """
        Whether calls to ``peer`` should fail at once.
        """
        if not self._until:
            return False
        key = (peer.address, peer.port)
        until = self._until.get(key)
        if until is None:
            return False
        now = self._clock.seconds()
        if now < until <= now + self._hold:
            return True
        del self._until[key]
        return False

    def count(self) -> int:
        """
        How many peers are suspects now.
        """
        now = self._clock.seconds()
        return sum(1 for until in self._until.values() if now < until <= now + self._hold)
