"""
Calls to the peers' internal endpoints, over treq with one persistent connection pool.

Every call has an explicit timeout on the injected clock, carries a fresh Eliot task id (so the peer's actions
join the caller's tree), the trace context, and, with a cluster secret, an HMAC that the peer checks. A call
that fails at the connection level is retried once at once, since a pooled connection may have gone stale;
every internal operation is idempotent, so that retry is safe.
"""

import hashlib
import hmac
import json
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from eliot import current_action
from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed
from twisted.web._newclient import RequestNotSent
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

import treq
from hyperlink import EncodedURL

from .copystream import StreamError, StreamRefused
from .hlc import Version, version_from_wire
from .log import DEBUG
from .log.replication import PEER_CALL, PEER_READ
from .store import ApplyResult, Entry
from .wire import BATCH_TYPE, encode_batch, entry_from_wire

AUTH_HEADER = b"X-KV-Auth"
#: A peer's wall clock when it answered an internal call, in Unix seconds: a round-trip sample of its clock
#: offset (:mod:`kvresponder.clockskew`).
CLOCK_HEADER = b"X-KV-Clock"
TASK_HEADER = b"X-Eliot-Task-Id"
#: For a coalesced batch of writes: one Eliot task id per entry, space-separated ("-" for none).
TASKS_HEADER = b"X-Eliot-Task-Ids"
#: Writes to one peer queued together go out as one request, up to this many.
MAX_COALESCED = 256
#: ... and up to about this many bytes of entries (``Entry.size``: a batch of large values stays well under the
#: peer's internal body limit; the writes left over follow in the next batch).
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: Batches of coalesced writes in flight to one peer at once. Writes queued while they are in flight wait for
#: one to come back and then leave together, so a batch grows with the load: one request per write when
#: the node is idle, ever fewer per write as it gets busier.
MAX_BATCHES_IN_FLIGHT = 1
#: Concurrent calls to one peer; more wait their turn.
MAX_IN_FLIGHT = 64
#: Seconds a signed peer request stays valid.
AUTH_WINDOW = 60.0


class PeerError(Exception):
    """
    A peer did not answer usefully: unreachable, timed out, or an unexpected status.

    :ivar code: the HTTP status the peer answered, or ``None`` if it did not answer.
    """

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        Exception.__init__(self, message)
        self.code = code


class PeerAuthenticator:
    """
    Signs and checks internal requests with a key derived from the cluster secret.

    The signature covers the time, the method, the path and a hash of the body, so a captured request can
    only be replayed, unchanged, for :data:`AUTH_WINDOW` seconds; replays are harmless because every internal
    operation is idempotent.
    """

    def __init__(self, key: bytes, wall: Callable[[], float] = time.time) -> None:
        self._key = key
        self._wall = wall

    def _mac(self, stamp: str, method: bytes, path: bytes, body: bytes) -> str:
        digest = hashlib.sha256(body).hexdigest().encode("ascii")
        message = b"|".join([stamp.encode("ascii"), method, path, digest])
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, method: bytes, path: bytes, body: bytes) -> bytes:
        stamp = "%.3f" % (self._wall(),)
        return ("%s:%s" % (stamp, self._mac(stamp, method, path, body))).encode("ascii")

    def stream_key(self) -> bytes:
        """
        The key of the copy streams' frame MACs (:mod:`kvresponder.copystream`), derived from this one.
        """
        return hmac.new(self._key, b"kvresponder:copy-stream", hashlib.sha256).digest()

    def verify(self, header: Optional[bytes], method: bytes, path: bytes, body: bytes) -> bool:
        if not header:
            return False
        try:
            stamp, mac = header.decode("ascii").split(":", 1)
            when = float(stamp)
        except (UnicodeDecodeError, ValueError):
            return False
        if abs(self._wall() - when) > AUTH_WINDOW:
            return False
        return hmac.compare_digest(mac, self._mac(stamp, method, path, body))


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    The endpoint factory of the peers' ``Agent``: one ``HostnameEndpoint`` per peer address, made once and
    reused. Twisted's default factory builds a new endpoint (parsing and IDNA-encoding the host) for every
    request, even when the connection pool then serves it from a kept connection.

    :param reactor: the reactor the endpoints connect with.
    :param float timeout: seconds allowed for a TCP connection to be established.
    """

    #: Addresses remembered at most; the cache starts over past this (peers come and go over months).
    LIMIT = 1024

    def __init__(self, reactor, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._endpoints: Dict[Tuple[bytes, int], HostnameEndpoint] = {}

    def endpointForURI(self, uri):
        if uri.scheme != b"http":
            raise SchemeNotSupported("peers are called over plain HTTP, not %r" % (uri.scheme,))
        return self.endpoint(uri.host.decode("ascii"), uri.port)

    def endpoint(self, host: str, port: int) -> HostnameEndpoint:
        """
        The endpoint to ``host`` (an address) and ``port``; the copy streams connect with it too.
        """
        key = (host, port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= self.LIMIT:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        return endpoint


class _Quiet:
    def __enter__(self):
        return None

    def __exit__(self, *exc_info):
        return False


_QUIET = _Quiet()
#: Failures on a connection the pool had kept: the peer may have restarted since. Worth one retry.
_RETRYABLE = (ResponseFailed, RequestTransmissionFailed, RequestNotSent, ConnectionLost, ConnectionDone)


class PeerClient:
    """
    :param http: a ``treq.client.HTTPClient`` (over a persistent pool), or a ``StubTreq`` in tests.
    :param clock: ``IReactorTime`` for timeouts.
    :param str tenant: the path prefix of every internal route.
    :param float timeout: seconds before a call fails.
    :param authenticator: a :class:`PeerAuthenticator`, or ``None``.
    :param metrics: receives ``peer_call(op, seconds)``.
    :param tracing: a :class:`~kvresponder.tracing.Tracing`, or ``None``.
    :param streams: a :class:`~kvresponder.copystream.CopyStreams` carrying the copies of client writes, or
        ``None`` to send them as HTTP requests.
    :param wall: this node's wall clock in seconds (expiries travel as the time they have left); by default
        the clock's ``seconds``.
    :param clock_offsets: a :class:`~kvresponder.clockskew.ClockOffsets` fed the peers' clocks from their
        answers, or ``None``.
    """

    def __init__(self, http, clock, tenant: str, timeout: float, authenticator=None, metrics=None,
                 tracing=None, log_policy=None, streams=None, wall: Optional[Callable[[], float]] = None,
                 clock_offsets=None) -> None:
        self._http = http
        self._wall = wall or clock.seconds
        self._clock_offsets = clock_offsets
        self.streams = streams
        self._clock = clock
        self._tenant = tenant
        self.timeout = timeout
        self._auth = authenticator
        self._metrics = metrics
        self._tracing = tracing if tracing is not None and tracing.enabled else None
        self._log = log_policy
        self._in_flight: Dict[Tuple[str, int], DeferredSemaphore] = {}
        self._queued: Dict[Tuple[str, int], list] = {}
        self._batches_in_flight: Dict[Tuple[str, int], int] = {}
        self._flush_scheduled: set = set()
        self._urls: Dict[str, EncodedURL] = {}

    async def _call(self, address: str, port: int, peer_id: str, op: str, payload: dict,
                    read: bool = False, timeout: Optional[float] = None, task_ids: Optional[List[bytes]] = None):
        # At most MAX_IN_FLIGHT calls to one peer at once: a burst of client requests queues here rather
        # than opening hundreds of connections to the peer (and hitting its connection cap).
        semaphore = self._in_flight.get((address, port))
        if semaphore is None:
            semaphore = self._in_flight[(address, port)] = DeferredSemaphore(MAX_IN_FLIGHT)
        await semaphore.acquire()
        try:
            return await self._one_call(address, port, peer_id, op, payload, read, timeout, task_ids)
        finally:
            semaphore.release()

    async def _one_call(self, address, port, peer_id, op, payload, read, timeout, task_ids=None):
        if self._tracing is None:
            return await self._traced_call(address, port, peer_id, op, payload, read, timeout, None, task_ids)
        with self._tracing.client_span(op, peer_id) as (carrier, span):
            return await self._traced_call(address, port, peer_id, op, payload, read, timeout, carrier)

    async def _traced_call(self, address, port, peer_id, op, payload, read, timeout, trace_headers,
                           task_ids=None):
        path = ("/%s/_internal/%s" % (self._tenant, op)).encode("ascii")
        url = "http://%s:%d%s" % (address, port, path.decode("ascii"))
        if isinstance(payload, bytes):
            body, content_type = payload, BATCH_TYPE
        else:
            body, content_type = json.dumps(payload, separators=(",", ":")).encode("utf-8"), b"application/json"
        started = self._clock.seconds()
        if task_ids is not None or (
                read and self._log is not None and not self._log.enabled("replication", DEBUG)):
            # A read at info level: no action to build, and no task for the peer to continue. A coalesced
            # batch: each of its writes has its own action and task id (sent in TASKS_HEADER).
            context = _QUIET
        else:
            context = (PEER_READ if read else PEER_CALL)(peer=peer_id, op=op)
        with context as action:
            try:
                for attempt in (1, 2):
                    headers = {b"Content-Type": [content_type]}
                    if action is not None and current_action() is not None:
                        # A fresh task id for each attempt, so that each shows up as its own subtree.
                        headers[TASK_HEADER] = [action.serialize_task_id()]
                    if task_ids:
                        headers[TASKS_HEADER] = [b" ".join(task_ids)]
                    if self._auth is not None:
                        headers[AUTH_HEADER] = [self._auth.sign(b"POST", path, body)]
                    if trace_headers:
                        for name, value in trace_headers.items():
                            headers[name.encode("ascii")] = [value.encode("ascii")]
                    try:
                        code, content = await self._post(url, headers, body, timeout or self.timeout, peer_id)
                        break
                    except _RETRYABLE:
                        if attempt == 2:
                            raise
                if action is not None:
                    action.add_success_fields(code=code)
            except Exception as error:
                # Whatever broke (refused, reset, timed out, a half-sent request), the caller's answer is
                # the same: this peer did not take the call, so fail over to the next one.
                raise PeerError("%s unreachable for %s: %s" % (peer_id, op, error.__class__.__name__))
            finally:
                if self._metrics is not None:
                    self._metrics.peer_call(op, self._clock.seconds() - started)
        if code != 200:
            raise PeerError("%s answered %d to %s" % (peer_id, code, op), code)
        try:
            return json.loads(content)
        except ValueError:
            raise PeerError("%s answered malformed JSON to %s" % (peer_id, op))

    def _post(self, url: str, headers, body: bytes, timeout: float, peer_id: str = "") -> Deferred:
        parsed = self._urls.get(url)
        if parsed is None:
            # treq parses a URL given as text on every call; a peer's few URLs are parsed once.
            if len(self._urls) >= 4096:
                self._urls.clear()
            parsed = self._urls[url] = EncodedURL.from_text(url)
        # Peers never redirect: skip treq's redirect layer.
        offsets = self._clock_offsets
        sent = self._wall() if offsets is not None else 0.0
        d = self._http.request("POST", parsed, headers=headers, data=body, allow_redirects=False)

        def read(response):
            if offsets is not None:
                self._clock_sample(peer_id, sent, response)
            return treq.content(response).addCallback(lambda content: (response.code, content))

        d.addCallback(read)
        d.addTimeout(timeout, self._clock)
        return d

    def _clock_sample(self, peer_id: str, sent: float, response) -> None:
        stamps = response.headers.getRawHeaders(CLOCK_HEADER)
        if not stamps:
            return
        try:
            peer_time = float(stamps[0])
        except ValueError:
            return
        if math.isfinite(peer_time):
            self._clock_offsets.round_trip(peer_id, sent, peer_time, self._wall())

    # -- operations -----------------------------------------------------------------------------------

    async def apply(self, peer, entries: Sequence[Entry], timeout: Optional[float] = None) -> List[ApplyResult]:
        """
        Store entries on ``peer``; each result says whether it was newer there and whether a live value
        was replaced.
        """
        answer = await self._call(peer.address, peer.port, peer.node_id, "apply",
                                  encode_batch(entries, self._wall()), timeout=timeout)
        return _apply_results(answer, peer, len(entries))

    async def get(self, peer, key: str) -> Optional[Entry]:
        """
        The newest entry ``peer`` holds for ``key``, tombstones included.
        """
        answer = await self._call(peer.address, peer.port, peer.node_id, "get", {"key": key}, read=True)
        data = answer.get("entry") if isinstance(answer, dict) else None
        if data is None:
            return None
        try:
            return entry_from_wire(data, self._wall())
        except ValueError:
            raise PeerError("%s answered a malformed entry" % (peer.node_id,))

    def apply_coalesced(self, peer, entry: Entry) -> Deferred:
        """
        Store one entry on ``peer``, sharing one request with the other writes to that peer queued in the same
        reactor turn, or while :data:`MAX_BATCHES_IN_FLIGHT` earlier batches to it are out: under concurrent
        load, one HTTP call carries many replicated writes. The peer continues each entry's own Eliot task
        (a child of the caller's current action, or, at debug level, of a peer-call action per write), so a
        write's tree is the same as if it had gone alone. With tracing on, each write goes alone, so that its
        spans keep their parent.

        :return: a Deferred firing with the entry's :class:`~kvresponder.store.ApplyResult`, or failing with
            :class:`PeerError`.
        """
        if self._tracing is not None:
            return ensureDeferred(self.apply(peer, [entry])).addCallback(lambda results: results[0])
        key = (peer.address, peer.port)
        queue = self._queued.get(key)
        if queue is None:
            queue = self._queued[key] = []
        action = task_id = None
        if self._log is None or self._log.enabled("replication", DEBUG):
            action = PEER_CALL(peer=peer.node_id, op="apply")
            task_id = action.serialize_task_id()
        else:
            # At info, no action of its own: the peer continues the caller's (the client request's), so the
            # replica's store action still lands in the write's tree, for two log lines fewer per copy.
            parent = current_action()
            if parent is not None:
                task_id = parent.serialize_task_id()
        waiter: Deferred = Deferred()
        queue.append((entry, waiter, action, task_id))
        self._schedule(peer, key, queue, self._flush)
        return waiter

    def _schedule(self, peer, key, queue: list, flush) -> None:
        """
        Send ``queue`` (the calls waiting for one peer under ``key``) with ``flush``: at once if it is full;
        at the end of this reactor turn if fewer than MAX_BATCHES_IN_FLIGHT of its batches are out; otherwise
        when one of them comes back (:meth:`_batch_done`).
        """
        if len(queue) >= MAX_COALESCED:
            flush(peer, key)
        elif key not in self._flush_scheduled and self._batches_in_flight.get(key, 0) < MAX_BATCHES_IN_FLIGHT:
            self._flush_scheduled.add(key)
            self._clock.callLater(0, self._scheduled_flush, peer, key, flush)

    def _scheduled_flush(self, peer, key, flush) -> None:
        self._flush_scheduled.discard(key)
        flush(peer, key)

    def _batch_done(self, peer, key, flush) -> None:
        self._batches_in_flight[key] -= 1
        if self._queued.get(key) and key not in self._flush_scheduled:
            # Calls queued while the batches were out: they go now, together.
            flush(peer, key)

    def _take_batch(self, key, size=None) -> list:
        """
        The calls queued under ``key``, now one batch in flight (empty if none were queued). With ``size`` (the
        bytes of one queued call), the batch stops before it passes :data:`MAX_BATCH_BYTES`, and the calls
        after it stay queued for the next.
        """
        queue = self._queued.pop(key, None) or []
        if size is not None and len(queue) > 1:
            total = 0
            for index, item in enumerate(queue):
                total += size(item)
                if total > MAX_BATCH_BYTES and index > 0:
                    self._queued[key] = queue[index:]
                    queue = queue[:index]
                    break
        if queue:
            self._batches_in_flight[key] = self._batches_in_flight.get(key, 0) + 1
        return queue

    def _flush(self, peer, key) -> None:
        queue = self._take_batch(key, _queued_write_size)
        if not queue:
            return
        try:
            d = self._send_copies(peer, [item[0] for item in queue], [item[3] or b"-" for item in queue])
        except Exception:
            # The batch could not even be sent: fail its writes (they fail over) rather than leave them, and
            # every later write to this peer, waiting for a batch that never returns.
            d = fail()

        finished = set()

        def answered(results):
            for (_, waiter, action, _), result in zip(queue, results):
                if action is not None:
                    action.add_success_fields(code=200)
                    action.finish()
                    finished.add(id(action))
                waiter.callback(result)

        def failed(failure):
            code = getattr(failure.value, "code", None)
            for _, waiter, action, _ in queue:
                if action is not None and id(action) not in finished:
                    if code is not None:
                        # The peer answered, with an unusable status: the call itself completed.
                        action.add_success_fields(code=code)
                        action.finish()
                    else:
                        action.finish(failure.value)
                if not waiter.called:
                    waiter.errback(PeerError(str(failure.value)) if not failure.check(PeerError)
                                   else failure)
            if code is None:
                self._fail_queued(key, failure)

        d.addCallbacks(answered, failed)
        d.addErrback(failed)
        d.addBoth(lambda _: self._batch_done(peer, key, self._flush))

    def _send_copies(self, peer, entries: List[Entry], task_ids: List[bytes]) -> Deferred:
        """
        One batch of copies of client writes to ``peer``: over its copy stream, or as an HTTP call when there
        is none or the peer refused one.

        :return: a Deferred firing with one :class:`ApplyResult` an entry, or failing with :class:`PeerError`.
        """
        streams = self.streams
        if streams is None or not streams.usable(peer):
            return self._send_copies_as_request(peer, entries, task_ids)
        started = self._clock.seconds()

        def done(result):
            if isinstance(result, Failure) and result.check(StreamRefused):
                return self._send_copies_as_request(peer, entries, task_ids)
            if self._metrics is not None:
                self._metrics.peer_call("apply", self._clock.seconds() - started)
            if not isinstance(result, Failure):
                if len(result) != len(entries):
                    raise PeerError("%s answered a malformed apply result" % (peer.node_id,))
                return result
            if result.check(StreamError):
                raise PeerError("%s %s to apply" % (peer.node_id, result.value), result.value.code)
            raise PeerError("%s unreachable for apply: %s" % (peer.node_id, result.value.__class__.__name__))

        return streams.send(peer, entries, task_ids, self.timeout).addBoth(done)

    def _send_copies_as_request(self, peer, entries, task_ids) -> Deferred:
        d = ensureDeferred(self._call(peer.address, peer.port, peer.node_id, "apply",
                                      encode_batch(entries, self._wall()), task_ids=task_ids))
        return d.addCallback(_apply_results, peer, len(entries))

    def _fail_queued(self, key, failure) -> None:
        """
        A batch to this peer went unanswered: fail the calls queued behind it at once, so that they fail over
        to the next nodes now rather than each wait out another timeout on the same peer.
        """
        queue = self._queued.pop(key, None) or []
        error = PeerError("an earlier batch to this peer went unanswered (%s)" % (failure.value,))
        for item in queue:
            action = item[2] if len(item) == 4 else None
            if action is not None:
                action.finish(error)
            if not item[1].called:
                item[1].errback(error)

    def get_coalesced(self, peer, key: str) -> Deferred:
        """
        The newest entry ``peer`` holds for ``key``, tombstones included, sharing one ``get`` request with the
        other reads from that peer queued in the same reactor turn, or while a read batch to it is out (as
        :meth:`apply_coalesced` does for writes). With tracing on, each read goes alone.

        :return: a Deferred firing with an :class:`~kvresponder.store.Entry` or ``None``, or failing with
            :class:`PeerError`.
        """
        if self._tracing is not None:
            return ensureDeferred(self.get(peer, key))
        slot = ("get", peer.address, peer.port)
        queue = self._queued.get(slot)
        if queue is None:
            queue = self._queued[slot] = []
        waiter: Deferred = Deferred()
        queue.append((key, waiter))
        self._schedule(peer, slot, queue, self._flush_reads)
        return waiter

    def _flush_reads(self, peer, slot) -> None:
        queue = self._take_batch(slot)
        if not queue:
            return
        try:
            d = ensureDeferred(self.get_many(peer, [key for key, _ in queue]))
        except Exception:
            d = fail()

        def answered(entries):
            for (_, waiter), entry in zip(queue, entries):
                waiter.callback(entry)

        def failed(failure):
            error = failure if failure.check(PeerError) else PeerError(str(failure.value))
            for _, waiter in queue:
                if not waiter.called:
                    waiter.errback(error)
            if getattr(failure.value, "code", None) is None:
                self._fail_queued(slot, failure)

        d.addCallbacks(answered, failed)
        d.addErrback(failed)
        d.addBoth(lambda _: self._batch_done(peer, slot, self._flush_reads))

    async def get_many(self, peer, keys: Sequence[str]) -> List[Optional[Entry]]:
        """
        The newest entry ``peer`` holds for each key, tombstones included.
        """
        answer = await self._call(peer.address, peer.port, peer.node_id, "get", {"keys": list(keys)}, read=True)
        items = answer.get("entries") if isinstance(answer, dict) else None
        if not isinstance(items, list) or len(items) != len(keys):
            raise PeerError("%s answered a malformed batch" % (peer.node_id,))
        now = self._wall()
        try:
            return [None if item is None else entry_from_wire(item, now) for item in items]
        except ValueError:
            raise PeerError("%s answered a malformed entry" % (peer.node_id,))

    async def keys(self, peer, prefix: str, after: Optional[str], limit: int) -> List[str]:
        answer = await self._call(peer.address, peer.port, peer.node_id, "keys",
                                  {"prefix": prefix, "after": after, "limit": limit}, read=True)
        keys = answer.get("keys") if isinstance(answer, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise PeerError("%s answered malformed keys" % (peer.node_id,))
        return keys

    async def differing_buckets(self, peer, sender: str, buckets: Dict[int, str]) -> List[int]:
        """
        Anti-entropy, step one: which of our bucket digests differ from the peer's.
        """
        answer = await self._call(peer.address, peer.port, peer.node_id, "sync/buckets",
                                  {"from": sender, "buckets": {str(b): h for b, h in buckets.items()}})
        differing = answer.get("differ") if isinstance(answer, dict) else None
        if not isinstance(differing, list):
            raise PeerError("%s answered malformed buckets" % (peer.node_id,))
        return [int(bucket) for bucket in differing]

    async def wanted(self, peer, versions: Dict[str, Version]) -> List[str]:
        """
        Anti-entropy, step two: which of these keys the peer lacks or holds at an older version.
        """
        answer = await self._call(peer.address, peer.port, peer.node_id, "sync/versions",
                                  {"versions": {key: list(version) for key, version in versions.items()}})
        keys = answer.get("want") if isinstance(answer, dict) else None
        if not isinstance(keys, list):
            raise PeerError("%s answered malformed versions" % (peer.node_id,))
        return [key for key in keys if key in versions]

    async def request_sync(self, peer, sender: str, timeout: float) -> dict:
        """
        Ask ``peer`` to run a rebalance pass now (handing ``sender`` its share) and answer when done.
        """
        return await self._call(peer.address, peer.port, peer.node_id, "sync/request", {"from": sender},
                                timeout=timeout)


def _queued_write_size(item) -> int:
    return item[0].size


def _apply_results(answer, peer, count: int) -> List[ApplyResult]:
    """
    The results in a peer's JSON answer to ``apply``, one an entry.
    """
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or len(results) != count:
        raise PeerError("%s answered a malformed apply result" % (peer.node_id,))
    try:
        return [_apply_result(*result) for result in results]
    except (TypeError, ValueError):
        raise PeerError("%s answered a malformed apply result" % (peer.node_id,))


def _apply_result(applied, had_live, newer=None) -> ApplyResult:
    # A third element, the newer version the peer holds, comes only when it held one.
    return ApplyResult(bool(applied), bool(had_live), None if newer is None else version_from_wire(newer))


__all__ = ["CachedEndpoints", "PeerClient", "PeerError", "PeerAuthenticator", "version_from_wire"]
