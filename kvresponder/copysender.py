"""
Sending a batch of the copies of client writes to a peer, behind one interface, :class:`ICopySender`.

Two senders implement it:

- :class:`RequestCopySender`: one ``POST /<tenant>/_internal/apply`` a batch, over the peer transport (treq and
  its pooled connections);
- :class:`StreamCopySender`: the peer's copy stream (:mod:`kvresponder.copystream`), one frame a batch on a
  connection kept open to it; a peer that refuses the stream gets requests instead.

The stream is kept because a 3-node cluster writes much faster with it than with requests (``bench/copy_stream.py``;
the measurement and the reasoning are in docs/ARCHITECTURE.md, "Copy streams").

:class:`StreamReader` reads keys from a peer on the same stream, where the peer serves reads on it, and over
HTTP otherwise.
"""

from typing import List, Optional

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from .copystream import ReadsUnsupported, StreamError, StreamRefused, StreamTimeout, StreamUnanswered
from .hlc import version_from_wire
from .peertransport import PeerError
from .store import ApplyResult, Entry
from .suspects import suspect_refusal, unreachable
from .wire import encode_batch


class ICopySender(Interface):
    """
    Stores copies of client writes on a peer.
    """

    def send(peer, entries: List[Entry], task_ids: List[bytes]) -> Deferred:
        """
        Store ``entries`` on ``peer``; each store action continues its task id (``-`` for none).

        :return: a Deferred firing with one :class:`~kvresponder.store.ApplyResult` an entry, or failing with
            :class:`~kvresponder.peertransport.PeerError` (whose ``code`` is ``None`` if the peer did not
            answer).
        """


@implementer(ICopySender)
class RequestCopySender:
    """
    :param transport: a :class:`~kvresponder.peertransport.PeerTransport`.
    :param wall: this node's wall clock (expiries travel as the time they have left).
    """

    def __init__(self, transport, wall) -> None:
        self._transport = transport
        self._wall = wall

    def send(self, peer, entries: List[Entry], task_ids: Optional[List[bytes]],
             timeout: Optional[float] = None) -> Deferred:
        """
        :meth:`ICopySender.send`; with ``task_ids`` ``None``, the peer's store actions continue the caller's
        current action (a bulk copy's: handoff, re-replication, anti-entropy), and with ``timeout`` the call
        may take that long instead of the transport's own timeout.
        """
        d = ensureDeferred(self._transport.call(peer, "apply", encode_batch(entries, self._wall()), timeout=timeout,
                                                task_ids=task_ids))
        return d.addCallback(apply_results, peer, len(entries))


class _StreamCalls:
    """
    What a call on a peer's copy stream needs, whether it sends copies or reads: the streams, what to do where
    the stream does not serve, and how long a call may take.
    """

    def __init__(self, streams, fallback, clock, metrics, timeout: float, suspects) -> None:
        self.streams = streams
        self._fallback = fallback
        self._clock = clock
        self._metrics = metrics
        self._timeout = timeout
        self._suspects = suspects


@implementer(ICopySender)
class StreamCopySender(_StreamCalls):
    """
    :param streams: a :class:`~kvresponder.copystream.CopyStreams`.
    :param fallback: the :class:`ICopySender` for a peer that refused its stream (requests).
    :param clock: ``IReactorTime``, for the call's duration.
    :param metrics: receives ``peer_call("apply", seconds)``, or ``None``.
    :param float timeout: seconds a batch may go unanswered.
    :param suspects: the node's :class:`~kvresponder.suspects.SuspectPeers` (the fallback's too): a batch for a
        suspect fails at once, and one that finds its peer unreachable, or gets no answer in time, makes it one.
    """

    def send(self, peer, entries: List[Entry], task_ids: List[bytes]) -> Deferred:
        if not self.streams.usable(peer):
            return self._fallback.send(peer, entries, task_ids)
        suspects = self._suspects
        if suspects.suspected(peer):
            return fail(PeerError(suspect_refusal(peer, "apply")))
        started = self._clock.seconds()

        def done(result):
            if isinstance(result, Failure) and result.check(StreamRefused):
                return self._fallback.send(peer, entries, task_ids)
            return stream_outcome(result, peer, "apply", started, self._clock, self._metrics, self._timeout,
                                  suspects)

        return self.streams.send(peer, entries, task_ids, self._timeout).addBoth(done)


class StreamReader(_StreamCalls):
    """
    Reads keys from peers on their copy streams (:meth:`~kvresponder.copystream.CopyStreams.read`): a read over
    HTTP cost the caller about as much as a batch of copies did.

    :param streams: a :class:`~kvresponder.copystream.CopyStreams`.
    :param fallback: ``fallback(peer, keys)``, a Deferred of the same answer over HTTP: for a peer that refused
        its stream, one whose stream serves no reads (an older node), and entries too large for one answer.
    :param clock, metrics, timeout, suspects: as :class:`StreamCopySender`'s.
    """

    def read(self, peer, keys: List[str]) -> Deferred:
        """
        The newest entry ``peer`` holds for each key (tombstones included), or ``None``.

        :return: a Deferred firing with one entry or ``None`` a key, or failing with
            :class:`~kvresponder.peertransport.PeerError`.
        """
        if not self.streams.usable(peer):
            return self._fallback(peer, keys)
        if self._suspects.suspected(peer):
            return fail(PeerError(suspect_refusal(peer, "get")))
        started = self._clock.seconds()

        def done(result):
            if isinstance(result, Failure) and (result.check(StreamRefused, StreamUnanswered, ReadsUnsupported) or (
                    result.check(StreamError) and result.value.code == 413)):
                return self._fallback(peer, keys)
            return stream_outcome(result, peer, "get", started, self._clock, self._metrics, self._timeout,
                                  self._suspects)

        return self.streams.read(peer, keys, self._timeout).addBoth(done)


def stream_outcome(result, peer, op: str, started: float, clock, metrics, timeout: float, suspects):
    """
    The result of a call on ``peer``'s copy stream, or the :class:`~kvresponder.peertransport.PeerError` it
    raises for a failure; counted (``peer_call``), and telling ``suspects`` whether the peer answered.
    """
    if metrics is not None:
        metrics.peer_call(op, clock.seconds() - started)
    if not isinstance(result, Failure):
        suspects.answered(peer)
        return result
    if unreachable(result.value):
        suspects.failed(peer, result.value.__class__.__name__)
    elif result.check(StreamTimeout):
        suspects.timed_out(peer, started + timeout)
    if result.check(StreamError):
        raise PeerError("%s %s to %s" % (peer.node_id, result.value, op), result.value.code, result.value.error)
    if result.check(ValueError):
        raise PeerError("%s answered a malformed %s result" % (peer.node_id, op), 200)
    raise PeerError("%s unreachable for %s: %s" % (peer.node_id, op, result.value.__class__.__name__))


def apply_results(answer, peer, count: int) -> List[ApplyResult]:
    """
    The results in a peer's JSON answer to ``apply``, one an entry.

    :raises PeerError: if it is malformed.
    """
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or len(results) != count:
        raise PeerError("%s answered a malformed apply result" % (peer.node_id,), 200)
    try:
        return [_apply_result(result) for result in results]
    except ValueError:
        raise PeerError("%s answered a malformed apply result" % (peer.node_id,), 200)


def _apply_result(result) -> ApplyResult:
    """
    :raises ValueError: unless ``result`` is ``[applied, had_live]`` (two booleans), with a third element, the
        newer version the peer holds, only when it held one: anything else must not count as a stored copy.
    """
    if (not isinstance(result, list) or not 2 <= len(result) <= 3 or type(result[0]) is not bool
            or type(result[1]) is not bool):
        raise ValueError("malformed apply result: %r" % (result,))
    newer = result[2] if len(result) == 3 else None
    return ApplyResult(result[0], result[1], None if newer is None else version_from_wire(newer))
