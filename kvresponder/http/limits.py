"""
The body limits: the names of those a route can have, and the budget of bodies held at once. The resource tree
says which limit a request gets (:meth:`~kvresponder.http.root.RootResource.body_limit_for`); the site holds their
sizes (:class:`~kvresponder.http.site.KVSite`), from MAX_VALUE_SIZE, and its :class:`BodyBudget`.
"""

#: A value: MAX_VALUE_SIZE. Every route that names no other limit.
VALUE = "value"
#: ``/bulk``: 8 × MAX_VALUE_SIZE.
BULK = "bulk"
#: ``/_internal/*``, peers' batches: max(64 MiB, 4 × MAX_VALUE_SIZE).
INTERNAL = "internal"

#: Bodies up to this size are read without a reservation from the :class:`BodyBudget`: MAX_CONNECTIONS of them are
#: bounded already (64 MiB at the default 1024), and the kv fast lane takes none larger.
SMALL_BODY = 64 * 1024


#: The smallest INTERNAL limit, whatever MAX_VALUE_SIZE: a peer's batch of many small entries.
INTERNAL_FLOOR = 64 * 1024 * 1024


def internal_body_limit(value_limit: int, floor: int = INTERNAL_FLOOR) -> int:
    """
    INTERNAL's size for values of up to ``value_limit`` bytes: ``floor``, or four values if larger. The site's
    limit for ``/_internal/*`` bodies and the copy streams' frames both follow it.
    """
    return max(floor, 4 * value_limit)


def default_body_buffer(bulk_body_limit: int) -> int:
    """
    MAX_BODY_BUFFER's default: the larger of 64 MiB and two /bulk bodies (``bulk_body_limit`` each).
    """
    return max(64 * 1024 * 1024, 2 * bulk_body_limit)


class BodyBudget:
    """
    The bytes of request bodies a node holds at once, over all its connections (MAX_BODY_BUFFER). Each body is
    within its route's limit, but every connection may send one: 1024 connections of 8 MiB /bulk bodies would pass
    any pod's memory limit. A body larger than :data:`SMALL_BODY` reserves its declared size (a chunked one its
    route's limit) before it is read, and gives it back once its request is answered or its connection lost; one
    that does not fit is refused unread. A client that declares bodies and sends them slowly holds their room
    for up to REQUEST_TIMEOUT, as one that opens connections holds MAX_CONNECTIONS.

    :param metrics: a :class:`~kvresponder.metrics.Metrics`, or ``None``: exports ``kv_request_body_bytes`` and
        the budget, ``kv_request_body_max_bytes``.
    """

    def __init__(self, limit: int, metrics=None) -> None:
        self.limit = limit
        #: Bytes reserved now.
        self.held = 0
        if metrics is not None:
            metrics.register_gauge("kv_request_body_bytes", lambda: self.held)
            metrics.register_gauge("kv_request_body_max_bytes", lambda: self.limit)

    def reserve(self, size: int) -> bool:
        """
        Reserve ``size`` bytes if they fit.

        :return: whether they did; if not, nothing is reserved.
        """
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size
