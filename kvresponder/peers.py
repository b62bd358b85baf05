"""
The verbs of the peer protocol: what this node asks of its peers' internal routes.

:class:`PeerClient` is a thin facade over three parts, each small and tested alone:

- the transport (:class:`~kvresponder.peertransport.PeerTransport`): signing, timeouts, one retry, Eliot task
  ids, trace context, the per-peer limit of calls, clock samples;
- two batchers (:class:`~kvresponder.batcher.Batcher`): the copies of client writes, and single-key reads, each
  coalesced per peer into one call while another is out;
- the copy sender (:class:`~kvresponder.copysender.ICopySender`): a batch of copies over the peer's copy stream,
  or as a request; and the stream reader (:class:`~kvresponder.copysender.StreamReader`): a batch of reads on
  the stream, or as a request where the peer serves none there.

Two kinds of copies always go as requests (:class:`~kvresponder.copysender.RequestCopySender`), never on the
stream: bulk data (:meth:`PeerClient.apply`: handoff, re-replication, anti-entropy), which the peer stores in one
action continuing the caller's and which may be given a longer timeout; and, with tracing on, each write's copy,
whose span context travels in its request's headers, which a stream frame does not carry.
"""

from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from eliot import current_action
from twisted.internet.defer import Deferred, ensureDeferred

from .batcher import MAX_BATCH_BYTES, MAX_BATCHES_IN_FLIGHT, MAX_COALESCED, Batcher, QueuedRead, QueuedWrite
from .copysender import RequestCopySender, StreamCopySender, StreamReader
from .hlc import Version, version_from_wire
from .log import DEBUG
from .log.replication import PEER_CALL
from .peertransport import (AUTH_HEADER, AUTH_WINDOW, CLOCK_HEADER, MAX_IN_FLIGHT, TASK_HEADER, TASKS_HEADER,
                            CachedEndpoints, PeerAuthenticator, PeerError, PeerTransport)
from .store import ApplyResult, Entry
from .suspects import SuspectPeers
from .turn import EndOfTurn
from .wire import OMITTED, entry_from_wire


def _peer_error(failure) -> PeerError:
    value = failure.value
    if isinstance(value, PeerError):
        return value
    return PeerError(str(value), getattr(value, "code", None), getattr(value, "error", None))


class PeerClient:
    """
    :param http: a ``treq.client.HTTPClient`` (over a persistent pool), or a ``StubTreq`` in tests.
    :param clock: ``IReactorTime`` for timeouts.
    :param str tenant: the path prefix of every internal route.
    :param float timeout: seconds before a call fails.
    :param authenticator: a :class:`~kvresponder.peertransport.PeerAuthenticator`, or ``None``.
    :param metrics: receives ``peer_call(op, seconds)``.
    :param tracing: a :class:`~kvresponder.tracing.Tracing`, or ``None``.
    :param streams: a :class:`~kvresponder.copystream.CopyStreams` carrying the copies of client writes, or
        ``None`` to send them as HTTP requests.
    :param wall: this node's wall clock in seconds (expiries travel as the time they have left); by default
        the clock's ``seconds``.
    :param clock_offsets: a :class:`~kvresponder.clockskew.ClockOffsets` fed the peers' clocks from their
        answers, or ``None``.
    :param end_of_turn: the node's :class:`~kvresponder.turn.EndOfTurn`, where queued calls leave; by default one
        on ``clock``.
    :param post: how the transport sends each HTTP call (:class:`~kvresponder.peertransport.PeerTransport`); by
        default through ``http``.
    :param max_header_bytes: ``MAX_HEADER_BYTES``, which the peers hold a request's headers to (a batch's task ids
        are kept within half of it); ``None``: no limit.
    """

    def __init__(self, http, clock, tenant: str, timeout: float, authenticator=None, metrics=None,
                 tracing=None, log_policy=None, streams=None, wall: Optional[Callable[[], float]] = None,
                 clock_offsets=None, end_of_turn=None, post=None, max_header_bytes: Optional[int] = None) -> None:
        self._wall = wall or clock.seconds
        self._log = log_policy
        #: Peers a call just found unreachable, which calls fail at once for a while, on every path.
        self.suspects = SuspectPeers(clock, metrics=metrics)
        self.transport = PeerTransport(http, clock, tenant, timeout, authenticator, metrics, tracing, log_policy,
                                       self._wall, clock_offsets, self.suspects, post=post,
                                       max_header_bytes=max_header_bytes)
        #: Bulk data's copies and traced copies (see above), and the stream's fallback.
        self._requests = requests = RequestCopySender(self.transport, self._wall)
        #: The :class:`~kvresponder.copysender.ICopySender` of client writes' copies.
        self.copies = requests if streams is None else StreamCopySender(streams, requests, clock, metrics, timeout,
                                                                       self.suspects)
        #: Reads of keys on the copy streams, where the peers serve them (:meth:`get_coalesced`'s batches).
        self._stream_reads = None if streams is None else StreamReader(
            streams, lambda peer, keys: ensureDeferred(self.get_many(peer, keys)), clock, metrics, timeout,
            self.suspects)
        self.streams = streams
        end_of_turn = end_of_turn if end_of_turn is not None else EndOfTurn(clock)
        self._writes = Batcher(end_of_turn, self._send_writes, _peer_error, max_bytes=MAX_BATCH_BYTES)
        self._reads = Batcher(end_of_turn, self._send_reads, _peer_error)

    @property
    def timeout(self) -> float:
        return self.transport.timeout

    def close_streams(self) -> None:
        """
        Close the copy streams, if any: at shutdown, once every request has been answered.
        """
        if self.streams is not None:
            self.streams.close()

    @property
    def _tracing(self):
        return self.transport.tracing

    # -- coalesced calls --------------------------------------------------------------------------------

    def apply_coalesced(self, peer, entry: Entry, task_id: Optional[bytes] = None) -> Deferred:
        """
        Store one entry on ``peer``, sharing one batch with the other writes to that peer queued in the same
        reactor turn, or while an earlier batch to it is out (:mod:`kvresponder.batcher`): under concurrent
        load, one call carries many replicated writes. The peer continues each entry's own Eliot task (a child
        of the caller's current action, or, at debug level, of a peer-call action per write), so a write's tree
        is the same as if it had gone alone. With tracing on, each write goes alone, so that its spans keep
        their parent. A write that runs in no action gives the ``task_id`` its copy is logged at.

        :return: a Deferred firing with the entry's :class:`~kvresponder.store.ApplyResult`, or failing with
            :class:`PeerError`.
        """
        waiter: Deferred = Deferred()
        self.send_copy(peer, entry, waiter, task_id)
        return waiter

    def send_copy(self, peer, entry: Entry, waiter, task_id: Optional[bytes] = None) -> None:
        """
        :meth:`apply_coalesced`, settling ``waiter`` instead of returning a Deferred: the replicated write's
        own object for each copy (:class:`~kvresponder.batcher.Waiter`), which spares every copy a Deferred.
        """
        if self._tracing is not None:
            # Alone, as a request, so that the copy's span has the write's as its parent (a span cannot cross a
            # stream's batch); a write logged in its own task (at info) still has the peer log the copy in that
            # task, as a batch would.
            self._requests.send(peer, [entry], None if task_id is None else [task_id]).addCallbacks(
                lambda results: waiter.callback(results[0]), waiter.errback)
            return
        action = None
        if task_id is None and (self._log is None or self._log.enabled("replication", DEBUG)):
            action = PEER_CALL(peer=peer.node_id, op="apply")
            task_id = action.serialize_task_id()
        elif task_id is None:
            # At info, no action of its own: the peer logs its copy in the caller's action (a request or a
            # write logged at debug), so the replica's store line still lands in the write's tree.
            parent = current_action()
            if parent is not None:
                task_id = parent.serialize_task_id()
        self._writes.add(peer, QueuedWrite(entry, waiter, action, task_id))

    def _send_writes(self, peer, batch: List[QueuedWrite]) -> Deferred:
        return self.copies.send(peer, [item.entry for item in batch], [item.task_id or b"-" for item in batch])

    def get_coalesced(self, peer, key: str) -> Deferred:
        """
        The newest entry ``peer`` holds for ``key``, tombstones included, sharing one ``get`` call with the
        other reads from that peer queued in the same reactor turn, or while a read batch to it is out. With
        tracing on, or the ``replication`` area at debug, each read goes alone, in the caller's context, so that
        its span and its ``peer-read`` action are the read's (a batch goes out in a later turn, outside them).

        :return: a Deferred firing with an :class:`~kvresponder.store.Entry` or ``None``, or failing with
            :class:`PeerError`.
        """
        if self._tracing is not None or (self._log is not None and self._log.enabled("replication", DEBUG)):
            return ensureDeferred(self.get(peer, key))
        waiter: Deferred = Deferred()
        self._reads.add(peer, QueuedRead(key, waiter))
        return waiter

    def _send_reads(self, peer, batch: List[QueuedRead]) -> Deferred:
        keys = [item.key for item in batch]
        if self._stream_reads is not None and (self._log is None or not self._log.enabled("replication", DEBUG)):
            return self._stream_reads.read(peer, keys)
        # At debug, over HTTP: each call is then a ``peer-read`` action of its own.
        return ensureDeferred(self.get_many(peer, keys))

    # -- operations -----------------------------------------------------------------------------------

    async def apply(self, peer, entries: Sequence[Entry], timeout: Optional[float] = None,
                    task_ids: Optional[List[bytes]] = None) -> List[ApplyResult]:
        """
        Store entries on ``peer``; each result says whether it was newer there and whether a live value
        was replaced.

        :param task_ids: each entry's own Eliot task id, for writes that have one (see ``PeerTransport.call``).
        """
        return await self._requests.send(peer, entries, task_ids, timeout)

    async def get(self, peer, key: str) -> Optional[Entry]:
        """
        The newest entry ``peer`` holds for ``key``, tombstones included.
        """
        answer = await self.transport.call(peer, "get", {"key": key}, read=True)
        data = answer.get("entry") if isinstance(answer, dict) else None
        if data is None:
            return None
        try:
            return entry_from_wire(data, self._wall())
        except ValueError:
            raise PeerError("%s answered a malformed entry" % (peer.node_id,))

    async def get_many(self, peer, keys: Sequence[str]) -> List[Optional[Entry]]:
        """
        The newest entry ``peer`` holds for each key, tombstones included.
        """
        found: List[Optional[Entry]] = [None] * len(keys)
        asked = list(range(len(keys)))
        while asked:
            answer = await self.transport.call(peer, "get", {"keys": [keys[i] for i in asked], "partial": True},
                                               read=True)
            items = answer.get("entries") if isinstance(answer, dict) else None
            if not isinstance(items, list) or len(items) != len(asked):
                raise PeerError("%s answered a malformed batch" % (peer.node_id,))
            now = self._wall()
            # The entries the peer left out to keep its answer's size bounded (wire.OMITTED) are asked again.
            omitted = [i for i, item in zip(asked, items) if item is OMITTED]
            if len(omitted) == len(asked):
                raise PeerError("%s answered none of the keys asked" % (peer.node_id,))
            try:
                for i, item in zip(asked, items):
                    if item is not None and item is not OMITTED:
                        found[i] = entry_from_wire(item, now)
            except ValueError:
                raise PeerError("%s answered a malformed entry" % (peer.node_id,))
            asked = omitted
        return found

    async def keys(self, peer, prefix: str, after: Optional[str], limit: int) -> List[str]:
        answer = await self.transport.call(peer, "keys", {"prefix": prefix, "after": after, "limit": limit},
                                           read=True)
        keys = answer.get("keys") if isinstance(answer, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise PeerError("%s answered malformed keys" % (peer.node_id,))
        return keys

    async def differing_buckets(self, peer, sender: str, buckets: Dict[int, str],
                                background: bool = False) -> List[int]:
        """
        Anti-entropy, step one: which of our bucket digests differ from the peer's.

        :param background: for the periodic pass: the peer's walk, if it needs one, goes in the background.
        """
        body = {"from": sender, "buckets": {str(b): h for b, h in buckets.items()}}
        if background:
            body["background"] = True
        answer = await self.transport.call(peer, "sync/buckets", body)
        differing = answer.get("differ") if isinstance(answer, dict) else None
        if not isinstance(differing, list) or not all(type(bucket) is int for bucket in differing):
            raise PeerError("%s answered malformed buckets" % (peer.node_id,))
        return differing

    async def wanted(self, peer, versions: Dict[str, Version]) -> Tuple[List[str], Set[str]]:
        """
        Anti-entropy, step two: which of these keys the peer lacks or holds at an older version; and of those,
        the ones it holds nothing of (empty from a node older than that answer).
        """
        answer = await self.transport.call(peer, "sync/versions",
                                           {"versions": {key: list(version) for key, version in versions.items()}})
        keys = answer.get("want") if isinstance(answer, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise PeerError("%s answered malformed versions" % (peer.node_id,))
        lacking = answer.get("lacking", [])
        if not isinstance(lacking, list) or not all(isinstance(key, str) for key in lacking):
            raise PeerError("%s answered malformed versions" % (peer.node_id,))
        return [key for key in keys if key in versions], set(lacking)

    async def request_sync(self, peer, sender: str, timeout: float) -> dict:
        """
        Ask ``peer`` to run a rebalance pass now (handing ``sender`` its share) and answer when done.
        """
        return await self.transport.call(peer, "sync/request", {"from": sender}, timeout=timeout)


__all__ = ["AUTH_HEADER", "AUTH_WINDOW", "CLOCK_HEADER", "MAX_BATCH_BYTES", "MAX_BATCHES_IN_FLIGHT", "MAX_COALESCED",
           "MAX_IN_FLIGHT", "TASK_HEADER", "TASKS_HEADER", "CachedEndpoints", "PeerAuthenticator", "PeerClient",
           "PeerError", "version_from_wire"]
