"""
The fast lane: simple kv requests parsed and answered on the connection, without Twisted's ``Request``.

Twisted's HTTP server builds a ``Request``, its header objects and a body buffer for every request, and
traverses resources to reach the one that renders it: several times what a cache read or write costs
itself. The lane serves ``GET``, ``PUT`` and ``DELETE`` of ``/<tenant>/kv/<key>`` when the request is plain
HTTP/1.1: a request line and headers it can check completely, any body framed by ``Content-Length``, of up to
64 KiB (``SMALL_BODY``: a larger one reserves room in the site's budget, on Twisted's path) and within the value
limit. Everything else (another route, ``HEAD``, a query string, chunked bodies,
``Expect``, ``Connection`` or ``Upgrade`` headers, HTTP/1.0, anything malformed, and every request while a
log level or tracing would record it in more detail than the lane does: the ``http`` area at debug) goes to
Twisted's parser, starting at that request's first byte, as if the lane were not there.

The answers come from the same :class:`~kvresponder.http.kvops.KVOperations` that Twisted's path uses, and
are counted in the same metrics. The lane logs no action: at info, kv requests have none on either path.
Answers leave in the order their requests arrived: while one waits (a replicated write, a remote read), the
lane holds the requests behind it; when a request goes to Twisted, the lane stays closed until Twisted has
answered everything it was given, and takes back whatever the client sent after that.
"""

import re
from typing import Optional

from eliot import write_traceback
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, unquote

from ..log import DEBUG
from .errors import APIError, error_body
from .hosts import valid_host

#: ``parse`` found the start of a request the lane would take, not all of it yet.
INCOMPLETE = object()

_METHODS = {b"GET": "GET", b"PUT": "PUT", b"DELETE": "DELETE"}
_ROUTE = "/kv/{key}"
#: Visible ASCII, as Twisted requires of a request target.
_TARGET = re.compile(rb"[!-~]+\Z").match
#: An RFC 9110 token, as Twisted requires of a header name.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z").match
#: Headers whose handling is Twisted's: framing, connection management, and the 100-continue exchange; and
#: those a write is refused for (``api.check_write_headers``: preconditions, a content coding), which the lane
#: leaves to that path rather than checking every request for them.
#: (``Connection: keep-alive``, which many clients send, says what HTTP/1.1 does anyway: the lane takes it.)
_TWISTED_HEADERS = frozenset([b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer", b"proxy-connection",
                              b"if-match", b"if-none-match", b"if-unmodified-since", b"content-encoding"])
#: Header names as clients usually spell them, lowercased: valid tokens, so they need no check.
_COMMON_NAMES = {name: name.lower() for spelling in (
    b"Host", b"User-Agent", b"Accept", b"Accept-Encoding", b"Accept-Language", b"Content-Type", b"Content-Length",
    b"Connection", b"Authorization", b"Cache-Control", b"Traceparent", b"Tracestate", b"X-Request-Id")
    for name in (spelling, spelling.lower())}
#: The most header lines the lane reads in one request (Twisted takes more, and refuses past its own limit).
_MAX_HEADERS = 64
#: Bytes held behind a waiting answer before the connection stops reading (Twisted's eager read size).
_HOLD = 0x4000
_INTERNAL_ERROR = error_body("internal_error", "The server failed to handle this request.")
_STATUS_LINES = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, RESPONSES.get(status, b"Unknown"))
    return line


class FastLane:
    """
    What the lane knows of the site: the kv prefix and its operations, the limits, and where it accounts.

    :param bytes prefix: ``/<tenant>/kv/``.
    :param operations: the :class:`~kvresponder.http.kvops.KVOperations` that answer.
    :param int body_limit: the largest body of a kv ``PUT``.
    :param int max_header_bytes: the largest request line and headers.
    :param metrics: a :class:`~kvresponder.metrics.Metrics`, or ``None``.
    :param log_policy: a :class:`~kvresponder.log.LogPolicy`, or ``None``.
    :param seconds: the clock, for request durations.
    :param date: formats a time as an HTTP Date header value.
    """

    def __init__(self, prefix: bytes, operations, body_limit: int, max_header_bytes: int, metrics, log_policy,
                 seconds, date) -> None:
        self._prefix = prefix
        self._starts = tuple(method + b" " + prefix for method in _METHODS)
        self.operations = operations
        self._body_limit = body_limit
        # As much as Twisted's channel takes (KVSite gives its lines the same cap): what it would refuse, it refuses.
        self._max_head = max_header_bytes
        self._metrics = metrics
        self._policy = log_policy
        self.seconds = seconds
        self._date = date
        #: The last Host value found valid: clients send the same one on every request.
        self._valid_host = b"\0"
        #: Whether the node is leaving: its answers then close their connections, which Twisted's path does.
        self._leaving = False

    def begin_leaving(self) -> None:
        """
        From now on, leave every request to Twisted's path, whose answers close their connections.
        """
        self._leaving = True

    def parse(self, data: bytes, offset: int):
        """
        The request that starts at ``offset`` of ``data``, if the lane takes it: ``(method, raw key, body,
        content type, end offset)``. If it has not all arrived: its size from ``offset`` (an ``int``) once its
        head is here, or :data:`INCOMPLETE` if it may be one. ``None`` for a request the lane leaves to
        Twisted.
        """
        end = data.find(b"\r\n\r\n", offset)
        if end < 0 or end - offset > self._max_head:
            breaks = data.count(b"\r\n", offset)
            if (len(data) - offset > self._max_head or data.count(b"\n", offset) != breaks
                    or data.count(b"\r", offset) - data.endswith(b"\r") != breaks):
                # Too long, or a line ended by a bare LF or a bare CR (a CR that ends what came may have its LF
                # in the next read): Twisted's path answers each.
                return None
            start = data[offset:offset + len(self._starts[-1])]
            for expected in self._starts:
                if expected.startswith(start) or start.startswith(expected):
                    return INCOMPLETE
            return None
        head = data[offset:end]
        breaks = head.count(b"\r\n")
        if breaks >= _MAX_HEADERS or b"\0" in head or head.count(b"\r") != breaks or head.count(b"\n") != breaks:
            # Too many lines, or a NUL, CR or LF other than the lines' ends anywhere in the head (checked once for
            # the head, not value by value).
            return None
        lines = head.split(b"\r\n")
        request_line = lines[0].split(b" ")
        if len(request_line) != 3:
            return None
        method, target, version = request_line
        if version != b"HTTP/1.1" or method not in _METHODS:
            return None
        prefix = self._prefix
        if (not target.startswith(prefix) or len(target) == len(prefix) or b"?" in target
                or not _TARGET(target)):
            return None
        length = None
        content_type = None
        host = None
        for index in range(1, len(lines)):
            line = lines[index]
            colon = line.find(b":")
            if colon <= 0:
                return None
            name = line[:colon]
            lowered = _COMMON_NAMES.get(name)
            if lowered is None:
                if not _TOKEN(name):
                    return None
                lowered = name.lower()
            value = line[colon + 1:].strip(b" \t")
            name = lowered
            if name == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 12:
                    return None
                length = int(value)
            elif name == b"content-type":
                if content_type is not None:
                    return None
                content_type = value
            elif name == b"host":
                # Exactly one, and a host: Twisted's path answers the others 400 (RFC 9112, 3.2).
                if host is not None:
                    return None
                if value != self._valid_host:
                    if not valid_host(value):
                        return None
                    self._valid_host = value
                host = value
            elif name == b"connection":
                if value.lower() != b"keep-alive":
                    return None
            elif name in _TWISTED_HEADERS:
                return None
        if host is None:
            return None
        body_start = end + 4
        if method == b"PUT":
            if length is None or length > self._body_limit:
                return None
        elif length:
            return None
        else:
            length = 0
        body_end = body_start + length
        if len(data) < body_end:
            # The whole head is here: say how much the request needs, so that a large body is gathered in
            # pieces, not parsed again as each one arrives.
            return body_end - offset
        raw = target[len(prefix):]
        if b"%" in raw:
            raw = unquote(raw)
        return method, raw, data[body_start:body_end], content_type, body_end

    def declines(self) -> bool:
        """
        Whether kv requests go to Twisted's path: when they are logged in more detail than the lane logs them (the
        ``http`` area at debug: each gets its ``http:read`` or ``http:request`` action), or the node is leaving.
        """
        if self._leaving:
            return True
        policy = self._policy
        return policy is not None and policy.enabled("http", DEBUG)

    def answer(self, method: bytes, raw: bytes, body: bytes, content_type, reply):
        """
        The answer to one request: an ``Answer`` now, or ``None``, and ``reply`` is called once with it
        (possibly before this returns). Never raises.
        """
        operations = self.operations
        try:
            key = operations.key(raw)
            if method == b"PUT":
                # A write that other nodes take part in answers through ``reply``, with no Deferred.
                return operations.put_to(key, body, content_type, reply)
            answer = operations.get(key) if method == b"GET" else operations.delete(key)
        except APIError as error:
            return error.status, error_body(error.code, error.message), tuple(error.headers.items())
        except Exception:
            write_traceback()
            return 500, _INTERNAL_ERROR, ()
        # An answer is a tuple; anything else a Deferred (whose ABC makes isinstance a slow test).
        if isinstance(answer, tuple):
            return answer
        answer.addBoth(_settled).addCallback(reply).addErrback(_log_failure)
        return None

    def render(self, status: int, body: bytes, headers, now: float) -> bytes:
        extra = b"".join([b"%s: %s\r\n" % header for header in headers]) if headers else b""
        return b"%sDate: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
            _status_line(status), self._date(now), len(body), extra, body)

    def account(self, method: bytes, status: int, started: float) -> None:
        metrics = self._metrics
        if metrics is not None:
            metrics.observe_request(_METHODS[method], _ROUTE, status, self.seconds() - started)


class ConnectionLane:
    """
    The lane on one connection. Its channel hands it every byte while it is open; it answers what it takes
    through the channel's ``send`` and returns the bytes from the first request it does not take on, for
    the channel to give Twisted. The channel reopens it (:meth:`reopen`) once Twisted has answered all it
    was given.

    :param FastLane lane: the site's lane.
    :param channel: the HTTP channel: ``send(data)``, ``receiving(bool)`` (a request is partly received),
        ``setTimeout``, ``transport``, and ``from_lane(data)`` (Twisted's parser gets what starts a request).
    """

    open = True
    _waiting = False
    _lost = False
    #: While the lane asks for an answer: one given to :meth:`_reply` meanwhile is kept here, not sent.
    _asking = False
    _early = None
    #: The request whose answer is awaited: its method, when it started, and the channel's idle timeout.
    _waiting_for = None
    #: Whether the lane stopped the connection reading, behind an answer that waits.
    holding_back = False
    #: Whether the lane holds requests it received because the connection's send buffer is full (the client is not
    #: reading its answers); the channel gives them back (:meth:`resume`) once the buffer drains.
    held_for_transport = False

    def __init__(self, lane: FastLane, channel) -> None:
        self._lane = lane
        self._channel = channel
        self._held = b""
        #: A request whose head is here and whose body is not: its pieces so far, their size, and its size.
        self._pieces: list = []
        self._got = 0
        self._need = 0

    @property
    def waiting(self) -> bool:
        """
        Whether a request the lane took is waiting for its answer.
        """
        return self._waiting

    def dataReceived(self, data: bytes) -> Optional[bytes]:
        """
        Take ``data``; returns what Twisted must parse (from a request the lane does not take on), or
        ``None``.
        """
        if self._need:
            self._pieces.append(data)
            self._got += len(data)
            if self._got < self._need:
                return None
            data = b"".join(self._pieces)
            self._pieces, self._got, self._need = [], 0, 0
        elif self._held:
            data = self._held + data
            self._held = b""
        if self._waiting:
            self._hold(data)
            return None
        return self._serve(data)

    def reopen(self, leftover: bytes) -> Optional[bytes]:
        """
        Open the lane again after Twisted answered its last request; ``leftover`` is what Twisted had
        received of the next one. Returns what goes back to Twisted, as :meth:`dataReceived` does.
        """
        self.open = True
        if not leftover:
            return None
        return self._serve(leftover)

    def connectionLost(self) -> None:
        self._lost = True
        self._held = b""
        self._pieces, self._got, self._need = [], 0, 0

    def _hold(self, data: bytes) -> None:
        self._held = data
        if len(data) > _HOLD and not self.holding_back:
            self.holding_back = True
            self._channel.transport.pauseProducing()

    def resume(self) -> Optional[bytes]:
        """
        Serve the requests held while the connection's send buffer was full; returns what Twisted must parse, as
        :meth:`dataReceived` does.
        """
        self.held_for_transport = False
        if self._waiting or not self._held:
            return None
        held, self._held = self._held, b""
        return self._serve(held)

    def _hold_for_transport(self, data: bytes) -> None:
        # Pipelined requests are answered only as fast as the client reads the answers: a few bytes of reads of a
        # large value would otherwise make answers without end, all held in memory (the channel already stopped
        # reading from the socket; what one read brought is held here).
        self._held = data
        self.held_for_transport = True

    def _serve(self, data: bytes) -> Optional[bytes]:
        lane = self._lane
        channel = self._channel
        if not channel.may_read():
            self._hold_for_transport(data)
            return None
        out = []
        out_size = 0
        offset = 0
        size = len(data)
        rest = None
        try:
            while offset < size:
                parsed = lane.parse(data, offset)
                if parsed is INCOMPLETE or type(parsed) is int:
                    if parsed is INCOMPLETE:
                        self._held = data[offset:]
                    else:
                        self._pieces, self._got, self._need = [data[offset:]], size - offset, parsed
                    if offset:
                        # This request started in this read, after one it completed: its deadline is its own.
                        channel.receiving(False)
                    channel.receiving(True)
                    return None
                if parsed is None:
                    self.open = False
                    rest = data[offset:]
                    break
                if lane.declines():
                    self.open = False
                    rest = data[offset:]
                    break
                method, raw, body, content_type, end = parsed
                offset = end
                started = lane.seconds()
                self._asking = True
                try:
                    answer = lane.answer(method, raw, body, content_type, self._reply)
                finally:
                    self._asking = False
                    early, self._early = self._early, None
                if answer is None:
                    answer = early
                    if answer is None:
                        self._wait(method, started, data[offset:])
                        return None
                    # Answered already, while it was asked: sent here, with what follows it.
                status, body, headers = answer
                out.append(lane.render(status, body, headers, started))
                out_size += len(body)
                self._lane.account(method, status, started)
                if out_size > _HOLD:
                    # Large answers to pipelined reads leave as they come, not all joined at the end.
                    channel.send(b"".join(out))
                    out, out_size = [], 0
                    if offset < size and not channel.may_read():
                        self._hold_for_transport(data[offset:])
                        channel.receiving(False)
                        return None
            if rest is None or offset:
                # Not a request received in part since earlier: a request Twisted now gets from its first
                # byte counts its deadline from now; one it continues keeps the time of that byte.
                channel.receiving(False)
            return rest
        finally:
            if out:
                channel.send(b"".join(out))

    def _wait(self, method: bytes, started: float, rest: bytes) -> None:
        """
        Hold the connection's later requests until the answer to this one comes (:meth:`_reply`).
        """
        self._waiting = True
        self._waiting_for = (method, started, self._channel.setTimeout(None))
        self._hold(rest)
        self._channel.receiving(False)

    def _reply(self, answer) -> None:
        """
        The answer to the request the lane asked for: kept if it comes while the lane asks, else sent, and the
        requests held behind it served.
        """
        if self._asking:
            self._early = answer
            return
        if self._waiting_for is None:
            # No request is waiting for an answer: one given twice is dropped rather than sent for another.
            return
        self._waiting = False
        method, started, saved_timeout = self._waiting_for
        self._waiting_for = None
        if self._lost:
            self._lane.account(method, 499, started)
            return
        channel = self._channel
        status, body, headers = answer
        channel.send(self._lane.render(status, body, headers, started))
        self._lane.account(method, status, started)
        channel.setTimeout(saved_timeout)
        if self.holding_back:
            self.holding_back = False
            if channel.may_read():
                channel.transport.resumeProducing()
        held, self._held = self._held, b""
        if held:
            rest = self._serve(held)
            if rest is not None:
                channel.from_lane(rest)


def _log_failure(failure) -> None:
    write_traceback(exc_info=(failure.type, failure.value, failure.tb))


def _settled(answer):
    """
    An operation's answer, or a bare 500 for a failure it did not turn into one (after logging it).
    """
    if isinstance(answer, Failure):
        _log_failure(answer)
        return 500, _INTERNAL_ERROR, ()
    return answer
