"""
``GET /<tenant>/_internal/copies``: a peer upgrades its connection to a copy stream
(:mod:`kvresponder.copystream`).

The upgrade is guarded as every internal call is (:class:`~kvresponder.http.peerguard.PeerGuard`: the signature
covers the method and the path), takes no body, and each batch on the stream is checked as a batch sent to
``/_internal/apply`` is (:func:`~kvresponder.http.schemas.check_entries`). The answer is ``101 Switching
Protocols`` and, from then on, the connection carries frames, not HTTP. A node that has begun leaving still
upgrades (a peer that has not heard it is leaving opens streams to it), and answers each batch 503 ``leaving``
without storing it, as ``/_internal/apply`` does. A request
that is not an upgrade gets a JSON 426; a connection that cannot be handed over (anything but a plain TCP
connection, such as a test's in-memory transport) gets a JSON 501, and the caller sends its copies as HTTP
requests instead. The stream is closed once no whole frame has arrived for ``REQUEST_TIMEOUT`` seconds, as an
idle HTTP connection would be; the caller opens another with its next write.
"""

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..copystream import UPGRADE_TOKEN, CopyStreamServer, new_nonce, upgrade_answer
from ..log.replication import STREAM_ACCEPTED
from .errors import APIError, bad_request, write_error
from .peerguard import PeerGuard
from .schemas import check_entries


class CopyStreamResource(Resource):
    """
    :param node: the :class:`~kvresponder.node.Node` whose coordinator applies the copies.
    :param guard: the :class:`~kvresponder.http.peerguard.PeerGuard` that says who may open a stream.
    :param clock: ``IReactorTime``, for the streams' idle timeout.
    :param int max_frame: the largest frame a stream takes (:func:`~kvresponder.copystream.max_frame`).
    :param float idle_timeout: seconds a stream may go without a whole frame (REQUEST_TIMEOUT).
    """

    isLeaf = True

    def __init__(self, node, guard: PeerGuard, clock, max_frame: int, idle_timeout: float) -> None:
        Resource.__init__(self)
        self._node = node
        self._clock = clock
        self._max_frame = max_frame
        self._idle_timeout = idle_timeout
        #: Copy streams peers have open to this node now.
        self.open = 0
        node.metrics.register_gauge("kv_copy_streams_incoming", lambda: self.open)
        self._guard = guard

    def render(self, request):
        request.name_route("/_internal/copies")
        try:
            self._check(request)
        except APIError as error:
            return write_error(request, error)
        client = request.getClientAddress()
        address = "%s:%s" % (getattr(client, "host", "?"), getattr(client, "port", "?"))
        nonce = new_nonce()
        node, channel = self._node, request.channel
        apply_copies = node.coordinator.apply_copies
        current = node.store.current
        authenticator = self._guard.authenticator

        def closed(reason) -> None:
            self.open -= 1
            channel.connectionLost(reason)

        protocol = CopyStreamServer(
            lambda entries, task_ids: apply_copies(check_entries(entries), task_ids),
            authenticator.stream_key() if authenticator is not None else None,
            nonce, self._max_frame, closed, address, self._clock, self._idle_timeout, wall=node.wall,
            takes_copies=node.takes_copies,
            read=lambda keys: [current(key) for key in keys])
        self.open += 1
        if not request.switch_protocols(protocol, upgrade_answer(nonce, reads=True)):
            self.open -= 1
            return write_error(request, APIError(
                501, "not_implemented", "This connection cannot carry a copy stream; send copies as requests."))
        STREAM_ACCEPTED.log(address=address)
        return NOT_DONE_YET

    def _check(self, request) -> None:
        if request.method != b"GET":
            raise APIError(405, "method_not_allowed", "Open a copy stream with GET.", {b"Allow": b"GET"})
        body = request.content.read()
        if body:
            self._guard.check(request, body)
            raise bad_request("invalid_body", "The upgrade to a copy stream takes no body.")
        # Once: a captured upgrade sent again must not open a stream that holds frames up to its limit.
        self._guard.check_once(request)
        if (request.getHeader(b"upgrade") or b"").lower() != UPGRADE_TOKEN:
            raise APIError(426, "upgrade_required", "Upgrade to %s to open a copy stream." % (
                UPGRADE_TOKEN.decode("ascii"),), {b"Upgrade": UPGRADE_TOKEN, b"Connection": b"Upgrade"})
