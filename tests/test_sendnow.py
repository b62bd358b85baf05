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
    return bool(transport._tempDataBuffer) or len(transport.dataBuffer) > transport.offset


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
