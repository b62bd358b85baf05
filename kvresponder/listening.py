"""
The client port, closed without resetting the connections that reached it last.

When a listening socket is closed, the kernel resets every connection still waiting in its backlog: the handshake
completed, the client may have sent its request, and it reads ECONNRESET without knowing whether the request was
served. A stopping node meets them at the end of its drain, from the proxies that have not yet seen its endpoint
leave. It accepts them first (:func:`accept_waiting`), so that they are served and answered as any other
connection is before the process exits; only one that arrives after that can still meet the reset.
"""

import select
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

#: Accepts made at most when the node takes in the waiting connections: a bound, not a figure ever reached (each
#: accept takes in up to a few hundred).
MAX_ACCEPT_ROUNDS = 64


@implementer(IStreamServerEndpoint)
class ListeningEndpoint:
    """
    An endpoint that keeps the port it listens on (``port``, ``None`` until it listens), or why it could not
    (``failure``, a :class:`~twisted.python.failure.Failure`, ``None`` unless listening failed).
    """

    def __init__(self, endpoint) -> None:
        self._endpoint = endpoint
        self.port = None
        self.failure = None

    def listen(self, factory) -> Deferred:
        return self._endpoint.listen(factory).addCallbacks(self._listening, self._failed)

    def _listening(self, port):
        self.port = port
        return port

    def _failed(self, failure):
        self.failure = failure
        return failure


def accept_waiting(port: Optional[object]) -> bool:
    """
    Accept the connections waiting on ``port`` (a listening port, as ``IListeningPort`` and ``IReadDescriptor``:
    Twisted's TCP and UNIX ports), as the reactor would when the socket is next readable. Whether there were any.
    """
    if port is None or not getattr(port, "connected", False):
        return False
    poller = select.poll()
    poller.register(port.fileno(), select.POLLIN)
    accepted = False
    for _ in range(MAX_ACCEPT_ROUNDS):
        if not poller.poll(0):
            break
        port.doRead()
        accepted = True
    return accepted
