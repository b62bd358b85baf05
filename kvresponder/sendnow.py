"""
Writing to a TCP connection with one ``send``, instead of at the reactor's next turn.

Twisted's TCP transport buffers every write and waits for the reactor to report the socket writable
(https://github.com/twisted/twisted/issues/5303). For a small message that costs two ``epoll_ctl`` calls and
another pass of the reactor loop before it leaves. :func:`send_now` sends it with one ``send`` where that is
safe, and leaves everything else to the transport.
"""

from .privateapi import PLAIN_TCP, tcp_write_is_queued


def send_now(transport, data: bytes) -> None:
    """
    Write ``data`` to ``transport``: with one ``send`` now when it is a plain TCP connection with nothing queued,
    and through its own ``write`` otherwise, and for whatever the socket does not take. Either way the bytes
    leave in the order written, and a connection that is closing, aborted or shut for writing gets them only as
    its own ``write`` would (an aborted one drops them, as Twisted does).
    """
    if (type(transport) not in PLAIN_TCP or transport.TLS or not transport.connected
            or tcp_write_is_queued(transport)):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Let the transport meet the error on its own write, and close as it always does.
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


def no_delay(transport) -> None:
    """
    Turn off Nagle's algorithm on ``transport``, where it can be (TCP; anything else is left as it is). For a
    connection whose small messages each leave with :func:`send_now`: with Nagle on, a message sent while the
    last is still unacknowledged waits for that acknowledgement, which the peer may delay by 40 ms.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:
        return
    try:
        set_no_delay(True)
    except OSError:
        pass
