"""
The client port is closed without resetting the connections waiting in its backlog: they are accepted first.
Real sockets on 127.0.0.1, under the real reactor.
"""

import socket

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from kvresponder.listening import ListeningEndpoint, accept_waiting

WAITING = 20


class _Answer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"answered " + data)
        self.transport.loseConnection()


def _answers(clients) -> list:
    answers = []
    for client in clients:
        try:
            answers.append(client.recv(100))
        except ConnectionResetError:
            answers.append(b"<reset>")
        client.close()
    return answers


async def _close_with_waiting_connections(accept: bool) -> list:
    listening = ListeningEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    port = await listening.listen(Factory.forProtocol(_Answer))
    assert listening.port is port
    # No reactor turn from here to the close: each connection completes its handshake in the kernel's backlog,
    # and sends its request, unaccepted.
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) for _ in range(WAITING)]
    for index, client in enumerate(clients):
        client.sendall(b"%d" % (index,))
    took = accept_waiting(port) if accept else False
    stopped: Deferred = port.stopListening()
    await stopped
    await deferLater(reactor, 0.2, lambda: None)
    answers = await deferToThread(_answers, clients)
    return took, answers


@pytest_twisted.ensureDeferred
async def test_connections_waiting_when_the_port_closes_are_accepted_and_answered_not_reset():
    """
    If connections are waiting in the port's backlog, each with its request sent, when the node closes the port,
    then :func:`accept_waiting` takes them in first and each is answered; closed without it, they are reset.
    """
    took, answers = await _close_with_waiting_connections(accept=True)
    assert took
    assert answers == [b"answered %d" % (index,) for index in range(WAITING)]
    took, answers = await _close_with_waiting_connections(accept=False)
    assert not took and answers.count(b"<reset>") == WAITING, answers


@pytest_twisted.ensureDeferred
async def test_nothing_is_accepted_from_a_port_with_no_connection_waiting_or_no_port():
    listening = ListeningEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    assert not accept_waiting(listening.port)
    port = await listening.listen(Factory.forProtocol(_Answer))
    assert not accept_waiting(port)
    await port.stopListening()
    assert not accept_waiting(port)


def test_a_port_that_cannot_be_listened_on_is_kept_as_the_endpoints_failure():
    """
    If the port is taken, then the endpoint's ``failure`` says why (the service then makes twistd exit: see
    ``tests/test_e2e_single.py``), and it has no port.
    """
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        listening = ListeningEndpoint(serverFromString(reactor, "tcp:%d:interface=127.0.0.1"
                                                       % (holder.getsockname()[1],)))
        failed = []
        listening.listen(Factory.forProtocol(_Answer)).addErrback(failed.append)
    finally:
        holder.close()
    assert failed and listening.failure is failed[0] and listening.port is None
    assert "Address already in use" in listening.failure.getErrorMessage()
