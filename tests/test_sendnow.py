"""
Writing to a TCP connection at once (kvresponder.sendnow): real connections on loopback.
"""

import socket

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from kvresponder.privateapi import tcp_write_buffered
from kvresponder.sendnow import no_delay, send_now


class _Collect(Protocol):
    """
    Keeps what it receives; ``received(n)`` fires once it holds ``n`` bytes, ``lost`` when the connection ends.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self._waiting = []
        self.connected_d: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        ready = [(n, d) for n, d in self._waiting if len(self.data) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.data) < n]
        for _, d in ready:
            d.callback(bytes(self.data))

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)

    def received(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        if len(self.data) >= count:
            d.callback(bytes(self.data))
        else:
            self._waiting.append((count, d))
        return d


class _Pair:
    """
    A server protocol and a client protocol joined by a real loopback TCP connection.
    """

    async def open(self):
        self.server = _Collect()
        self.port = reactor.listenTCP(0, Factory.forProtocol(lambda: self.server), interface="127.0.0.1")
        self.client = await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port).connect(
            Factory.forProtocol(_Collect))
        await self.server.connected_d
        return self

    async def close(self):
        for side in (self.client, self.server):
            if side.transport.connected:
                side.transport.abortConnection()
        await self.port.stopListening()


def _queued(transport) -> bool:
    # Bytes held in the transport's buffers, whatever its state, through the fence (tests/test_privateapi.py
    # checks it against Twisted's buffers): no private name here.
    return tcp_write_buffered(transport)


@pytest_twisted.ensureDeferred
async def test_a_write_on_an_idle_connection_leaves_at_once_in_both_directions():
    pair = await _Pair().open()
    try:
        for sender, receiver, data in ((pair.server, pair.client, b"answer"), (pair.client, pair.server, b"batch")):
            send_now(sender.transport, data)
            # Nothing waits for the reactor to report the socket writable: the transport holds nothing.
            assert not _queued(sender.transport)
            assert sender.transport not in reactor.getWriters()
            assert await receiver.received(len(data)) == data
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_a_write_behind_bytes_the_transport_still_holds_goes_behind_them():
    pair = await _Pair().open()
    try:
        pair.server.transport.write(b"first ")
        send_now(pair.server.transport, b"second")
        assert await pair.client.received(12) == b"first second"
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_follows_through_the_transport_in_order():
    pair = await _Pair().open()
    try:
        # Small socket buffers, so that the write below cannot fit in them whatever the host's defaults.
        pair.server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        pair.client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        pair.client.transport.pauseProducing()
        big = bytes(range(256)) * 4096  # 1 MiB
        send_now(pair.server.transport, big)
        assert _queued(pair.server.transport)
        send_now(pair.server.transport, b"tail")
        pair.client.transport.resumeProducing()
        received = await pair.client.received(len(big) + 4)
        assert received == big + b"tail"
    finally:
        await pair.close()


def test_a_transport_other_than_plain_tcp_gets_the_bytes_through_its_own_write():
    transport = StringTransport()
    send_now(transport, b"through write")
    assert transport.value() == b"through write"


@pytest_twisted.ensureDeferred
async def test_a_connection_that_is_closing_gets_the_bytes_through_its_own_write_before_it_closes():
    pair = await _Pair().open()
    try:
        pair.server.transport.loseConnection()
        send_now(pair.server.transport, b"last words")
        assert _queued(pair.server.transport)
        await pair.client.lost
        assert bytes(pair.client.data) == b"last words"
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_an_aborted_connection_sends_nothing_more():
    pair = await _Pair().open()
    try:
        pair.server.transport.abortConnection()
        send_now(pair.server.transport, b"never")
        await pair.client.lost
        assert bytes(pair.client.data) == b""
    finally:
        await pair.close()


class _Refusing:
    """
    A socket whose ``send`` fails; everything else is the real socket's.
    """

    def __init__(self, sock) -> None:
        self._sock = sock

    def send(self, data):
        raise OSError(32, "Broken pipe")

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest_twisted.ensureDeferred
async def test_a_send_that_fails_leaves_the_bytes_to_the_transport_which_meets_the_error_itself():
    pair = await _Pair().open()
    try:
        transport = pair.server.transport
        real = transport.socket
        transport.socket = _Refusing(real)
        try:
            send_now(transport, b"retried")
        finally:
            transport.socket = real
        assert _queued(transport)
        assert await pair.client.received(7) == b"retried"
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_no_delay_turns_nagle_off_on_tcp_and_leaves_other_transports_alone():
    pair = await _Pair().open()
    try:
        assert not pair.client.transport.getTcpNoDelay()
        no_delay(pair.client.transport)
        assert pair.client.transport.getTcpNoDelay()
        no_delay(StringTransport())
    finally:
        await pair.close()


# -- EndOfTurn ------------------------------------------------------------------------------------------------

from eliot import MemoryLogger  # noqa: E402
from eliot.testing import swap_logger  # noqa: E402
from twisted.internet.task import Clock, deferLater  # noqa: E402

from kvresponder.turn import EndOfTurn  # noqa: E402


def test_calls_handed_over_in_a_turn_run_once_each_in_order_when_the_turn_ends():
    """
    If calls are handed over during a turn, then none runs before the turn ends, and each runs once, in the
    order handed over, with one timer for all of them.
    """
    clock = Clock()
    turn = EndOfTurn(clock)
    ran = []
    for name in ("a", "b", "c"):
        turn.add(lambda name=name: ran.append(name))
    assert ran == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert ran == ["a", "b", "c"]
    clock.advance(0)
    assert ran == ["a", "b", "c"] and clock.getDelayedCalls() == []


def test_a_call_handed_over_while_the_calls_run_runs_after_them():
    """
    If a call hands over another (an answer written while the turn's answers go out), then it is not lost: it
    runs after the calls of the turn, on a timer of its own.
    """
    clock = Clock()
    turn = EndOfTurn(clock)
    ran = []
    timers = []

    def first():
        ran.append("first")
        turn.add(lambda: ran.append("next"))
        # Recorded, and checked outside: EndOfTurn logs what a call raises rather than let it out.
        timers.append(len(clock.getDelayedCalls()))

    turn.add(first)
    turn.add(lambda: ran.append("second"))
    clock.advance(0)
    assert ran == ["first", "second", "next"] and timers == [1] and clock.getDelayedCalls() == []


def test_a_failing_call_is_logged_and_the_others_still_run():
    """
    If one call raises, then the calls after it still run, and the failure is logged as a traceback.
    """
    logger = MemoryLogger()
    previous = swap_logger(logger)
    try:
        _fail_one_of_two()
    finally:
        swap_logger(previous)
    [failure] = logger.flush_tracebacks(RuntimeError)
    assert "writer broke" in str(failure["reason"])


def _fail_one_of_two():
    clock = Clock()
    turn = EndOfTurn(clock)
    ran = []

    def fail():
        raise RuntimeError("writer broke")

    turn.add(fail)
    turn.add(lambda: ran.append("after"))
    clock.advance(0)
    assert ran == ["after"]


@pytest_twisted.ensureDeferred
async def test_on_the_real_reactor_a_call_runs_once_the_turn_it_was_handed_over_in_returns():
    """
    If a call is handed over during a reactor turn, then it does not run while that turn's code runs, and it
    has run by the time the reactor serves a timer due later.
    """
    turn = EndOfTurn(reactor)
    ran = []
    turn.add(lambda: ran.append("end of turn"))
    assert ran == []
    await deferLater(reactor, 0.01, lambda: None)
    assert ran == ["end of turn"]


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt or SystemExit, raised by a call."""


def test_a_call_that_raises_past_exception_leaves_the_calls_after_it_for_the_next_turn():
    """
    If a call raises something other than an Exception (an interrupt), then it propagates, and the calls after
    it are not lost: they run at the end of the next turn.
    """
    clock = Clock()
    turn = EndOfTurn(clock)
    ran = []

    def interrupt():
        raise _Interrupt()

    turn.add(interrupt)
    turn.add(lambda: ran.append("after"))
    try:
        clock.advance(0)
    except _Interrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    assert ran == []
    clock.advance(0)
    assert ran == ["after"]
