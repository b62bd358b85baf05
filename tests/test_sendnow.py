"""
Writing to a TCP connection at once (kvresponder.sendnow): real connections on loopback.
"""

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from kvresponder.sendnow import send_now


class _Collect(Protocol):
    """
    Keeps what it receives; ``received(n)`` fires once it holds ``n`` bytes.
    """

    def __init__(self) -> None:
        self.data = b""
        self._waiting = []
        self.connected_d: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        ready = [(n, d) for n, d in self._waiting if len(self.data) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.data) < n]
        for _, d in ready:
            d.callback(self.data)

    def received(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        if len(self.data) >= count:
            d.callback(self.data)
        else:
            self._waiting.append((count, d))
        return d


async def _connected_pair():
    """
    A server protocol and a client protocol joined by a real loopback TCP connection, and the listening port.
    """
    accepted = _Collect()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: accepted), interface="127.0.0.1")
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(_Collect))
    await accepted.connected_d
    return accepted, client, port


def _queued(transport) -> bool:
    return bool(transport._tempDataBuffer) or len(transport.dataBuffer) > transport.offset


@pytest_twisted.ensureDeferred
async def test_a_write_on_an_idle_connection_leaves_at_once_in_both_directions():
    server, client, port = await _connected_pair()
    try:
        for sender, receiver, data in ((server, client, b"answer"), (client, server, b"batch")):
            send_now(sender.transport, data)
            # Nothing waits for the reactor to report the socket writable: the transport holds nothing.
            assert not _queued(sender.transport)
            assert sender.transport not in reactor.getWriters()
            assert await receiver.received(len(data)) == data
    finally:
        client.transport.loseConnection()
        server.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_follows_through_the_transport_in_order():
    server, client, port = await _connected_pair()
    try:
        client.transport.pauseProducing()
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than the socket buffers take while unread
        send_now(server.transport, big)
        assert _queued(server.transport)
        # Queued bytes are still leaving: the next write goes behind them, not around them.
        send_now(server.transport, b"tail")
        client.transport.resumeProducing()
        received = await client.received(len(big) + 4)
        assert len(received) == len(big) + 4
        assert received[-4:] == b"tail" and received[:len(big)] == big
    finally:
        client.transport.loseConnection()
        server.transport.loseConnection()
        await port.stopListening()


def test_a_transport_other_than_plain_tcp_gets_the_bytes_through_its_own_write():
    transport = StringTransport()
    send_now(transport, b"through write")
    assert transport.value() == b"through write"


@pytest_twisted.ensureDeferred
async def test_a_connection_that_is_closing_gets_the_bytes_through_its_own_write():
    server, client, port = await _connected_pair()
    try:
        written = []
        server.transport.disconnecting = True
        original = server.transport.write
        server.transport.write = lambda data: written.append(data)
        try:
            send_now(server.transport, b"late")
        finally:
            server.transport.write = original
            server.transport.disconnecting = False
        assert written == [b"late"]
    finally:
        client.transport.loseConnection()
        server.transport.loseConnection()
        await port.stopListening()
