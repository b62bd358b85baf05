"""
Every private name of Twisted, Eliot, treq, PyPy or CPython that KV Responder (and its tests) uses, and nothing
else.

Each one is here for a reason no public hook serves (said beside it), and only here: the rest of the code calls
the functions below. ``tests/test_privateapi.py`` pins every name, so an upgrade that moves one fails a test
instead of the service, and setup.cfg bounds Twisted, Eliot and treq below their next major release.
"""

from typing import Callable, Optional, Tuple

# -- Twisted: the TCP transport (kvresponder.sendnow) ---------------------------------------------------

from twisted.internet import tcp

#: The transports whose socket may be written to directly: plain TCP, either direction (never TLS or any other
#: wrapper, which would forward the socket attribute to the connection beneath it, nor a test's).
PLAIN_TCP = (tcp.Server, tcp.Client)


def tcp_write_is_queued(transport) -> bool:
    """
    Whether a plain TCP transport is closing, aborted or shut for writing, or still holds bytes it has not
    sent: then a write must go through its own ``write``, behind them. Twisted has no public way to ask.
    """
    return bool(transport.disconnecting or transport._aborting or transport._writeDisconnected
                or tcp_write_buffered(transport))


def tcp_write_buffered(transport) -> bool:
    """
    Whether a plain TCP transport holds bytes written and not yet sent (``write`` queued them, or the socket took
    only part of them), whatever its state.
    """
    return bool(transport._tempDataBuffer or len(transport.dataBuffer) > transport.offset)


# -- Twisted: the reactor's clock (kvresponder.tap) -------------------------------------------------------


def time_reactor_by(reactor, seconds: Callable[[], float]) -> None:
    """
    Make ``reactor`` time its timers by ``seconds``. Twisted's ``ReactorBase`` reads ``self.seconds()`` in
    ``callLater``, ``timeout`` and ``runUntilCurrent``, and that is the wall clock, which an NTP step moves; it
    has no public way to take another clock.
    """
    reactor.seconds = seconds


def dispatch_without_log_context(reactor) -> bool:
    """
    Make an epoll ``reactor`` hand each ready descriptor to its ``_doReadOrWrite`` as its ``doPoll`` does, but
    without wrapping each call in ``log.callWithLogger``: for every event, that asked the selectable for its log
    prefix and built three dictionaries of legacy-log context, a share of a loaded node's time that grew with
    every extra event a replicated write brings (the copy stream's answers), for a ``system`` field that only
    Twisted's legacy log reads. ``_doReadOrWrite`` catches what ``doRead`` and ``doWrite`` raise, logs it and
    drops the connection, as before; anything it lets through is logged here, as ``callWithLogger`` did.
    There is no public hook: ``doPoll`` (``doIteration``) is the loop Twisted's ``mainLoop`` calls.

    :return: whether it did (``False`` for a reactor of another kind, which is left as it is).
    """
    from twisted.internet.epollreactor import EPollReactor
    from twisted.python import log

    if type(reactor) is not EPollReactor:
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite
    get = selectables.get

    def doPoll(timeout):
        try:
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:  # EINTR, as Python raises it
            return
        for fd, event in events:
            selectable = get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err()

    reactor.doPoll = reactor.doIteration = doPoll
    return True


# -- Twisted: the HTTP server (kvresponder.http.site, kvresponder.http.api) -----------------------------

from twisted.web.http import HTTPChannel  # noqa: E402
from twisted.web.server import Request  # noqa: E402


def request_target(channel) -> Tuple[bytes, bytes]:
    """
    The path (with its query) and the method of the request an HTTP channel is receiving, once its request
    line is parsed and before its body arrives: the body's limit depends on the route, and
    ``Request.gotLength``, where a body over it must be refused unbuffered, is called before the request
    knows its own path.
    """
    return getattr(channel, "_path", b"") or b"", getattr(channel, "_command", b"") or b""


def skip_form_parsing(request) -> None:
    """
    Stop Twisted parsing a form POST's body: the API takes JSON only, and answers a form with its own JSON 415
    (Twisted's parse answered a malformed form with a bare 400, and parsing every POST's Content-Type through
    the email package was a large share of a peer's work). ``Request.__init__`` sets the flag per instance.
    """
    request._parsePOSTFormSubmission = False


def request_gone(request) -> bool:
    """
    Whether the client of ``request`` has disconnected, so that nothing should be written to it.
    """
    return request._disconnected


def handle_star(request) -> None:
    """
    Twisted's own answer to ``OPTIONS *``.
    """
    Request._handleStar(request)


def channel_between_requests(channel) -> bool:
    """
    Whether an HTTP channel is not in the middle of handling a request (so bytes arriving start a new one).
    """
    return not channel._handlingRequest


def channel_waiting_for_transport(channel) -> bool:
    """
    Whether an HTTP channel stopped reading because its transport's send buffer is full (the client is not
    reading its answers): reading must then stay off until the transport drains.
    """
    return channel._waitingForTransport


def take_unread(channel) -> bytes:
    """
    The bytes an HTTP channel received past the request it is answering, taken out of it: what a client sent
    after an upgrade request, for the protocol that takes the connection over.
    """
    leftover = channel.clearLineBuffer() + b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    return leftover


def stop_idle_timeout(channel) -> None:
    """
    Turn off an HTTP channel's idle timeout for good, including the value it restores after a request.
    """
    channel.timeOut = channel._savedTimeOut = None


def stop_channel(channel) -> None:
    """
    Make an HTTP channel let go of its connection from inside the handling of a request: it forgets its
    requests, so that its end (which the protocol taking the connection over passes on) reaches none of them.
    With :func:`take_unread`, which empties its parser's buffers, it parses nothing more. Twisted has no public
    way to end HTTP on a connection that stays open.
    """
    del channel.requests[:]


def give_connection_to(transport, protocol) -> None:
    """
    Make a plain TCP transport deliver what it reads, and its end, to ``protocol`` from now on (the caller then
    connects ``protocol`` to it). A TCP transport calls whatever its ``protocol`` attribute names; Twisted has
    no public call to give a connection to another protocol.
    """
    transport.protocol = protocol


#: The name of the method an ``HTTPChannel`` calls when its parser refuses a request (a bad header line,
#: Content-Length or chunk): a subclass that defines it answers in its own format instead of a bare 400.
BAD_REQUEST_HOOK = "_respondToBadRequestAndDisconnect"


def answer_bad_requests(channel_class, answer: Callable[[HTTPChannel], None]) -> None:
    """
    Make the ``HTTPChannel`` subclass ``channel_class`` answer requests its parser refuses with ``answer``.
    """
    setattr(channel_class, BAD_REQUEST_HOOK, answer)


# -- Twisted: the HTTP client (kvresponder.peertransport) ------------------------------------------------

from twisted.web import _newclient  # noqa: E402

#: What the HTTP client raises for a request on a pooled connection that went stale before it was sent.
RequestNotSent = _newclient.RequestNotSent


# -- Eliot (kvresponder.log) ---------------------------------------------------------------------------------

import eliot._output as _eliot_output  # noqa: E402


def set_task_uuid_factory(factory: Callable[[], str]) -> None:
    """
    Make Eliot name new tasks with ``factory()``: Eliot draws each task id with ``uuid4()`` inside
    ``eliot._action``, a system call for the random source on every task.
    """
    import eliot._action
    eliot._action.uuid4 = factory


def continue_typed_task(action_type, task_id, **fields):
    """
    ``Action.continue_task`` for a typed action: the continued action validates and serializes its fields as
    ``action_type`` (an ``ActionType``) declares, as an action it starts itself does. Eliot's public
    ``continue_task`` takes a type's name only: its serializers go in through the private ``_serializers``
    keyword, and are the type's private ``_serializers``.
    """
    from eliot import Action
    return Action.continue_task(task_id=task_id, action_type=action_type.action_type,
                                _serializers=action_type._serializers, **fields)


def default_eliot_logger():
    """
    The logger Eliot writes a message to when it is given none: what ``eliot.testing.capture_logging``
    swaps for its memory logger. :func:`kvresponder.log.emit` writes there, as Eliot's own messages do.
    """
    return _eliot_output._DEFAULT_LOGGER


def sole_eliot_destination():
    """
    The destination every message goes to, and the only one, where Eliot's own default logger is in place
    with exactly one destination and no global fields: what a message written there would reach, unchanged.
    ``None`` otherwise (a logger swapped in by ``capture_logging``, no destination yet, or several). Eliot
    does not say which destinations it has. :class:`kvresponder.log.DirectLine` writes its line straight to
    the service's own destination only while it is the sole one.
    """
    destinations = getattr(_eliot_output._DEFAULT_LOGGER, "_destinations", None)
    if destinations is None or destinations._globalFields:
        return None
    added = destinations._destinations
    return added[0] if len(added) == 1 else None


# -- PyPy (kvresponder.digest) -------------------------------------------------------------------------------

def pypy_blake2b_direct(key: bytes, digest_size: int, block: int) -> Optional[Callable[[bytes], bytes]]:
    """
    On PyPy, a function giving the BLAKE2b digest of ``digest_size`` bytes, keyed with ``key`` (a ``block``-byte
    block at most), of its one argument, through the C functions of the cffi module beneath
    ``hashlib.blake2b``: from a state set up once (with the key's block already taken in) and copied for each
    message, without building the Python object and its parameter block for each. ``None`` where that module
    does not exist (CPython, or a PyPy laid out otherwise). The function keeps its own state: call it from one
    thread. :mod:`kvresponder.digest` checks it against ``hashlib`` before it uses it.
    """
    try:
        from _blake2._blake2b_cffi import ffi, lib
    except ImportError:
        return None
    param = ffi.new("blake_param*")
    param.digest_length = digest_size
    param.key_length = len(key)
    param.fanout = 1
    param.depth = 1
    ready = ffi.new("blake_state*")
    if lib.blake_init_param(ready, param) < 0:
        return None
    if key:
        # As BLAKE2b does for a key: its first block is the key, padded with zeros.
        lib.blake_update(ready, key + b"\0" * (block - len(key)), block)
    state = ffi.new("blake_state*")
    out = ffi.new("char[]", digest_size)
    size = ffi.sizeof("blake_state")
    memmove, update, final, unpack = ffi.memmove, lib.blake_update, lib.blake_final, ffi.unpack

    def digest(data: bytes) -> bytes:
        memmove(state, ready, size)
        update(state, data, len(data))
        final(state, out, digest_size)
        return unpack(out, digest_size)
    return digest


# -- CPython: the C JSON encoder (kvresponder.log) ------------------------------------------------------------

def c_json_encoder(default: Callable[[object], object]) -> Optional[Callable[[object], str]]:
    """
    ``json.JSONEncoder(default=default, check_circular=False).encode``, through CPython's C encoder built once:
    ``JSONEncoder.encode`` builds it again, and a closure, for every value it encodes, which was a visible share
    of a log line on CPython. ``None`` where ``json`` has no C encoder (PyPy).
    """
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii
    except ImportError:
        return None  # a json without the name at all (PyPy 3.9)
    if c_make_encoder is None:
        return None
    # The arguments JSONEncoder.iterencode passes: no cycle check, no indent, its separators and defaults.
    encoder = c_make_encoder(None, default, encode_basestring_ascii, None, ": ", ", ", False, False, True)
    join = "".join

    def encode(value) -> str:
        return join(encoder(value, 0))
    return encode


# -- treq: the in-memory client of the tests (tests/support.py) ---------------------------------------------

def stub_treq_serving(site):
    """
    A ``treq.testing.StubTreq`` whose in-memory server is ``site``, timed by the stub's own memory reactor: StubTreq
    builds a plain ``Site`` around a resource, and takes no site of its own; the tests need the node's (its request
    accounting and limits).
    """
    from twisted.web.resource import Resource
    from treq.testing import StubTreq

    stub = StubTreq(Resource())
    site.reactor = stub._agent._memoryReactor
    stub._agent._serverFactory = site
    return stub
