"""
Peers that just failed to answer in time, or could not be reached: calls to them fail at once for a while.

A peer that is gone without a word (its pod deleted, its network cut off) stays in the membership table until
its heartbeats time out (``PEER_TIMEOUT``). Until then, every call to it would wait out
``PEER_REQUEST_TIMEOUT`` before its caller went on: each batch of write copies for it, each read of a key it
owns, each handoff. The first call that cannot connect to it, or gets no answer in time, makes it a suspect for
:data:`SUSPECT_FOR` seconds. Meanwhile calls to it fail at once: a write's copy fails over to the next node on
the ring (a hint), a read asks the other owners. Then the next call tries the peer again.

A refused connection fails at once anyway, and an error answer means the peer is there: neither makes a
suspect.
"""

from typing import Dict, Tuple

from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionRefusedError

from .log.replication import PEER_SUSPECTED

#: Seconds a peer stays a suspect after a call to it found it unreachable.
SUSPECT_FOR = 5.0


def unreachable(error: BaseException) -> bool:
    """
    Whether ``error``, what a call to a peer failed with, says that the peer could not be reached or did not
    answer in time (rather than refused the connection, or answered).
    """
    if isinstance(error, ConnectionRefusedError):
        return False
    return isinstance(error, (ConnectError, ConnectingCancelledError, DeferredTimeout))


class SuspectPeers:
    """
    The peers calls fail at once for. Peers are known by address and port, as their connections are.

    :param clock: ``IReactorTime``.
    :param float hold: seconds a peer stays a suspect.
    :param metrics: reads ``kv_peers_suspected`` from :meth:`count`, or ``None``.
    """

    def __init__(self, clock, hold: float = SUSPECT_FOR, metrics=None) -> None:
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
        for other in [other for other, when in self._until.items() if when <= now]:
            del self._until[other]
        self._until[key] = now + self._hold
        if until is None or until <= now:
            PEER_SUSPECTED.log(peer=peer.node_id, reason=reason, seconds=self._hold)

    def answered(self, peer) -> None:
        """
        ``peer`` answered a call: it is no suspect any more.
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
        if self._clock.seconds() < until:
            return True
        del self._until[key]
        return False

    def count(self) -> int:
        """
        How many peers are suspects now.
        """
        now = self._clock.seconds()
        return sum(1 for until in self._until.values() if until > now)
