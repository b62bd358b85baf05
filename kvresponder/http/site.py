"""
The HTTP server around the resource tree: request accounting and the limits that protect the node.

:class:`KVRequest` measures every request (the Prometheus counter and histogram, keyed by route template),
finishes its Eliot action, refuses a body over the route's limit without buffering it, and turns any
unexpected exception into a JSON 500 without a traceback. :class:`KVSite` caps open connections and sets
header and idle limits.
"""

import json
from contextlib import nullcontext
from io import BytesIO
from typing import Callable, Optional

from eliot import write_traceback
from twisted.internet import tcp
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString, unquote
from twisted.web.server import Request, Site

from ..log import DEBUG, INFO
from ..log.http import HTTP_READ, HTTP_REJECTED, HTTP_REQUEST
from ..privateapi import (answer_bad_requests, channel_between_requests, channel_waiting_for_transport,
                          give_connection_to, handle_star, request_gone, request_target, skip_form_parsing,
                          stop_channel, stop_idle_timeout, take_unread, tcp_write_is_queued)
from ..sendnow import send_now
from ..turn import EndOfTurn
from .errors import APIError, error_body, write_error
from .fastlane import ConnectionLane, FastLane
from .hosts import host_refusal
from .limits import (BULK, INTERNAL, INTERNAL_FLOOR, SMALL_BODY, VALUE, BodyBudget, default_body_buffer,
                     internal_body_limit as internal_limit_for)
from .peerguard import SIGNED_BY_PEER, UNSIGNED


class _Discard:
    """
    Stands in for the body buffer of a request that is too large: it swallows what arrives.
    """

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        pass


_UNLOGGED = nullcontext()

_date_cache = [-1, b""]


def http_date(now: float) -> bytes:
    """
    The HTTP Date header value for ``now``, formatted at most once a second.
    """
    second = int(now)
    if second != _date_cache[0]:
        _date_cache[1] = datetimeToString(second)
        _date_cache[0] = second
    return _date_cache[1]


#: The methods a metric names; any other is counted as ``other``: a label takes whatever text a client sends as
#: its method, and each new one would add series to every scrape, for good.
_METHODS = {method.encode("ascii"): method for method in
            ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT")}
OTHER_METHOD = "other"

#: The ``method`` label of an answer given before a request could be read: a connection over the cap
#: (route ``refused``), or bytes Twisted's parser refused (route ``malformed``).
UNREAD_METHOD = "none"


def origin_form(target: bytes) -> bytes:
    """
    The path of a request target: ``target`` itself, or, for the absolute form a client sends to a proxy
    (``http://host:port/t1/kv/k``), which a server must accept too (RFC 9112, 3.2.2), what follows its authority.
    """
    if target[:1] == b"/" or not (target[:7].lower() == b"http://" or target[:8].lower() == b"https://"):
        return target
    rest = target.split(b"//", 1)[1]
    slash = rest.find(b"/")
    return rest[slash:] if slash >= 0 else b"/"


def target_refusal(target: bytes) -> Optional[str]:
    """
    Why a request target is refused, or ``None``: this server takes a path (or the absolute form, or ``*``), and
    is no proxy; the authority form (``CONNECT host:443``) or a bare word would otherwise be read as a path.
    """
    if target[:1] == b"/" or target == b"*" or origin_form(target) is not target:
        return None
    return "The request target must be a path, such as /<tenant>/kv/<key>: this server is not a proxy."


def client_text(address) -> str:
    """
    A connection's peer as a log line gives it: ``host:port`` (``[host]:port`` for IPv6), which log tools can
    filter on and join with the client's own logs, not the repr of Twisted's address object.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)  # a UNIX socket's, or a test's stand-in
    return ("[%s]:%s" if ":" in host else "%s:%s") % (host, port)


def method_name(method: bytes) -> str:
    """
    ``method`` as a metric label: its name if it is one of HTTP's, else :data:`OTHER_METHOD`.
    """
    return _METHODS.get(method, OTHER_METHOD)


class KVRequest(Request):
    """
    A request that knows its route template, its limits, and how to account for itself.
    """

    route = "unmatched"
    _too_large = False
    _received = 0
    _started: Optional[float] = None
    _action = None
    _accounted = False
    _span = None

    def __init__(self, *args, **kwargs) -> None:
        Request.__init__(self, *args, **kwargs)
        # The API speaks JSON only: a form POST gets a 415 from its route, not Twisted's form parsing.
        skip_form_parsing(self)
        if isinstance(self.transport, _Cork):
            # Made while the channel is corked: the request keeps the connection's own transport, not a cork that
            # is gone once the turn ends (the request writes through its channel, which has the cork).
            self.transport = self.transport._transport

    _limit = None
    #: The site's :class:`BodyBudget`, if this request's body holds room in it, and the bytes it holds.
    _budget = None
    _held = 0
    #: Whether its body did not fit the budget: it is dropped as it arrives, and the request answered 503.
    _over_budget = False

    def name_route(self, route: str) -> None:
        """
        Name the route template this request is counted and traced under, where its handler answers it without
        :meth:`begin` (a refusal, an internal route); ``unmatched`` for one that no route takes.
        """
        self.route = route

    def set_body_limit(self, limit: int) -> None:
        """
        The route's body limit, found by the channel from the head (``KVSite.body_limit_for``).
        """
        self._limit = limit

    def hold_body(self, budget: BodyBudget, size: int) -> None:
        """
        Keep ``size`` bytes of ``budget``, reserved for this request's body, until it is answered or its
        connection lost.
        """
        self._budget, self._held = budget, size

    def body_over_budget(self) -> None:
        """
        Note that the body did not fit the budget (and could not be refused from its head): drop it as it
        arrives, and answer 503 once it is in.
        """
        self._over_budget = True

    def gotLength(self, length: Optional[int]) -> None:
        if length == 0:
            # No body (every GET): no limit to find.
            Request.gotLength(self, length)
            return
        if self._limit is None:
            channel = self.channel
            self._limit = channel.site.body_limit_for(*request_target(channel), headers=self.requestHeaders,
                                                      length=length)
        if self._over_budget or length is not None and length > self._limit:
            # Dropped as it arrives; the request is answered once it is in (``process``).
            self._too_large = True
            self.content = _Discard()
            return
        # In memory, whatever its size: it is within its route's limit, checked above and as it streams. Twisted
        # spools a body of 100 kB or more to a temporary file, and the chart's /tmp is an emptyDir whose size
        # limit a few concurrent bulk requests of 8 MiB would pass (the pod is then evicted).
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._too_large = True
            self.content.close()
            self.content = _Discard()
            # Nothing more of it is kept: the room it held is for other bodies while the client sends the rest.
            self._release_body()
            return
        Request.handleContentChunk(self, data)

    def _release_body(self) -> None:
        if self._held:
            self._budget.release(self._held)
            self._held = 0

    def process(self) -> None:
        """
        Twisted's ``Request.process``, minus what this server does not need on every request: the Date
        header is formatted once a second instead of once a request, there is no ``Server`` header naming
        the Twisted version, and no resource here encodes its responses (so no interface lookup for an
        encoder).
        """
        site = self.site = self._kv_site = self.channel.site
        self._started = site.seconds()
        self.responseHeaders.setRawHeaders(b"Date", [http_date(site.wall())])
        if self._over_budget:
            self._refuse_body(503, "body_buffer_full", BUSY_MESSAGE, "no room for its body among those held")
            return
        if self._too_large:
            self._refuse_body(413, "payload_too_large", "The request body is larger than %d bytes." % (self._limit,),
                              "body over %d bytes" % (self._limit,))
            return
        refusal = host_refusal(self.clientproto, self.requestHeaders.getRawHeaders(b"host"))
        if refusal is None:
            refusal = target_refusal(self.path)
        if refusal is None and self.clientproto == b"HTTP/1.0" and self.requestHeaders.hasHeader(b"transfer-encoding"):
            # HTTP/1.0 has no Transfer-Encoding: a proxy in front may have framed this body otherwise, so its
            # framing is faulty, and the connection closes after the answer (RFC 9112, 6.1).
            refusal = "An HTTP/1.0 request cannot have a Transfer-Encoding."
            self.setHeader(b"Connection", b"close")
            if isinstance(self.channel, _CountedChannel):
                self.channel.close_after_answer()
        if site.leaving:
            self.setHeader(b"Connection", b"close")
            if isinstance(self.channel, _CountedChannel):
                self.channel.close_after_answer()
        if refusal is not None:
            HTTP_REJECTED.log(reason=refusal, client=client_text(self.getClientAddress()))
            body = write_error(self, APIError(400, "bad_request", refusal))
            self.setHeader(b"Content-Length", b"%d" % (len(body),))
            self.write(body)
            self.finish()
            return
        path = self.path = origin_form(self.path)
        if path == b"*":
            self.prepath = []
            self.postpath = [b""]
            self._answer_star()
            return
        tracing = site.tracing
        if tracing is not None:
            self._span = tracing.start_server_span(self, method_name(self.method))
        try:
            for prefix, prepath, leaf in site.shortcuts:
                if path.startswith(prefix):
                    # Where traversal would end up, with the same prepath and postpath, in one step.
                    self.sitepath = []
                    self.prepath = list(prepath)
                    self.postpath = list(map(unquote, path[len(prefix):].split(b"/")))
                    resource = leaf
                    break
            else:
                self.prepath = []
                self.postpath = list(map(unquote, path[1:].split(b"/")))
                resource = site.getResourceFor(self)
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())
        finally:
            if tracing is not None:
                tracing.detach(self._span)

    def begin(self, route: str, read: bool = False, kv_write: bool = False):
        """
        Name the route and return a context manager: if the log level admits it, what runs inside it runs
        inside this request's Eliot action, which :meth:`finish` completes; otherwise it does nothing (one
        shared object, so that an unlogged request allocates nothing here).

        :param bool read: a kv read: an ``http:read`` action, at debug level.
        :param bool kv_write: a kv write: its ``http:request`` action is logged at debug level only. At info,
            a write's record is the ``store:applied`` line of each node that stores it, in one task
            (:meth:`~kvresponder.coordinator.Coordinator.apply_local`).
        """
        self.route = route
        policy = self._kv_site.log_policy
        if read:
            action_type, level = HTTP_READ, DEBUG
        else:
            action_type, level = HTTP_REQUEST, DEBUG if kv_write else INFO
        if policy is None or not policy.enabled("http", level):
            return _UNLOGGED
        self._action = action_type(method=self.method.decode("ascii", "replace"), route=route)
        return self._action.context()

    _after_accounting = None

    def after_accounting(self, call: Callable[[], None]) -> None:
        """
        Run ``call`` once this request is answered and accounted, its action finished: what must not change how
        the request itself is logged (new log levels would drop the end of its action).
        """
        if self._after_accounting is None:
            self._after_accounting = []
        self._after_accounting.append(call)

    def adopt_action(self, action) -> None:
        """
        Finish ``action`` (a continued remote task) when this request completes.
        """
        self._action = action

    _ended: Optional[float] = None

    def finish(self) -> None:
        # The time now: finishing hands the connection back to the fast lane, which may serve the requests
        # pipelined behind this one before the accounting below; and the body's room, which the next request's
        # may need.
        self._ended = self._kv_site.seconds() if self._started is not None else None
        self._release_body()
        Request.finish(self)
        self._account()

    def connectionLost(self, reason) -> None:
        Request.connectionLost(self, reason)
        if not self.finished:
            self.code = 499
        self._account()

    def _refuse_body(self, code: int, error: str, message: str, reason: str) -> None:
        """
        Answer a request whose body was dropped unread, and close the connection after the answer: a client that
        sent what it may not may well send more, and nothing on this connection is worth reading after it.
        """
        HTTP_REJECTED.log(reason=reason, client=client_text(self.getClientAddress()))
        self.setHeader(b"Connection", b"close")
        if code == 503:
            self.setHeader(b"Retry-After", b"1")
        if isinstance(self.channel, _CountedChannel):
            self.channel.close_after_answer()
        body = write_error(self, APIError(code, error, message))
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(body)
        self.finish()

    def _account(self) -> None:
        self._release_body()
        if not self._accounted and self._started is not None:
            self._accounted = True
            self._count_and_end()
        calls = self._after_accounting
        if calls is not None:
            # Even for a request that began no accounting: what it asked for must not be lost.
            self._after_accounting = None
            for call in calls:
                call()

    def _count_and_end(self) -> None:
        site = self._kv_site
        elapsed = (self._ended if self._ended is not None else site.seconds()) - self._started
        if site.metrics is not None:
            site.metrics.observe_request(method_name(self.method), self.route, self.code, elapsed)
        if self._span is not None:
            site.tracing.end_server_span(self._span, self.route, self.code)
        action = self._action
        if action is not None:
            self._action = None
            action.add_success_fields(status=self.code, duration_ms=round(elapsed * 1000, 3))
            action.finish()

    def write_body(self, body: bytes) -> None:
        """
        Write ``body`` and finish. An answer written in a later reactor turn than its request arrived in (a
        replicated write, answered when its copies are stored) leaves with one ``send`` at the end of that
        turn, as an answer within the turn does (see :class:`_Cork`), rather than waiting for the reactor to
        report the socket writable.
        """
        channel = self.channel
        if isinstance(channel, _CountedChannel):
            channel.cork()
        self.write(body)
        self.finish()

    def switch_protocols(self, protocol, answer: bytes) -> bool:
        """
        Answer an upgrade with ``answer`` (a whole 101 response) and hand the connection to ``protocol``.
        The request counts as answered with 101. Only a plain TCP connection can be handed over; returns
        whether this one was.
        """
        if not self.channel.hand_over(protocol, answer):
            return False
        self.code, self.code_message = 101, b"Switching Protocols"
        self._account()
        return True

    def getRequestHostname(self) -> bytes:
        """
        The Host name, or ``localhost`` when it is not a valid host name: no route depends on it, and
        the router (werkzeug, under Klein) fails hard on names it cannot encode.
        """
        name = Request.getRequestHostname(self)
        try:
            name.decode("utf-8").encode("idna")
        except UnicodeError:
            return b"localhost"
        return name

    def _answer_star(self) -> None:
        if self.method == b"OPTIONS":
            handle_star(self)
            return
        body = write_error(self, APIError(405, "method_not_allowed", "The * target takes OPTIONS only.",
                                          {b"Allow": b"OPTIONS"}))
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(body)
        self.finish()

    def processingFailed(self, reason):
        """
        Any exception that escaped a resource: log it with its traceback, and tell the client only that it
        failed.
        """
        write_traceback(exc_info=(reason.type, reason.value, reason.tb))
        if self.finished or request_gone(self):
            return reason
        body = error_body("internal_error", "The server failed to handle this request.")
        self.setResponseCode(500)
        self.setHeader(b"Content-Type", b"application/json")
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(body)
        self.finish()
        return reason


class _Cork:
    """
    Stands in for a channel's transport from its first answer in a reactor turn to the end of that turn
    (:class:`~kvresponder.turn.EndOfTurn`), and sends what was written with one system call then.

    The answers then leave with :func:`~kvresponder.sendnow.send_now`, not at the reactor's next turn: for a
    small response, Twisted's buffering cost two ``epoll_ctl`` calls and another pass of the reactor loop.
    They leave together with the other connections' answers of the turn: the client is woken by the first,
    not by each. It is only put in front of a plain ``twisted.internet.tcp.Server``: never TLS, nor any other
    wrapper or test transport, which keep Twisted's own buffering.
    """

    def __init__(self, transport) -> None:
        self._transport = transport
        self._chunks = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _CORK_LIMIT:
            # Large answers gain nothing from waiting, and would only be held in memory twice.
            self.flush()

    def writeSequence(self, data) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        self.flush()
        self._transport.loseConnection()

    def abortConnection(self) -> None:
        self._chunks, self._size = [], 0
        self._transport.abortConnection()

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def flush(self) -> None:
        chunks = self._chunks
        if not chunks:
            return
        self._chunks, self._size = [], 0
        send_now(self._transport, b"".join(chunks))


#: Bytes a cork holds before it sends them without waiting for the end of the turn.
_CORK_LIMIT = 64 * 1024


def _refusal(site) -> bytes:
    body = error_body("too_many_connections", "The server has too many open connections; retry later.")
    return (b"HTTP/1.1 503 Service Unavailable\r\n%sContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (_date_line(site), len(body), body))


class _Refuse(Protocol):
    """
    Answers 503 and hangs up, for connections over the cap.
    """

    def __init__(self, site) -> None:
        self._site = site

    def connectionMade(self):
        self._site.refused(client_text(self.transport.getPeer()))
        self.transport.write(_refusal(self._site))
        self.transport.loseConnection()


#: Connections over the cap read at once for a probe (:class:`_ProbeOverCap`); the ones past them are refused at
#: once, unread, so that a flood of connections over the cap is not held open.
PROBES_OVER_CAP = 8
#: The most bytes, and seconds, a connection over the cap is read for its request head.
PROBE_HEAD_BYTES = 4096
PROBE_SECONDS = 2.0


class _ProbeOverCap(Protocol):
    """
    A connection over the cap, read for its request head: the probes' routes (liveness, readiness) are answered as
    always, anything else 503 ``too_many_connections``. A kubelet's probe must not fail because clients hold every
    connection the node takes: it would restart a busy, healthy node, and a cache loses its data on a restart.
    The whole head is read before the answer, so that closing does not reset the connection under it.
    """

    def __init__(self, site, probes) -> None:
        self._site = site
        self._probes = probes
        self._head = b""
        self._timer = None

    def connectionMade(self):
        self._site.probing += 1
        self._timer = self._site.reactor.callLater(PROBE_SECONDS, self._refuse)

    def dataReceived(self, data: bytes) -> None:
        if self._timer is None:
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > PROBE_HEAD_BYTES:
                self._refuse()
            return
        method, _, rest = self._head[:end].partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        probe = self._probes.get(target) if method in (b"GET", b"HEAD") else None
        if probe is None:
            self._refuse()
            return
        route, answer = probe
        status, value = answer()
        body = json.dumps(value, separators=(",", ":")).encode("utf-8")
        self._end(b"HTTP/1.1 %d %s\r\n%sContent-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (status, RESPONSES[status], _date_line(self._site), len(body),
                                                     b"" if method == b"HEAD" else body))
        if self._site.metrics is not None:
            self._site.metrics.count_request(method_name(method), route, status)

    def _refuse(self) -> None:
        self._site.refused(client_text(self.transport.getPeer()))
        self._end(_refusal(self._site))

    def _end(self, answer: bytes) -> None:
        if self._timer is None:
            return
        if self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.transport.write(answer)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._site.probing -= 1


#: Seconds a connection refused for its body's size goes on reading what the client still sends, before it closes.
LINGER_SECONDS = 5.0
BUSY_MESSAGE = "The node holds as many request bodies as MAX_BODY_BUFFER allows; retry in a moment."


class _RefusedBody(Protocol):
    """
    A connection whose request declared a body over its route's limit, once its 413 is written: it sends nothing
    more (a half-close), drops what the client still sends, and closes when the client does, or after
    :data:`LINGER_SECONDS`. Closing at once, with the body still arriving, would make the kernel reset the
    connection, and a client still sending could lose the 413 before reading it (RFC 9112, 9.6).

    :param channel: the HTTP channel it took the connection from, whose ``connectionLost`` it calls.
    """

    def __init__(self, channel, clock) -> None:
        self._channel = channel
        self._clock = clock
        self._timer = None

    def connectionMade(self) -> None:
        self.transport.loseWriteConnection()
        self._timer = self._clock.callLater(LINGER_SECONDS, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._channel.connectionLost(reason)


class _CountedChannel(HTTPChannel):
    """
    A channel that counts itself, and gives each request a deadline for its headers and body: the idle
    timeout alone restarts with every byte, so a client trickling a byte at a time (slow loris) would hold
    the connection forever.

    The deadline timer is lazy: a request only notes when its first byte arrived, and one timer per
    connection checks that note when it fires, re-arming itself for whatever time the current request has
    left. A keep-alive connection serving thousands of requests a second thus schedules one timer per
    deadline period, not one per request.
    """

    _deadline = None
    _request_started = None
    _host = None
    _peer = None
    _idle_call = None
    _last_activity = 0.0

    _lane = None
    #: The last bytes given to Twisted's parser (a CRLF, or a head's CRLFCRLF, may be split between two reads).
    _line_tail = b""
    #: Whether a request head was refused for its line ends or its first byte (the connection is closing).
    _refused_head = False
    #: Whether nothing has been read yet: the first read starts a request.
    _first_read = True
    #: Whether the connection was handed over to another protocol (a copy stream), which answers each of its
    #: frames in the turn it arrives: it owes no answer across turns.
    _handed_over = False

    def headerReceived(self, line):
        # Twisted ignores "Transfer-Encoding: identity" and reads what follows the head as the next request; any
        # coding but chunked leaves the body's length unknown, and must be refused (RFC 9112, 6.1), not guessed.
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
            _answer_bad_request(self)
            return False
        return HTTPChannel.headerReceived(self, line)

    def allHeadersReceived(self):
        # A declared body over the route's limit, or one the site's budget of bodies held has no room for, is
        # answered now, before it is read and before any "100 Continue": the connection then lingers
        # (_RefusedBody). Where it cannot be handed over (TLS), the body is read and dropped, and the request
        # answered once it is in (KVRequest).
        length = self.length
        request = self.requests[-1]
        # Any Transfer-Encoding left here is chunked (headerReceived refuses the others): a body of unknown length.
        if length or (length is None and request.requestHeaders.hasHeader(b"transfer-encoding")):
            site = self.site
            path, method = request_target(self)
            headers = request.requestHeaders
            limit, size = site.body_terms(path, method, headers, length)
            request.set_body_limit(limit)
            if length is not None and length > limit:
                if self._refuse_body(method, 413, "payload_too_large",
                                     "The request body is larger than %d bytes." % (limit,),
                                     "body of %d bytes over %d" % (length, limit)):
                    return
            elif size:
                if site.body_budget.reserve(size):
                    request.hold_body(site.body_budget, size)
                elif self._refuse_body(method, 503, "body_buffer_full", BUSY_MESSAGE,
                                       "no room for a body of %d bytes among those held" % (size,)):
                    return
                else:
                    request.body_over_budget()
        HTTPChannel.allHeadersReceived(self)

    def _refuse_body(self, method: bytes, code: int, error: str, message: str, reason: str) -> bool:
        body = error_body(error, message)
        retry = b"Retry-After: 1\r\n" if code == 503 else b""
        answer = (b"HTTP/1.1 %d %s\r\n%sContent-Type: application/json\r\nConnection: close\r\n%s"
                  b"Content-Length: %d\r\n\r\n%s" % (code, RESPONSES[code], _date_line(self.site), retry,
                                                      len(body), body))
        client = client_text(self.transport.getPeer())
        if not self.hand_over(_RefusedBody(self, self.site.reactor), answer):
            return False
        HTTP_REJECTED.log(reason=reason, client=client)
        if self.site.metrics is not None:
            self.site.metrics.count_request(method_name(method), KVRequest.route, code)
        return True

    def lineLengthExceeded(self, line):
        # LineReceiver hangs up without a word on a request line or header line over MAX_LENGTH: answer it
        # like any request the parser refuses, in the API's error format.
        _answer_bad_request(self)

    def connectionMade(self):
        HTTPChannel.connectionMade(self)
        site = self.site
        site.open_channels.add(self)
        if site.lane is not None:
            self._lane = ConnectionLane(site.lane, self)

    def getHost(self):
        # Twisted asks for both addresses on every request (a system call and an object each); neither
        # changes during a connection.
        host = self._host
        if host is None:
            host = self._host = HTTPChannel.getHost(self)
        return host

    def getPeer(self):
        peer = self._peer
        if peer is None:
            peer = self._peer = HTTPChannel.getPeer(self)
        return peer

    # TimeoutMixin's idle timeout, made lazy in the same way as the request deadline. HTTPChannel suspends
    # the timeout while it answers a request and restores it afterwards, and resets it on every read: with
    # TimeoutMixin that cancels and schedules a timer for every request. Here those calls only note the
    # period and the time, and one timer per connection checks them when it fires.

    def setTimeout(self, period):
        previous = self.timeOut
        self.timeOut = period
        if period is not None:
            self._last_activity = self.site.seconds()
            call = self._idle_call
            if call is None:
                self._idle_call = self.callLater(period, self._check_idle)
            elif period != previous and call.getTime() > self._last_activity + period:
                call.reset(period)
        return previous

    def resetTimeout(self):
        self._last_activity = self.site.seconds()

    def _check_idle(self):
        self._idle_call = None
        period = self.timeOut
        if period is None:
            return
        left = self._last_activity + period - self.site.seconds()
        if left > 0:
            self._idle_call = self.callLater(left, self._check_idle)
            return
        self.timeoutConnection()

    def dataReceived(self, data):
        first, self._first_read = self._first_read, False
        if self._held_input:
            # Behind the bytes held while the client read nothing: they are parsed first, in order.
            self._held_input += data
            self.transport.pauseProducing()
            return
        lane = self._lane
        if lane is not None and lane.open:
            self.resetTimeout()
            data = lane.dataReceived(data)
            if data is not None:
                self.from_lane(data)
            return
        if first:
            self.from_lane(data)
            return
        self.to_twisted(data)

    def from_lane(self, data: bytes) -> None:
        """
        Give Twisted's parser ``data`` that starts a request: what the fast lane hands over (it parsed up to that
        request's first byte), or a connection's first read.

        Bytes no request line starts with (a method is a token) are refused at once: bytes that are not HTTP,
        such as a TLS ClientHello sent to this plain port, would hold no line end Twisted waits for, and be cut off
        at the request's deadline without a word. Only where a request is known to start: between two reads of
        one request, any byte may come first.
        """
        if data[:1] not in _REQUEST_STARTS and not self._refused_head:
            self._refused_head = True
            _answer_bad_request(self, _NOT_HTTP_TLS if data[:1] == b"\x16" else _NOT_HTTP)
            return
        self.to_twisted(data)

    def to_twisted(self, data: bytes) -> None:
        """
        Give ``data`` to Twisted's HTTP parser (the bytes from a request the fast lane does not take on).
        """
        if self._refused_head:
            return  # answered and closing: what still arrives is not read
        if self._request_started is None and channel_between_requests(self):
            self.receiving(True)
        if self.line_mode and (b"\n" in data or b"\r" in data) and bare_line_break(data, self._line_tail):
            # Twisted's parser splits the head on CRLF alone: a head whose lines end in a bare LF (as netcat and
            # hand-typed requests send) or a bare CR would wait for the request's deadline and be cut off without
            # a word. RFC 9112 (2.2) lets a server refuse it; it is answered at once instead.
            self._refused_head = True
            _answer_bad_request(self, "Each line of the request head must end in CRLF, not in a bare LF or CR.")
            return
        self._line_tail = (self._line_tail + data)[-3:]
        HTTPChannel.dataReceived(self, data)

    def receiving(self, partly: bool) -> None:
        """
        Note whether a request is partly received, for its deadline.
        """
        if not partly:
            self._request_started = None
            return
        if self._request_started is None:
            site = self.site
            self._request_started = site.seconds()
            if self._deadline is None:
                self._deadline = site.reactor.callLater(site.request_deadline, self._check_deadline)

    def send(self, data: bytes) -> None:
        """
        Write ``data`` (the fast lane's answers): at the end of the reactor turn, behind whatever this channel
        wrote before in the turn, where the channel can be corked; at once otherwise.
        """
        cork = self.cork()
        if cork is not None:
            cork.write(data)
        else:
            send_now(self.transport, data)

    def busy(self) -> bool:
        """
        Whether this connection owes an answer: a request received and not yet answered, or an answer not yet
        sent (held in the cork until the end of the reactor turn, or queued behind a full socket). Not a
        connection handed over to a copy stream.
        """
        if self._handed_over:
            return False
        transport = self.transport
        if isinstance(transport, _Cork):
            return True
        lane = self._lane
        if not channel_between_requests(self) or (lane is not None and lane.waiting):
            return True
        return type(transport) is tcp.Server and tcp_write_is_queued(transport)

    def close_after_answer(self) -> None:
        """
        Close the connection once the request being answered is answered (Twisted decides whether a connection
        persists from the request's headers alone).
        """
        self.persistent = False

    def may_read(self) -> bool:
        """
        Whether reading may resume: not while the transport's send buffer is full.
        """
        return not channel_waiting_for_transport(self)

    def resumeProducing(self):
        # The transport calls this once it has sent what filled its buffer: the client read it, which is activity
        # as its bytes in are (else a client reading a long pipeline of answers, or one large answer, slowly is cut
        # off at the idle timeout, mid-answer).
        self.resetTimeout()
        HTTPChannel.resumeProducing(self)
        lane = self._lane
        if lane is not None and lane.holding_back:
            # The fast lane stopped reading behind an answer that waits; it reads again once that answer goes.
            self.transport.pauseProducing()
        if channel_waiting_for_transport(self):
            return
        # The requests held while the client read none of the answers (see requestDone and the lane), now that
        # it has read some.
        if lane is not None and lane.held_for_transport:
            rest = lane.resume()
            if rest is not None:
                self.from_lane(rest)
        held = self._held_input
        if held and not self._handed_over and not self.transport.disconnecting:
            self._held_input = b""
            self.resetTimeout()
            self.dataReceived(held)

    #: Pipelined bytes Twisted had received past a request it answered while the send buffer was full: held until
    #: the client reads (Twisted would parse and answer them at once, so that a client sending many reads of a large
    #: value in one write and reading none of the answers would have them all made and held in memory).
    _held_input = b""

    def requestDone(self, request):
        if (self.persistent and channel_waiting_for_transport(self) and self.requests
                and request is self.requests[0]):
            held = take_unread(self)
            if held:
                self._held_input += held
                # Twisted pauses reading only between requests; this one was being handled.
                self.transport.pauseProducing()
        HTTPChannel.requestDone(self, request)
        if self._handed_over:
            # A pipelined request after this one was refused for its body, and took the connection: nothing
            # more is HTTP here.
            return
        lane = self._lane
        if (lane is not None and not lane.open and self.persistent and not self.requests
                and not self.transport.disconnecting):
            # Twisted answered all it was given: what it holds now is at most the start of the next
            # request line, which the lane takes back with the rest.
            rest = lane.reopen(self.clearLineBuffer())
            if rest is not None:
                self.from_lane(rest)

    def allContentReceived(self):
        self._request_started = None
        self.cork()
        HTTPChannel.allContentReceived(self)

    def cork(self) -> Optional[_Cork]:
        """
        Hold what this channel writes until the end of the reactor turn, and send it then. A cork goes only
        over a plain TCP connection, whose socket it may write to directly: not over TLS or any other wrapper
        (which would forward the socket attribute to the connection beneath it). Returns the channel's cork
        (the one already in place, if it is corked), or ``None`` where none goes.
        """
        transport = self.transport
        if type(transport) is not tcp.Server:
            return transport if isinstance(transport, _Cork) else None
        self.transport = cork = _Cork(transport)
        self.site.end_of_turn.add(self._uncork)
        return cork

    def _uncork(self) -> None:
        cork = self.transport
        if isinstance(cork, _Cork):
            self.transport = cork._transport
            cork.flush()

    def hand_over(self, protocol, answer: bytes) -> bool:
        """
        End HTTP on this connection: write ``answer`` and give the connection to ``protocol``, with whatever
        the client already sent after the request. The channel's timers stop (the protocol keeps its own
        time) and it no longer produces for the transport. It stays counted as an open connection until
        the protocol's connection is lost, when the protocol must call this channel's ``connectionLost``.

        Only a plain TCP connection is handed over (TLS and test transports are not); returns whether it was.
        """
        transport = self.transport
        if isinstance(transport, _Cork):
            transport.flush()
            transport = transport._transport
        if type(transport) is not tcp.Server or transport.disconnecting:
            return False
        self._cancel_deadline()
        stop_idle_timeout(self)
        if self._idle_call is not None:
            if self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
        leftover = take_unread(self)
        self._handed_over = True
        stop_channel(self)
        transport.unregisterProducer()
        # Reading may have been paused while the request was handled; nothing of HTTP's would resume it now.
        transport.resumeProducing()
        transport.write(answer)
        give_connection_to(transport, protocol)
        protocol.makeConnection(transport)
        if leftover:
            try:
                protocol.dataReceived(leftover)
            except Exception:
                # Not into the request's error handling: it would write an HTTP 500 into the new protocol.
                write_traceback()
                transport.abortConnection()
        return True

    def _check_deadline(self):
        self._deadline = None
        started = self._request_started
        if started is None:
            # No request is being received: the next one arms the timer again.
            return
        site = self.site
        left = started + site.request_deadline - site.seconds()
        if left > 0:
            self._deadline = site.reactor.callLater(left, self._check_deadline)
            return
        self._request_timed_out()

    def timeoutConnection(self):
        # The idle timeout and a request's deadline are one setting: a request that stalled after its last
        # bytes may meet the idle check first. It gets the same answer.
        if self._request_started is not None and not self.transport.disconnecting:
            self._request_timed_out()
            return
        HTTPChannel.timeoutConnection(self)

    def _request_timed_out(self) -> None:
        if self.transport.disconnecting:
            return
        HTTP_REJECTED.log(reason="request not received within %ss" % (self.site.request_deadline,),
                          client=client_text(self.transport.getPeer()))
        if self._answer_due():
            # Cut off mid-answer, or ahead of one, a 408 would corrupt it: the connection is reset instead.
            self.transport.abortConnection()
            return
        # Told, not reset (RFC 9110, 15.5.9): nothing more is read, and the connection closes once it is sent.
        self._refused_head = True
        self.transport.pauseProducing()
        _answer_error(self, b"408 Request Timeout", "request_timeout",
                      "The request was not received in full within %g s." % (self.site.request_deadline,))

    def _answer_due(self) -> bool:
        """
        Whether an answer is on its way on this connection: to a request the fast lane took, or to one Twisted
        parsed (the request being received is the only one an answer may go to, and it has none yet).
        """
        lane = self._lane
        if lane is not None and lane.waiting:
            return True
        requests = self.requests
        return len(requests) > 1 or bool(requests) and requests[0].startedWriting

    def _cancel_deadline(self):
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def connectionLost(self, reason):
        self._cancel_deadline()
        if self._idle_call is not None:
            if self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
        self._request_started = None
        self.site.open_channels.discard(self)
        if self._lane is not None:
            self._lane.connectionLost()
        HTTPChannel.connectionLost(self, reason)


def bare_line_break(data: bytes, before: bytes = b"") -> bool:
    """
    Whether ``data``'s part of a request head (up to the head's blank line, or all of ``data`` if that has not
    arrived) has a line ending in LF alone, or a CR followed by a byte other than LF. ``before``: the last bytes (up to 3) of
    the head given before ``data``, so that a CRLF, or the blank line's CRLFCRLF, split between two reads is found
    whole. What follows the head is a body, where a bare LF or CR is just a byte.
    """
    joined = before + data
    start = len(before)
    end = joined.find(b"\r\n\r\n", max(0, start - 3))
    stop = len(joined) if end < 0 else end + 2
    if joined.count(b"\n", start, stop) != joined.count(b"\r\n", max(0, start - 1), stop):
        return True
    # The CRs of ``data`` only: ``before`` may end in a body's last byte (a CR is JSON whitespace), and it is not
    # known here whether it does. A CR that ends what has arrived may have its LF in the next read; a bare CR
    # split from what follows it by a read's end is then left to the request's deadline.
    returns = joined.count(b"\r", start, stop) - (1 if end < 0 and joined.endswith(b"\r") else 0)
    return returns != joined.count(b"\r\n", start, stop)


#: The first byte a request may start with: a method's (a token's), or the empty line before a request line that
#: a server may ignore (RFC 9112, 2.2).
_REQUEST_STARTS = frozenset(bytes([byte]) for byte in
                            b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
_NOT_HTTP = "The request is not HTTP: no request line starts so."
_NOT_HTTP_TLS = "This port serves plain HTTP, not TLS (HTTPS)."


def _answer_bad_request(channel, message: str = "The request is not well-formed HTTP/1.1.") -> None:
    """
    Twisted's own parser refused the bytes (a bad header line, a bad Content-Length or chunk, ...): answer in
    the API's error format rather than with a bare status line.
    """
    _answer_error(channel, b"400 Bad Request", "bad_request", message)


def _answer_error(channel, status: bytes, error: str, message: str) -> None:
    """
    Answer a request no resource will see with an error in the API's format, and close the connection.
    """
    body = error_body(error, message)
    metrics = channel.site.metrics if channel.site is not None else None
    if metrics is not None:
        metrics.count_request(UNREAD_METHOD, "malformed", int(status[:3]))
    # As every other refusal before a resource: a peer's call refused here (headers past MAX_HEADER_BYTES) must
    # show on the peer that refused it, not only as a status on the caller.
    HTTP_REJECTED.log(reason="%s: %s" % (status.decode("ascii"), message),
                      client=client_text(channel.transport.getPeer()))
    channel.transport.write(b"HTTP/1.1 %s\r\n%sContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                            % (status, _date_line(channel.site), len(body), body))
    channel.loseConnection()


def _date_line(site) -> bytes:
    # RFC 9110 (6.6.1): a server with a clock sends Date on every 4xx, those written by hand included.
    return b"Date: %s\r\n" % (http_date(site.wall()),) if site is not None else b""


answer_bad_requests(_CountedChannel, _answer_bad_request)


#: Seconds between two looks at whether the requests being handled are done, when a stopping node waits for them.
REQUESTS_DONE_POLL = 0.05


def _reservation(limit: int, length: Optional[int]) -> int:
    # A body's share of the budget: its declared length (its route's limit if chunked), none if small.
    size = limit if length is None else length
    return 0 if size <= SMALL_BODY else size


class KVSite(Site):
    """
    :param resource: the root resource.
    :param reactor: the reactor, for the site's timers.
    :param metrics: a :class:`~kvresponder.metrics.Metrics`, or ``None``.
    :param log_policy: a :class:`~kvresponder.log.LogPolicy`, or ``None``.
    :param int body_limit: largest public request body.
    :param int max_connections: open connections accepted at once.
    :param float timeout: seconds an idle connection stays open, and the deadline for receiving a whole
        request once its first byte arrived.
    :param end_of_turn: the node's :class:`~kvresponder.turn.EndOfTurn`, or ``None`` for one of the site's own.
    :param seconds: the clock, for request durations and deadlines; by default ``reactor.seconds``.
    :param wall: the wall clock in seconds, for the Date header; by default ``seconds``.
    """

    requestFactory = KVRequest
    protocol = _CountedChannel
    displayTracebacks = False

    def __init__(self, resource, reactor, metrics=None, log_policy=None,
                 body_limit: int = 1024 * 1024, bulk_body_limit: Optional[int] = None,
                 internal_body_limit: int = INTERNAL_FLOOR, max_connections: int = 1024,
                 timeout: float = 30.0, max_header_bytes: int = 16384, tracing=None,
                 fast_lane: bool = True, end_of_turn: Optional[EndOfTurn] = None,
                 seconds: Optional[Callable[[], float]] = None, wall: Optional[Callable[[], float]] = None,
                 body_buffer: Optional[int] = None) -> None:
        # The reactor is required: Site falls back to the global one, whose timers (deadlines, idle
        # timeouts, the end of the turn) a test's Clock would then never drive.
        Site.__init__(self, resource, timeout=timeout, reactor=reactor)
        seconds = seconds or reactor.seconds
        #: The wall clock, for the Date header; by default ``seconds`` (the reactor's clock may not be the
        #: wall clock: see ``tap.steady_seconds``).
        self.wall = wall or seconds
        #: Where the channels' answers of a reactor turn are sent from, together, once the turn's requests
        #: are all handled.
        self.end_of_turn = end_of_turn if end_of_turn is not None else EndOfTurn(self.reactor)
        self.seconds = seconds
        self.metrics = metrics
        self.log_policy = log_policy
        self.body_limit = body_limit
        self.bulk_body_limit = bulk_body_limit or 8 * body_limit
        self.internal_body_limit = internal_limit_for(body_limit, internal_body_limit)
        self._body_limits = {VALUE: self.body_limit, BULK: self.bulk_body_limit, INTERNAL: self.internal_body_limit}
        #: The root's own routing of a path to a body limit (``body_limit_for``); a root without one gives every
        #: request the value limit.
        self._route_limit = getattr(resource, "body_limit_for", None)
        #: Who the head of a request for an internal route shows its body comes from (``length_signature``): only
        #: a peer's (or anyone's, with --insecure-cluster) may be larger than a client's.
        self._length_signature = getattr(resource, "length_signature", None)
        #: The bodies held at once (MAX_BODY_BUFFER; see ``body_terms``).
        self.body_budget = BodyBudget(body_buffer if body_buffer is not None
                                      else default_body_buffer(self.bulk_body_limit), metrics)
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.request_deadline = timeout
        #: The open connections' channels.
        self.open_channels: set = set()
        if metrics is not None:
            metrics.register_gauge("kv_open_connections", lambda: self.open_connections)
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        #: (path prefix, its segments, leaf): a root resource may name leaves that traversal reaches for every
        #: path under a prefix (``shortcuts()``), and requests under it go there without the walk.
        self.shortcuts = [(prefix, tuple(prefix.strip(b"/").split(b"/")), leaf)
                          for prefix, leaf in getattr(resource, "shortcuts", lambda: [])()]
        #: The same, with the body limit of each, for requests that have a body.
        self._shortcut_limits = [(prefix, self._routed_limit(prefix, b"PUT")) for prefix, _, _ in self.shortcuts]
        #: The kv routes' fast lane (:mod:`~kvresponder.http.fastlane`), where the root offers one. Not with
        #: tracing on: every traced request needs its span, which Twisted's path gives it.
        self.lane = None
        #: Whether the node is leaving (:meth:`begin_leaving`).
        self.leaving = False
        #: The probes' full paths, with their routes and answers, answered over the connection cap.
        self.probes = getattr(resource, "probes", lambda: {})()
        #: Connections over the cap being read for a probe.
        self.probing = 0
        lane_route = getattr(resource, "fast_lane_route", None)
        if fast_lane and lane_route is not None and self.tracing is None:
            prefix, operations = lane_route()
            # Bodies the budget need not hold only: a larger one goes to Twisted's path, which reserves it.
            self.lane = FastLane(prefix, operations, min(self._routed_limit(prefix, b"PUT"), SMALL_BODY),
                                 max_header_bytes, metrics, log_policy, seconds,
                                 lambda now: http_date(self.wall()))

    @property
    def open_connections(self) -> int:
        return len(self.open_channels)

    def begin_leaving(self) -> None:
        """
        The node is leaving: each answer from now on says ``Connection: close`` and closes its connection, so that
        clients and proxies holding connections to it open new ones (to the nodes that stay, once their endpoints
        drop this one) rather than send on a connection closed under them as the node exits.
        """
        self.leaving = True
        if self.lane is not None:
            self.lane.begin_leaving()

    def refused(self, client: str) -> None:
        """
        A connection over the cap was answered 503 ``too_many_connections``.
        """
        HTTP_REJECTED.log(reason="connection cap %d reached" % (self.max_connections,), client=client)
        if self.metrics is not None:
            # Counted with the requests, whose 5xx share the error-rate alert watches: no request was read.
            self.metrics.count_request(UNREAD_METHOD, "refused", 503)

    def body_limit_for(self, target: bytes, method: bytes, headers=None, length: Optional[int] = None) -> int:
        """
        The largest body, in bytes, of a request for ``target`` (the raw request target) with ``method``
        (:meth:`body_terms`).
        """
        return self.body_terms(target, method, headers, length)[0]

    def body_terms(self, target: bytes, method: bytes, headers=None, length: Optional[int] = None):
        """
        The terms of a request's body, decided from its head before the body is read: ``(limit, reservation)``.

        - ``limit``: the largest body the request may have, the limit of the route its path leads to, as the
          resource tree routes it (from the path alone, never the query string, split and percent-decoded as
          :meth:`KVRequest.process` does it for traversal). An internal route's limit is given only to a body
          that its head shows comes from a peer (``length_signature``) when it is over a bulk request's or
          chunked; any other gets a bulk request's, so that a caller without the cluster secret cannot make the
          node read more than any client may.
        - ``reservation``: the bytes of :attr:`body_budget` it must hold while it is read: its length (``limit``
          if chunked); 0 for a small body, or for a peer's signed with the cluster secret (refusing a copy would
          fail a write, and a peer sends only what its own work holds). Declared, not received: a body let in is
          read to its end, never refused halfway because others grew meanwhile.

        The signature, an HMAC over the head, is checked at most once, and only for an internal body declared
        over :data:`SMALL_BODY` (a chunked one has none to check).

        :param headers: the request's headers, once its head is in; ``None`` before.
        """
        path = origin_form(target.split(b"?", 1)[0])
        for prefix, limit in self._shortcut_limits:
            if path.startswith(prefix):
                return limit, _reservation(limit, length)
        kind = self._routed_kind(path, method)
        limit = self._body_limits[kind]
        if kind != INTERNAL or headers is None or self._length_signature is None:
            return limit, _reservation(limit, length)
        if length is not None and length <= SMALL_BODY and length <= self.bulk_body_limit:
            # Within any client's limit, and held without a reservation: nothing to check.
            return limit, 0
        signature = self._length_signature(headers, method, path, length)
        if signature == UNSIGNED and (length is None or length > self.bulk_body_limit):
            # A /bulk request's limit, which any client has: what older peers, which sign no length, send (a
            # hand-off batch is at most 4 MiB and one entry) fits, and a stranger gets no more than a client.
            limit = self.bulk_body_limit
        if signature == SIGNED_BY_PEER:
            return limit, 0
        return limit, _reservation(limit, length)

    def _routed_limit(self, path: bytes, method: bytes) -> int:
        return self._body_limits[self._routed_kind(path, method)]

    def _routed_kind(self, path: bytes, method: bytes) -> str:
        route = self._route_limit
        if route is None:
            return VALUE
        return route([unquote(segment) for segment in path[1:].split(b"/")], method)

    def log(self, request) -> None:
        # Requests are accounted by KVRequest as metrics and Eliot actions, not as access-log lines.
        pass

    def buildProtocol(self, addr):
        if self.open_connections >= self.max_connections:
            if self.probes and self.probing < PROBES_OVER_CAP:
                return _ProbeOverCap(self, self.probes)
            return _Refuse(self)
        channel = Site.buildProtocol(self, addr)
        channel.totalHeadersSize = self.max_header_bytes
        # One line may be as long as all the headers together may be: LineReceiver's own cap (16 KiB) would
        # otherwise stand below a larger MAX_HEADER_BYTES.
        channel.MAX_LENGTH = self.max_header_bytes
        return channel

    def requests_done(self, timeout: float) -> Deferred:
        """
        A Deferred that fires once no connection is handling a request, or after ``timeout`` seconds: what a
        node that stopped listening waits for before it exits, so that a request it took (a read asking a peer
        that is gone waits for the peer's timeout) is answered rather than cut off. It fires with the number of
        connections still owing an answer: 0 unless the timeout ended the wait.
        """
        return ensureDeferred(self._requests_done(timeout))

    async def _requests_done(self, timeout: float) -> int:
        deadline = self.seconds() + timeout
        while True:
            owing = sum(1 for channel in self.open_channels if channel.busy())
            if not owing or self.seconds() >= deadline:
                return owing
            await deferLater(self.reactor, REQUESTS_DONE_POLL, lambda: None)


# One encoder for every response: json.dumps with arguments builds a new one at each call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def json_bytes(value) -> bytes:
    return _encode_json(value).encode("utf-8")
