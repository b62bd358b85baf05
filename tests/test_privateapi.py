"""
Each private name of Twisted, Eliot, PyPy or CPython that ``kvresponder.privateapi`` uses still exists and still means
what it is used for. When an upgrade moves one, the test for it fails here first.
"""

import platform
import socket

import pytest

from hypothesis import given, settings, strategies as st
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site
from twisted.web.resource import Resource

from kvresponder import privateapi


def _connection(send_buffer=None):
    left, right = socket.socketpair()
    if send_buffer is not None:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    connection = tcp.Connection(left, None, reactor=MemoryReactorClock())
    connection.connected = True
    return connection, (left, right)


def _received(sock) -> bytes:
    sock.setblocking(False)
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_tcp_transport_is_queued_while_a_write_waits_and_not_once_it_is_sent():
    """
    If a TCP connection is open with nothing buffered, then a direct write is safe; once ``write`` has queued
    bytes (``_tempDataBuffer``), it is not, until the reactor's ``doWrite`` has sent them.
    """
    assert all(issubclass(kind, tcp.Connection) for kind in privateapi.PLAIN_TCP)
    connection, (left, right) = _connection()
    try:
        assert not privateapi.tcp_write_is_queued(connection) and not privateapi.tcp_write_buffered(connection)
        connection.write(b"x")
        assert privateapi.tcp_write_is_queued(connection) and privateapi.tcp_write_buffered(connection)
        assert connection.doWrite() is None
        assert not privateapi.tcp_write_is_queued(connection) and not privateapi.tcp_write_buffered(connection)
        assert _received(right) == b"x"
    finally:
        left.close()
        right.close()


def test_a_tcp_transport_is_queued_while_its_socket_has_taken_only_part_of_a_write():
    """
    If the socket takes only part of a large write (a small send buffer), then after ``doWrite`` the rest is
    held in ``dataBuffer`` past ``offset`` and a direct write is not safe; once the peer has read and
    ``doWrite`` has sent it all, it is again, and the peer got every byte in order.
    """
    data = bytes(range(256)) * 4096  # 1 MiB
    connection, (left, right) = _connection(send_buffer=4096)
    try:
        connection.write(data)
        assert connection.doWrite() is None
        assert connection._tempDataBuffer == []  # what is left waits in dataBuffer alone
        assert privateapi.tcp_write_is_queued(connection)
        received = []
        for _ in range(100000):
            if not privateapi.tcp_write_is_queued(connection):
                break
            received.append(_received(right))
            assert connection.doWrite() is None
        received.append(_received(right))
        assert b"".join(received) == data
        assert not privateapi.tcp_write_is_queued(connection)
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("close", ["abortConnection", "loseConnection", "loseWriteConnection"])
def test_a_tcp_transport_is_queued_once_it_is_aborting_closing_or_shut_for_writing(close):
    """
    If a TCP connection with nothing buffered is aborted (``_aborting``), told to close (``disconnecting``) or
    shut for writing (``_writeDisconnected``, set when ``doWrite`` shuts it after ``loseWriteConnection``),
    then a direct write is not safe. Just after ``loseWriteConnection`` it still is, as Twisted's own
    ``write`` still takes bytes then: they go out before the shutdown.
    """
    connection, (left, right) = _connection()
    try:
        assert not privateapi.tcp_write_is_queued(connection)
        getattr(connection, close)()
        if close == "loseWriteConnection":
            assert not privateapi.tcp_write_is_queued(connection)
            assert connection.doWrite() is None
            right.settimeout(5)
            assert right.recv(1) == b""  # the shutdown reached the peer
        assert privateapi.tcp_write_is_queued(connection)
    finally:
        left.close()
        right.close()


def _channel():
    channel = HTTPChannel()
    channel.site = Site(Resource())
    channel.requestFactory = Request
    channel.makeConnection(StringTransport())
    return channel


def test_a_request_still_carries_its_form_parsing_flag_and_its_disconnection():
    """
    If a Request is made, then it has the per-instance ``_parsePOSTFormSubmission`` that
    :func:`skip_form_parsing` clears, and ``_disconnected``, set once its connection is lost.
    """
    request = Request(_channel())
    assert request._parsePOSTFormSubmission is True
    privateapi.skip_form_parsing(request)
    assert request._parsePOSTFormSubmission is False
    assert privateapi.request_gone(request) is False
    request.connectionLost(Exception("gone"))
    assert privateapi.request_gone(request) is True


def test_a_request_still_answers_options_star_itself():
    """
    If ``OPTIONS *`` reaches Twisted's ``Request._handleStar``, then it answers it.
    """
    channel = _channel()
    request = Request(channel)
    channel.requests.append(request)
    request.method = b"OPTIONS"
    privateapi.handle_star(request)
    assert request.finished and request.code == 200


def _pending_channel():
    """
    A channel on a plain transport whose resource answers no request by itself (``NOT_DONE_YET``), and the
    requests it was given, in order.
    """
    from twisted.web.server import NOT_DONE_YET

    given = []

    class Pending(Resource):
        isLeaf = True

        def render_GET(self, request):
            given.append(request)
            return NOT_DONE_YET

    channel = HTTPChannel()
    channel.site = Site(Pending())
    channel.requestFactory = Request
    channel.makeConnection(StringTransport())
    return channel, given


def test_a_channel_is_between_requests_only_when_it_is_answering_none():
    """
    If a channel has no request, then it is between requests; while a request it received is unanswered
    (``_handlingRequest``), it is not; once that answer is finished, it is again, and not while the next
    request is answered.
    """
    channel, given = _pending_channel()
    assert privateapi.channel_between_requests(channel)
    channel.dataReceived(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
    [first] = given
    assert not privateapi.channel_between_requests(channel)
    first.finish()
    assert privateapi.channel_between_requests(channel)
    channel.dataReceived(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [request.path for request in given] == [b"/first", b"/second"]
    assert not privateapi.channel_between_requests(channel)
    given[1].finish()
    assert privateapi.channel_between_requests(channel)


def test_the_unread_bytes_of_a_channel_are_what_arrived_while_it_answered_a_request():
    """
    If the next request arrives in a later read while a request is unanswered, then the channel holds it
    unparsed (in ``_dataBuffer``), and taking the unread bytes gives it and leaves none.
    """
    channel, given = _pending_channel()
    channel.dataReceived(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
    second = b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
    channel.dataReceived(second[:10])
    channel.dataReceived(second[10:])
    assert [request.path for request in given] == [b"/first"]
    assert privateapi.take_unread(channel) == second
    assert privateapi.take_unread(channel) == b""
    given[0].finish()
    assert [request.path for request in given] == [b"/first"]  # what was taken is not parsed afterwards


def test_a_stopped_channel_parses_nothing_more_of_what_it_received():
    """
    If a channel is stopped while it handles a request (``requests`` emptied) and its unread bytes are taken,
    then the pipelined request that arrived with it is neither parsed nor answered, and the channel's end
    reaches no request.
    """
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web.server import NOT_DONE_YET

    seen, lost = [], []

    class Stops(Resource):
        isLeaf = True

        def render_GET(self, request):
            seen.append(request.path)
            request.notifyFinish().addErrback(lost.append)
            privateapi.stop_channel(channel)
            return NOT_DONE_YET

    channel = HTTPChannel()
    channel.site = Site(Stops())
    channel.requestFactory = Request
    transport = StringTransport()
    channel.makeConnection(transport)
    second = b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
    channel.dataReceived(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n" + second)
    assert seen == [b"/first"] and channel.requests == []
    assert privateapi.take_unread(channel) == second
    assert transport.value() == b""
    channel.connectionLost(Failure(ConnectionDone()))
    assert seen == [b"/first"] and transport.value() == b"" and lost == []


def test_a_tcp_transport_delivers_to_the_protocol_it_is_given():
    """
    If a TCP connection's protocol is replaced, then what it reads next, and its end, go to the new one.
    """
    from twisted.internet.error import ConnectionDone
    from twisted.internet.protocol import Protocol
    from twisted.python.failure import Failure

    class Keeps(Protocol):
        def __init__(self):
            self.data, self.lost = b"", False

        def dataReceived(self, data):
            self.data += data

        def connectionLost(self, reason=None):
            self.lost = True

    old, new = Keeps(), Keeps()
    left, right = socket.socketpair()
    try:
        connection = tcp.Connection(left, old, reactor=MemoryReactor())
        connection.connected = True
        privateapi.give_connection_to(connection, new)
        right.sendall(b"after")
        connection.doRead()
        assert (old.data, new.data) == (b"", b"after")
        connection.connectionLost(Failure(ConnectionDone()))
        assert (old.lost, new.lost) == (False, True)
    finally:
        left.close()
        right.close()


def test_a_channel_whose_idle_timeout_is_stopped_mid_request_keeps_it_off_after_the_request():
    """
    If the idle timeout is stopped while a request is being answered (when Twisted has saved the timeout in
    ``_savedTimeOut``, to restore it once the request is done), then it stays off after the request, and no
    timer is left.
    """
    from twisted.internet.task import Clock
    from twisted.web.server import NOT_DONE_YET

    class Pending(Resource):
        isLeaf = True

        def render_GET(self, request):
            return NOT_DONE_YET

    clock = Clock()
    channel = HTTPChannel()
    channel.site = Site(Pending())
    channel.requestFactory = Request
    channel.callLater = clock.callLater
    channel.timeOut = 30
    channel.makeConnection(StringTransport())
    assert [call.getTime() for call in clock.getDelayedCalls()] == [30]
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    request = channel.requests[-1]
    assert clock.getDelayedCalls() == []  # the timeout is saved while the request is answered
    privateapi.stop_idle_timeout(channel)
    request.finish()
    assert channel.timeOut is None
    assert clock.getDelayedCalls() == []


def test_eliot_still_continues_a_task_with_a_typed_actions_serializers():
    """
    If a serialized task is continued as a typed action, then its messages carry the type's serializers: a
    field of the declared type validates, one of another type does not (with no serializers, nothing is
    validated).
    """
    from eliot import ActionType, Field, MemoryLogger, ValidationError, start_action
    from eliot.testing import swap_logger

    typed = ActionType("test:typed", [Field.forTypes("n", [int], "a number")], [])
    with start_action(MemoryLogger(), action_type="test:outer") as outer:
        task_id = outer.serialize_task_id()

    def continued(n) -> MemoryLogger:
        memory = MemoryLogger()
        previous = swap_logger(memory)
        try:
            with privateapi.continue_typed_task(typed, task_id, n=n):
                pass
        finally:
            swap_logger(previous)
        return memory

    good = continued(7)
    good.validate()
    started = [m for m in good.messages if m.get("action_status") == "started"]
    assert started[0]["n"] == 7 and started[0]["action_type"] == "test:typed"
    assert started[0]["task_uuid"] == outer.task_uuid
    with pytest.raises(ValidationError):
        continued("not a number").validate()


def test_a_channel_still_knows_the_target_of_the_request_it_is_receiving_before_its_body():
    """
    If a channel has parsed a request line and headers but not the body, then ``_path`` and ``_command`` hold
    its target and method (the body limit is chosen from them before the body is read).
    """
    seen = []

    class Limited(Request):
        def gotLength(self, length):
            seen.append(privateapi.request_target(self.channel))
            Request.gotLength(self, length)

    channel = _channel()
    channel.requestFactory = Limited
    channel.dataReceived(b"PUT /t/kv/a%2Fb?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
    assert seen == [(b"/t/kv/a%2Fb?x=1", b"PUT")]


def test_a_channel_still_calls_the_bad_request_hook_on_what_its_parser_refuses():
    """
    If a channel subclass installs an answer for bad requests, then a malformed header line reaches it.
    """
    seen = []

    class Channel(HTTPChannel):
        pass

    privateapi.answer_bad_requests(Channel, lambda channel: seen.append(channel))
    assert hasattr(HTTPChannel, privateapi.BAD_REQUEST_HOOK)
    channel = Channel()
    channel.site = Site(Resource())
    channel.requestFactory = Request
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nthis is not a header\r\n\r\n")
    assert seen == [channel]


def test_the_http_client_still_names_a_request_it_could_not_send():
    """
    If a request is issued on a pooled HTTP/1.1 connection that has already closed (one the pool kept, whose
    peer has gone), then it fails with the error the peer transport retries once: ``privateapi.RequestNotSent``.
    """
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure
    from twisted.web.client import Headers
    from twisted.web._newclient import HTTP11ClientProtocol, Request

    assert issubclass(privateapi.RequestNotSent, Exception)
    protocol = HTTP11ClientProtocol()
    protocol.makeConnection(StringTransport())
    protocol.connectionLost(Failure(ConnectionDone()))
    failures = []
    protocol.request(Request(b"GET", b"/", Headers(), None)).addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(privateapi.RequestNotSent)


def test_eliot_still_names_its_tasks_with_the_uuid4_of_its_action_module():
    """
    If the task id factory is replaced, then a new task is named by it.
    """
    import eliot._action
    from eliot import MemoryLogger, start_action
    original = eliot._action.uuid4
    try:
        privateapi.set_task_uuid_factory(lambda: "00000000-0000-4000-8000-000000000001")
        with start_action(MemoryLogger(), action_type="test") as action:
            assert action.task_uuid == "00000000-0000-4000-8000-000000000001"
    finally:
        eliot._action.uuid4 = original


def test_pypy_still_has_its_blake2b_cffi_module():
    """
    If this is PyPy, then the cffi module beneath hashlib's BLAKE2b still has the functions, the state type and
    the parameter fields the direct digest uses, and the digest, keyed or not, is hashlib's; elsewhere there
    is none.
    """
    import hashlib

    if platform.python_implementation() != "PyPy":
        assert privateapi.pypy_blake2b_direct(b"", 16, 128) is None
        return
    for key, size in ((b"", 16), (b"k" * 32, 16), (b"", 8)):
        digest = privateapi.pypy_blake2b_direct(key, size, 128)
        assert digest is not None
        for message in (b"", b"user:42", bytes(range(256)) * 3):
            assert digest(message) == hashlib.blake2b(message, digest_size=size, key=key).digest()


def test_eliots_default_logger_is_what_capture_logging_swaps():
    """
    If Eliot's tests swap in a memory logger, then the logger privateapi names as Eliot's default is that
    one, and a message written to it is captured; afterwards it is a real Logger again.
    """
    from eliot import Logger, MemoryLogger
    from eliot.testing import swap_logger

    memory = MemoryLogger()
    previous = swap_logger(memory)
    try:
        assert privateapi.default_eliot_logger() is memory
        privateapi.default_eliot_logger().write({"message_type": "test:x"})
    finally:
        swap_logger(previous)
    assert memory.messages == [{"message_type": "test:x"}]
    assert isinstance(privateapi.default_eliot_logger(), Logger)


def test_a_channel_still_says_when_it_waits_for_its_transport():
    """
    If the transport tells an HTTP channel to pause (its send buffer is full), then the channel says it waits
    for the transport, until the transport resumes it.
    """
    channel = _channel()
    assert not privateapi.channel_waiting_for_transport(channel)
    channel.pauseProducing()
    assert privateapi.channel_waiting_for_transport(channel)
    channel.resumeProducing()
    assert not privateapi.channel_waiting_for_transport(channel)


class _Odd:
    """A value JSON cannot encode by itself: the encoder's ``default`` turns it into text."""


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                    | st.builds(_Odd),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12))
@settings(max_examples=300, deadline=None)
def test_the_c_json_encoder_built_once_encodes_as_jsonencoder_does(value):
    """
    If this is CPython, then its C JSON encoder built once with JSONEncoder's arguments (what the log lines are
    encoded with) gives JSONEncoder's text for any value, NaN and infinities, and values only ``default``
    can encode, included; elsewhere there is none.
    """
    import json

    def default(odd):
        return "<odd>"

    encode = privateapi.c_json_encoder(default)
    if platform.python_implementation() != "CPython":
        assert encode is None
        return
    assert encode(value) == json.JSONEncoder(default=default, check_circular=False).encode(value)


def test_eliot_still_keeps_the_destinations_it_adds_where_the_sole_one_is_found():
    """
    If destinations are added through Eliot's public ``add_destinations``, then what its default logger writes
    reaches them, and the sole one is found there: exactly one with no global fields is found; with two, with
    global fields (``add_global_fields``), or with a memory logger in the default's place (``capture_logging``),
    none is. (The process's own destinations and global fields are set aside meanwhile, and put back.)
    """
    import eliot
    from eliot import MemoryLogger
    from eliot.testing import swap_logger

    heard = []
    one = heard.append

    def two(message):
        pass

    registry = eliot.add_destinations.__self__  # what the public calls add to, remove from and read fields of
    saved = registry._destinations, registry._any_added, registry._globalFields
    registry._destinations, registry._any_added, registry._globalFields = [], True, {}
    try:
        assert privateapi.sole_eliot_destination() is None
        eliot.add_destinations(one)
        eliot.log_message(message_type="test:heard")
        assert [message["message_type"] for message in heard] == ["test:heard"]
        assert privateapi.sole_eliot_destination() is one
        eliot.add_destinations(two)
        assert privateapi.sole_eliot_destination() is None
        eliot.remove_destination(two)
        assert privateapi.sole_eliot_destination() is one
        previous = swap_logger(MemoryLogger())
        try:
            assert privateapi.sole_eliot_destination() is None
        finally:
            swap_logger(previous)
        assert privateapi.sole_eliot_destination() is one
        eliot.add_global_fields(app="x")
        assert privateapi.sole_eliot_destination() is None
    finally:
        registry._destinations, registry._any_added, registry._globalFields = saved


def test_a_reactor_times_its_timers_by_the_clock_it_is_given():
    """
    If a reactor is given another clock (``time_reactor_by``), then its timers are set, waited for and run by
    that clock: ``callLater``, ``timeout`` and ``runUntilCurrent`` still read the reactor's ``seconds``.
    """
    from twisted.internet.epollreactor import EPollReactor
    from kvresponder.privateapi import time_reactor_by

    reactor = EPollReactor()
    try:
        now = [1000.0]
        time_reactor_by(reactor, lambda: now[0])
        fired = []
        call = reactor.callLater(5, fired.append, True)
        assert call.getTime() == 1005.0
        assert reactor.timeout() == 5.0
        now[0] = 1004.9
        reactor.runUntilCurrent()
        assert fired == []
        now[0] = 1005.0
        reactor.runUntilCurrent()
        assert fired == [True]
    finally:
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)
        reactor._poller.close()


class _Reader:
    """A readable descriptor for a reactor: records the legacy log context each ``doRead`` ran in."""

    def __init__(self, sock, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.contexts = []
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "reader-prefix"

    def doRead(self):
        from twisted.python import context, log

        self.contexts.append(dict(context.get(log.ILogContext)))
        self.sock.recv(100)
        if self.fail:
            raise ValueError("doRead failed")

    def connectionLost(self, reason):
        self.lost.append(reason)


def _epoll_reactor_with_reader(**options):
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    ours, theirs = socket.socketpair()
    reader = _Reader(ours, **options)
    reactor.addReader(reader)
    theirs.send(b"x")
    return reactor, reader, (ours, theirs)


def _close(reactor, sockets) -> None:
    reactor.removeAll()
    reactor.removeReader(reactor.waker)
    reactor.waker.connectionLost(None)
    reactor._poller.close()
    for sock in sockets:
        sock.close()


def test_an_epoll_reactor_still_hands_each_ready_descriptor_to_do_read_or_write_in_its_poll():
    """
    If a descriptor an epoll reactor reads from is ready, then its ``doPoll`` (``doIteration``) polls ``_poller``
    for at most as many events as ``_selectables`` holds and hands each to ``_doReadOrWrite(selectable, fd,
    event)``, inside the legacy log context ``callWithLogger`` makes: what ``dispatch_without_log_context``
    repeats without that context.
    """
    import select

    from twisted.internet.epollreactor import EPollReactor

    assert EPollReactor.doIteration is EPollReactor.doPoll
    reactor, reader, sockets = _epoll_reactor_with_reader()
    try:
        assert reactor._selectables[reader.fileno()] is reader
        handed = []
        dispatch = reactor._doReadOrWrite
        reactor._doReadOrWrite = lambda *args: (handed.append(args), dispatch(*args))
        reactor.doIteration(1.0)
        assert handed == [(reader, reader.fileno(), select.EPOLLIN)]
        assert [context["system"] for context in reader.contexts] == ["reader-prefix"]
    finally:
        _close(reactor, sockets)


@pytest.mark.parametrize("fail", [False, True])
def test_an_epoll_reactor_that_dispatches_without_log_context_reads_and_drops_a_failing_reader(fail):
    """
    If an epoll reactor dispatches without the legacy log context, then a ready descriptor is still read
    (with no ``system`` prefix of its own), and one whose ``doRead`` raises is still logged and dropped, as
    ``_doReadOrWrite`` does; any other kind of reactor is left as it is.
    """
    from twisted.internet.testing import MemoryReactor
    from twisted.python import log
    from kvresponder.privateapi import dispatch_without_log_context

    assert not dispatch_without_log_context(MemoryReactor())
    reactor, reader, sockets = _epoll_reactor_with_reader(fail=fail)
    logged = []
    log.addObserver(logged.append)
    try:
        assert dispatch_without_log_context(reactor)
        reactor.doIteration(1.0)
        assert len(reader.contexts) == 1 and reader.contexts[0].get("system") != "reader-prefix"
        if fail:
            assert len(reader.lost) == 1 and reader.fileno() not in reactor._selectables
            assert any(event.get("isError") and "doRead failed" in str(event.get("failure")) for event in logged)
        else:
            assert reader.lost == [] and reactor._selectables[reader.fileno()] is reader
            reactor.doIteration(0)  # nothing more to read: nothing handed
            assert len(reader.contexts) == 1
    finally:
        log.removeObserver(logged.append)
        _close(reactor, sockets)


def test_a_stub_treq_serves_the_site_it_is_given_on_its_own_memory_reactor():
    """
    treq's StubTreq still keeps its agent, the agent its memory reactor and its server factory under the names the
    tests' in-memory client replaces (``stub_treq_serving``): a request reaches the site given, not the plain Site
    StubTreq built, and the site runs on the stub's reactor.
    """
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from kvresponder.privateapi import stub_treq_serving

    class Hello(Resource):
        isLeaf = True

        def render_GET(self, request):
            return b"from the given site"

    site = Site(Hello())
    given = site.reactor = Clock()
    stub = stub_treq_serving(site)
    assert site.reactor is not given
    responses = []
    stub.get("http://example.test/").addCallback(stub.content).addBoth(responses.append)
    stub.flush()
    assert responses == [b"from the given site"]
