"""
Review finding 4 (low): per-peer-address state that is never dropped. Pods get a new address at every restart,
so a long-lived node calls ever more addresses; the batcher's in-flight counts and the peer transport's
semaphores keep one entry for each address ever called.
"""

from types import SimpleNamespace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from kvresponder.batcher import Batcher, QueuedRead
from kvresponder.peertransport import PeerTransport


class _Turn:
    def add(self, call):
        call()


def test_a_batcher_keeps_nothing_for_peers_whose_batches_are_all_answered():
    """
    If 5000 peer addresses (5000 pod restarts) have each had a batch of reads answered, then the batcher holds
    no state for any of them.
    """
    batcher = Batcher(_Turn(), lambda peer, items: succeed([None] * len(items)))
    for index in range(5000):
        peer = SimpleNamespace(node_id="n", address="10.%d.%d.%d" % (index >> 16, (index >> 8) & 255, index & 255),
                               port=3000)
        batcher.add(peer, QueuedRead("k", Deferred()))
    assert len(batcher._in_flight) + len(batcher._queued) == 0, len(batcher._in_flight)


def test_the_peer_transport_keeps_no_semaphore_for_peers_it_is_not_calling():
    """
    If 5000 peer addresses have each been called once, and every call has ended, then the transport keeps no
    per-address semaphore for them.
    """
    transport = PeerTransport.__new__(PeerTransport)
    transport._in_flight = {}
    transport.suspects = SimpleNamespace(suspected=lambda peer: False)
    transport.tracing = None

    async def _call(*args):
        return {}
    transport._call = _call
    from twisted.internet.defer import ensureDeferred
    for index in range(5000):
        peer = SimpleNamespace(node_id="n", address="10.0.%d.%d" % (index >> 8, index & 255), port=3000)
        ensureDeferred(transport.call(peer, "get", {}))
    assert len(transport._in_flight) == 0, len(transport._in_flight)
