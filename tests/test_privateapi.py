"""
Each private name of Twisted, Eliot, PyPy or CPython that ``kvresponder.privateapi`` uses still exists and still means
what it is used for. When an upgrade moves one, the test for it fails here first.
"""

import platform
import socket

import pytest

from hypothesis import given, settings, strategies as st
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site
from twisted.web.resource import Resource

from kvresponder import privateapi


def _connection():
    left, right = socket.socketpair()
    connection = tcp.Connection(left, None, reactor=MemoryReactor())
    connection.connected = True
    return connection, (left, right)


def test_a_tcp_transport_still_tells_what_it_has_queued_and_whether_it_is_closing():
    """
    If a TCP connection has nothing buffered and is open, then a direct write is safe; if it holds unsent
    bytes, is aborting, disconnecting or shut for writing, then it is not (``_tempDataBuffer``, ``dataBuffer``,
    ``offset``, ``_aborting``, ``_writeDisconnected``).
    """
    assert all(issubclass(kind, tcp.Connection) for kind in privateapi.PLAIN_TCP)
    connection, sockets = _connection()
    try:
        assert not privateapi.tcp_write_is_queued(connection)
        connection.write(b"x")
        assert connection._tempDataBuffer == [b"x"]
        assert privateapi.tcp_write_is_queued(connection)
        connection._tempDataBuffer, connection._tempDataLen = [], 0
        connection.dataBuffer, connection.offset = b"abc", 1
        assert privateapi.tcp_write_is_queued(connection)
        connection.dataBuffer, connection.offset = b"", 0
        for name in ("_aborting", "_writeDisconnected", "disconnecting"):
            assert not getattr(connection, name)
            setattr(connection, name, True)
            assert privateapi.tcp_write_is_queued(connection)
            setattr(connection, name, False)
    finally:
        for sock in sockets:
            sock.close()


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


def test_a_channel_still_keeps_its_handling_flag_and_its_unread_bytes():
    """
    If an HTTP channel is made, then it has ``_handlingRequest`` (not yet handling) and ``_dataBuffer`` (bytes
    received while a request is answered).
    """
    channel = _channel()
    assert privateapi.channel_between_requests(channel)
    channel._dataBuffer.append(b"next request")
    assert privateapi.take_unread(channel) == b"next request"
    assert channel._dataBuffer == []


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
    If the client's stale-connection error is imported, then it is an exception class.
    """
    assert issubclass(privateapi.RequestNotSent, Exception)


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


def test_eliot_still_keeps_its_destinations_where_the_sole_one_is_found():
    """
    If Eliot's own logger writes to exactly one destination with no global fields, then that destination is
    found; with two, with global fields, or with a memory logger in its place (``capture_logging``), none is.
    """
    from eliot import MemoryLogger
    from eliot._output import Destinations, Logger
    from eliot.testing import swap_logger

    def one(message):
        pass

    def two(message):
        pass

    logger = Logger()
    logger._destinations = Destinations()
    logger._destinations.add(one)
    previous = swap_logger(logger)
    try:
        assert privateapi.sole_eliot_destination() is one
        logger._destinations.add(two)
        assert privateapi.sole_eliot_destination() is None
        logger._destinations.remove(two)
        assert privateapi.sole_eliot_destination() is one
        logger._destinations.addGlobalFields(app="x")
        assert privateapi.sole_eliot_destination() is None
        swap_logger(MemoryLogger())
        assert privateapi.sole_eliot_destination() is None
    finally:
        swap_logger(previous)
