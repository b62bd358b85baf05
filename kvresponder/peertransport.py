"""
The transport of every call to a peer's internal routes: treq over one persistent connection pool.

:class:`PeerTransport` sends one call and does everything a call needs but its meaning: at most
:data:`MAX_IN_FLIGHT` calls to a peer at once, an explicit timeout on the injected clock, one immediate retry on a
connection that turns out stale (every internal operation is idempotent), a fresh Eliot task id for the peer to
continue, the trace context, an HMAC signature with a cluster secret (:class:`PeerAuthenticator`), the call's
metrics, and a sample of the peer's clock from its answer (``X-KV-Clock``, :mod:`kvresponder.clockskew`).
What the calls mean, the verbs, is :class:`~kvresponder.peers.PeerClient`'s.
"""

import hashlib
import hmac
import json
import math
import secrets
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from eliot import current_action
from twisted.internet.defer import Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.web.client import RequestTransmissionFailed, ResponseFailed
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

import treq
from hyperlink import EncodedURL

from .clockskew import start_time
from .log import DEBUG
from .privateapi import RequestNotSent
from .log.replication import PEER_CALL, PEER_READ
from .suspects import SuspectPeers, suspect_refusal, unreachable
from .wire import BATCH_TYPE

AUTH_HEADER = b"X-KV-Auth"
#: The signature of an internal request's method, path and body length alone, checked from its head: a body larger
#: than a client's may be read only once the head shows it comes from a peer (:meth:`PeerAuthenticator.sign_length`).
LENGTH_AUTH_HEADER = b"X-KV-Auth-Length"
#: A peer's wall clock when it answered an internal call, in Unix seconds: a round-trip sample of its clock
#: offset (:mod:`kvresponder.clockskew`).
CLOCK_HEADER = b"X-KV-Clock"
TASK_HEADER = b"X-Eliot-Task-Id"
#: For a coalesced batch of writes: one Eliot task id per entry, space-separated ("-" for none).
TASKS_HEADER = b"X-Eliot-Task-Ids"


def task_ids_header(task_ids: Sequence[bytes], budget: Optional[int]) -> bytes:
    """
    The value of :data:`TASKS_HEADER` for a batch's ``task_ids``: within ``budget`` bytes, the ids past it each
    sent as ``-`` (no task: the peer logs that copy in a tree of its own). A batch of 256 coalesced writes carries
    some 11 KiB of ids, and a peer whose ``MAX_HEADER_BYTES`` is below that refused the whole batch.
    """
    value = b" ".join(task_ids)
    if budget is None or len(value) <= budget:
        return value
    kept = []
    used = 0
    for index, task_id in enumerate(task_ids):
        # Room for this id and a "-" for each one after it.
        if used + len(task_id) + 2 * (len(task_ids) - index - 1) + 1 > budget:
            kept.extend([b"-"] * (len(task_ids) - index))
            break
        kept.append(task_id)
        used += len(task_id) + 1
    return b" ".join(kept)
#: Concurrent calls to one peer; more wait their turn.
MAX_IN_FLIGHT = 64
#: Seconds a signed peer request stays valid.
AUTH_WINDOW = 60.0


def error_named(answer: bytes) -> Optional[str]:
    """
    The ``error`` an error answer's JSON body names, or ``None`` if it names none.
    """
    try:
        error = json.loads(answer).get("error")
    except (ValueError, AttributeError, RecursionError):
        return None
    return error if isinstance(error, str) else None


class PeerError(Exception):
    """
    A peer did not answer usefully: unreachable, timed out, or an unexpected status.

    :ivar code: the HTTP status the peer answered, or ``None`` if it did not answer.
    :ivar error: the ``error`` its JSON answer named (such as ``leaving``), or ``None``.
    """

    def __init__(self, message: str, code: Optional[int] = None, error: Optional[str] = None) -> None:
        Exception.__init__(self, message)
        self.code = code
        self.error = error


#: Signatures :meth:`PeerAuthenticator.first_use` remembers at most: far more than any legitimate traffic spends in
#: one window (each is a body over 64 KiB, or a copy stream's opening).
MAX_SPENT = 65536


def _nonce_digits() -> int:
    return secrets.randbelow(1000000)


class _SpentSignatures:
    """
    The signatures already spent, each kept until it can no longer pass the window (its time stamp plus
    :data:`AUTH_WINDOW`, on this node's clock); pruned when their number has doubled since the last pruning, and
    at most ``limit`` of them.
    """

    def __init__(self, wall: Callable[[], float], limit: int = MAX_SPENT) -> None:
        self._wall = wall
        self._limit = limit
        self._until: Dict[str, float] = {}
        self._prune_at = min(limit, 1024)

    def spend(self, mac: str, signed_at: float) -> bool:
        """
        Whether ``mac`` is spent now for the first time (``False``: seen before, or no room left to remember it).
        """
        if mac in self._until:
            return False
        if len(self._until) >= self._prune_at:
            now = self._wall()
            self._until = {key: until for key, until in self._until.items() if until >= now}
            self._prune_at = min(self._limit, max(1024, 2 * len(self._until)))
            if len(self._until) >= self._limit:
                return False
        self._until[mac] = signed_at + AUTH_WINDOW
        return True


class PeerAuthenticator:
    """
    Signs and checks internal requests with a key derived from the cluster secret.

    The signature covers the time, the method, the path and a hash of the body, so a captured request can
    only be replayed, unchanged, for :data:`AUTH_WINDOW` seconds; replays are harmless because every internal
    operation is idempotent. What a signature grants beyond that is granted once (:meth:`first_use`).
    """

    def __init__(self, key: bytes, wall: Callable[[], float], clock_allowance: float = 0.0,
                 steady: Optional[Callable[[], float]] = None) -> None:
        """
        :param clock_allowance: seconds a peer's clock may be behind this node's (twice ``MAX_CLOCK_OFFSET``).
        :param steady: a clock that does not step (the reactor's), in seconds: when this node started is then
            read as the wall clock's time now less the time since, so that a node started with its clock ahead
            and set right since takes its peers' signatures again. ``None``: the wall clock's reading at start.
        """
        self._key = key
        self._wall = wall
        self._spent = _SpentSignatures(wall)
        #: Signatures spent before this process started are not in ``_spent``: one signed before it started (by
        #: more than a clock behind ours could make it look) may be a replay of one spent by the previous process.
        if steady is None:
            started = wall()
            self._started = lambda: started
        else:
            self._started = start_time(wall, steady)
        self._clock_allowance = clock_allowance

    def first_use(self, header: Optional[bytes]) -> bool:
        """
        Whether ``header``, a signature that has passed its check, is used here for the first time. For what a
        signature grants beyond an idempotent operation, which a replay within the window must not get again:
        a large body's exemption from the body budget (:data:`LENGTH_AUTH_HEADER`), and a copy stream. One
        signed before this node started is taken for a replay: the record of those spent went with the previous
        process (a captured upgrade, sent again after a restart, opened a stream).
        """
        fresh = self._fresh(header)
        if fresh is None or float(fresh[0]) < self._started() - self._clock_allowance:
            return False
        return self._spent.spend(fresh[1], float(fresh[0]))

    def _mac(self, stamp: str, method: bytes, path: bytes, body: bytes) -> str:
        digest = hashlib.sha256(body).hexdigest().encode("ascii")
        message = b"|".join([stamp.encode("ascii"), method, path, digest])
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _stamp(self) -> str:
        # The time, and random digits past its microseconds: two peers that share the key sign the same call in
        # the same instant differently, so :meth:`first_use` never takes one for the other's replay. It is still
        # a number, which a node older than this reads (and checks the MAC over) as it always has.
        return "%.6f%06d" % (self._wall(), _nonce_digits())

    def sign(self, method: bytes, path: bytes, body: bytes) -> bytes:
        stamp = self._stamp()
        return ("%s:%s" % (stamp, self._mac(stamp, method, path, body))).encode("ascii")

    def sign_length(self, method: bytes, path: bytes, length: int) -> bytes:
        """
        The :data:`LENGTH_AUTH_HEADER` of a request: a signature over its time, method, path and body length, which
        the peer can check before it reads the body (:data:`AUTH_HEADER` covers the body itself).
        """
        stamp = self._stamp()
        return ("%s:%s" % (stamp, self._length_mac(stamp, method, path, length))).encode("ascii")

    def _length_mac(self, stamp: str, method: bytes, path: bytes, length: int) -> str:
        message = b"|".join([b"length", stamp.encode("ascii"), method, path, b"%d" % (length,)])
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def verify_length(self, header: Optional[bytes], method: bytes, path: bytes, length: int) -> bool:
        """
        Whether ``header`` (a :data:`LENGTH_AUTH_HEADER`) signs ``method``, ``path`` and ``length``, within
        :data:`AUTH_WINDOW`.
        """
        fresh = self._fresh(header)
        return fresh is not None and hmac.compare_digest(fresh[1], self._length_mac(fresh[0], method, path, length))

    def _fresh(self, header: Optional[bytes]) -> Optional[Tuple[str, str]]:
        """
        The time stamp and MAC of a signature ``header`` (``<time>:<mac>``) signed within :data:`AUTH_WINDOW` of
        this node's clock, or ``None``.
        """
        if not header:
            return None
        try:
            stamp, mac = header.decode("ascii").split(":", 1)
            when = float(stamp)
        except (UnicodeDecodeError, ValueError):
            return None
        if not math.isfinite(when) or abs(self._wall() - when) > AUTH_WINDOW:
            return None
        return stamp, mac

    def stream_key(self) -> bytes:
        """
        The key of the copy streams' frame MACs (:mod:`kvresponder.copystream`), derived from this one.
        """
        return hmac.new(self._key, b"kvresponder:copy-stream", hashlib.sha256).digest()

    @staticmethod
    def signed_at(header: Optional[bytes]) -> Optional[float]:
        """
        The time a request's signature ``header`` says it was signed at (the sender's clock), or ``None``.
        Only meaningful once :meth:`verify` has accepted the header.
        """
        try:
            when = float(header.decode("ascii").split(":", 1)[0])
        except (AttributeError, UnicodeDecodeError, ValueError):
            return None
        return when if math.isfinite(when) else None

    def verify(self, header: Optional[bytes], method: bytes, path: bytes, body: bytes) -> bool:
        fresh = self._fresh(header)
        return fresh is not None and hmac.compare_digest(fresh[1], self._mac(fresh[0], method, path, body))


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    The endpoint factory of the peers' ``Agent``: one ``TCP4ClientEndpoint`` per peer address, made once and
    reused. Twisted's default factory builds a new endpoint (parsing and IDNA-encoding the host) for every
    request, even when the connection pool then serves it from a kept connection.

    A peer's address is always an IPv4 address (discovery refuses any other), so there is no name to resolve
    and no address family to race: a ``HostnameEndpoint`` would only add its Happy Eyeballs attempt delay
    (0.3 s) to every refused connection, which reports its failure once that delay has passed. A peer whose
    process is gone while its address stays (a container restarting) would cost each copy and read for it that
    much until it expires.

    :param reactor: the reactor the endpoints connect with.
    :param float timeout: seconds allowed for a TCP connection to be established.
    """

    #: Addresses remembered at most; the cache starts over past this (peers come and go over months).
    LIMIT = 1024

    def __init__(self, reactor, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._endpoints: Dict[Tuple[bytes, int], TCP4ClientEndpoint] = {}

    def endpointForURI(self, uri):
        if uri.scheme != b"http":
            raise SchemeNotSupported("peers are called over plain HTTP, not %r" % (uri.scheme,))
        return self.endpoint(uri.host.decode("ascii"), uri.port)

    def endpoint(self, host: str, port: int) -> TCP4ClientEndpoint:
        """
        The endpoint to ``host`` (an address) and ``port``; the copy streams connect with it too.
        """
        key = (host, port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= self.LIMIT:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = TCP4ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        return endpoint


class _Quiet:
    def __enter__(self):
        return None

    def __exit__(self, *exc_info):
        return False


_QUIET = _Quiet()
#: The calls whose timeout makes their peer a suspect: the ones that client requests wait on (a copy, a read, a
#: listing's page: each a bounded piece of work for the peer).
_SUSPECT_ON_TIMEOUT = frozenset(["apply", "get", "keys"])
#: Failures on a connection the pool had kept: the peer may have restarted since. Worth one retry.
_RETRYABLE = (ResponseFailed, RequestTransmissionFailed, RequestNotSent, ConnectionLost, ConnectionDone)


class PeerTransport:
    """
    :param http: a ``treq.client.HTTPClient`` (over a persistent pool), or a ``StubTreq`` in tests.
    :param clock: ``IReactorTime`` for timeouts.
    :param str tenant: the path prefix of every internal route.
    :param float timeout: seconds before a call fails.
    :param authenticator: a :class:`PeerAuthenticator`, or ``None``.
    :param metrics: receives ``peer_call(op, seconds)``.
    :param tracing: a :class:`~kvresponder.tracing.Tracing`, or ``None``.
    :param log_policy: lets a read at info level skip its action.
    :param wall: this node's wall clock in seconds, for the clock samples; by default the clock's ``seconds``.
    :param clock_offsets: a :class:`~kvresponder.clockskew.ClockOffsets` fed the peers' clocks from their
        answers, or ``None``.
    :param suspects: the node's :class:`~kvresponder.suspects.SuspectPeers`: a call to a suspect fails at once,
        and one that finds its peer unreachable makes it one. By default, this transport's own.
    :param post: ``post(url, headers, body, timeout, peer_id)``, a Deferred firing with the answer's status and
        body: how each attempt of a call is sent. By default a POST through ``http``; tests give one that answers
        when they say.
    """

    def __init__(self, http, clock, tenant: str, timeout: float, authenticator=None, metrics=None,
                 tracing=None, log_policy=None, wall: Optional[Callable[[], float]] = None,
                 clock_offsets=None, suspects=None,
                 post: Optional[Callable[..., Deferred]] = None, max_header_bytes: Optional[int] = None) -> None:
        self._http = http
        #: Bytes of a batch's task ids, at most (half of MAX_HEADER_BYTES, which the peer holds its headers to).
        self._task_ids_budget = None if max_header_bytes is None else max_header_bytes // 2
        self._send = post if post is not None else self._post
        self._clock = clock
        self._tenant = tenant
        self.timeout = timeout
        self._auth = authenticator
        self._metrics = metrics
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self._log = log_policy
        self._wall = wall or clock.seconds
        self._clock_offsets = clock_offsets
        self.suspects = suspects if suspects is not None else SuspectPeers(clock)
        self._in_flight: Dict[Tuple[str, int], DeferredSemaphore] = {}
        self._urls: Dict[str, EncodedURL] = {}

    async def call(self, peer, op: str, payload, read: bool = False, timeout: Optional[float] = None,
                   task_ids: Optional[List[bytes]] = None):
        """
        POST ``payload`` (bytes: an entry batch; otherwise JSON) to ``peer``'s ``/_internal/<op>``.

        :param peer: has ``node_id``, ``address`` and ``port``.
        :param bool read: a read, whose action is logged at debug level only.
        :param task_ids: for a batch of coalesced writes, each write's own Eliot task id: the call then has no
            action of its own.
        :return: the JSON answer.
        :raises PeerError: the peer did not answer 200 with JSON in time.
        """
        self._check_suspect(peer, op)
        # At most MAX_IN_FLIGHT calls to one peer at once: a burst of client requests queues here rather
        # than opening hundreds of connections to the peer (and hitting its connection cap).
        key = (peer.address, peer.port)
        semaphore = self._in_flight.get(key)
        if semaphore is None:
            semaphore = self._in_flight[key] = DeferredSemaphore(MAX_IN_FLIGHT)
        due = self._clock.seconds() + (timeout or self.timeout)
        turn = semaphore.acquire()
        waited = not turn.called
        if waited:
            # The wait for a turn counts in the call's timeout: behind calls to a peer that does not answer,
            # a caller must not wait one more timeout for every MAX_IN_FLIGHT calls ahead of it.
            turn.addTimeout(due - self._clock.seconds(), self._clock)
            try:
                await turn
            except TimeoutError:
                raise PeerError("%s unreachable for %s: no turn among its %d calls in time"
                                % (peer.node_id, op, MAX_IN_FLIGHT))
        try:
            # Again: the peer may have become a suspect while this call waited for its turn.
            self._check_suspect(peer, op)
            if waited and self._clock.seconds() >= due:
                # The turn came as the wait's own timeout was due: a request sent now could not be answered.
                raise PeerError("%s unreachable for %s: its turn came with no time left" % (peer.node_id, op))
            if self.tracing is None:
                return await self._call(peer, op, payload, read, timeout, None, task_ids, due, waited)
            with self.tracing.client_span(op, peer.node_id) as (carrier, span):
                return await self._call(peer, op, payload, read, timeout, carrier, task_ids, due, waited)
        finally:
            semaphore.release()
            if semaphore.tokens == semaphore.limit and self._in_flight.get(key) is semaphore:
                # No call to this address out or waiting: forget it (a pod gets a new address at every restart).
                del self._in_flight[key]

    def _check_suspect(self, peer, op: str) -> None:
        if self.suspects.suspected(peer):
            raise PeerError(suspect_refusal(peer, op))

    async def _call(self, peer, op, payload, read, timeout, trace_headers, task_ids, due: float, waited: bool):
        peer_id = peer.node_id
        path = ("/%s/_internal/%s" % (self._tenant, op)).encode("ascii")
        url = "http://%s:%d%s" % (peer.address, peer.port, path.decode("ascii"))
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
        # Both attempts together end by ``due``, the call's timeout from when it was made: a caller that fails
        # over after it must not have waited two.
        with context as action:
            try:
                for attempt in (1, 2):
                    headers = {b"Content-Type": [content_type]}
                    if action is not None and current_action() is not None:
                        # A fresh task id for each attempt, so that each shows up as its own subtree.
                        headers[TASK_HEADER] = [action.serialize_task_id()]
                    if task_ids:
                        headers[TASKS_HEADER] = [task_ids_header(task_ids, self._task_ids_budget)]
                    if self._auth is not None:
                        headers[AUTH_HEADER] = [self._auth.sign(b"POST", path, body)]
                        headers[LENGTH_AUTH_HEADER] = [self._auth.sign_length(b"POST", path, len(body))]
                    if trace_headers:
                        for name, value in trace_headers.items():
                            headers[name.encode("ascii")] = [value.encode("ascii")]
                    try:
                        code, content = await self._send(url, headers, body, due - self._clock.seconds(), peer_id)
                        break
                    except _RETRYABLE:
                        if attempt == 2 or self._clock.seconds() >= due:
                            raise
                self.suspects.answered(peer)
                if action is not None:
                    action.add_success_fields(code=code)
            except Exception as error:
                # Whatever broke (refused, reset, timed out, a half-sent request), the caller's answer is
                # the same: this peer did not take the call, so fail over to the next one.
                if unreachable(error):
                    self.suspects.failed(peer, error.__class__.__name__)
                elif op in _SUSPECT_ON_TIMEOUT and timeout is None and not waited and self._clock.seconds() >= due:
                    # No answer in time to a call a client waits on (a copy, a read, a page of keys: the peer
                    # does little for them; a long walk such as anti-entropy's may take its time). Told by the time: the call's
                    # own timeout cancels it, which treq reports as a response never received. Not a call that
                    # waited for its turn: the peer had less than the whole timeout to answer it.
                    self.suspects.timed_out(peer, due)
                raise PeerError("%s unreachable for %s: %s" % (peer_id, op, error.__class__.__name__))
            finally:
                if self._metrics is not None:
                    self._metrics.peer_call(op, self._clock.seconds() - started)
        if code != 200:
            raise PeerError("%s answered %d to %s" % (peer_id, code, op), code, error_named(content))
        try:
            return json.loads(content)
        except (ValueError, RecursionError):
            raise PeerError("%s answered malformed JSON to %s" % (peer_id, op))

    def _post(self, url: str, headers, body: bytes, timeout: float, peer_id: str = "") -> Deferred:
        parsed = self._urls.get(url)
        if parsed is None:
            # treq parses a URL given as text on every call; a peer's few URLs are parsed once.
            if len(self._urls) >= 4096:
                self._urls.clear()
            parsed = self._urls[url] = EncodedURL.from_text(url)
        offsets = self._clock_offsets
        sent = self._wall() if offsets is not None else 0.0
        # Peers never redirect: skip treq's redirect layer.
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
