"""
What the kv routes answer, apart from how the answer travels.

``GET``, ``PUT`` and ``DELETE`` of ``/<tenant>/kv/<key>`` are decided here, once: each operation takes the key
(and a write its body) and gives an :class:`Answer`, at once or as a Deferred. Two front ends carry them:
:class:`~kvresponder.http.api.KVResource` inside Twisted's ``Request``, and
:mod:`~kvresponder.http.fastlane`, which parses and answers simple requests on the connection itself. Both
therefore give every client the same status, body and headers.
"""

from typing import Callable, NamedTuple, Optional, Tuple, Union

from eliot import write_traceback
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from ..batcher import Waiter
from ..coordinator import REMOTE, ClockSkewed, Unavailable
from ..store import EntryTooLarge
from .errors import APIError, error_body, not_found, too_large, unavailable
from .site import json_bytes

JSON = b"application/json"
#: A read of an absent key answers this, built once (a miss is as common as a hit in a cache).
MISS_BODY = error_body("not_found", "No value is stored under this key.")
#: What a client sees of a failure nobody expected (its traceback goes to the log only).
INTERNAL_ERROR_BODY = error_body("internal_error", "The server failed to handle this request.")


class Answer(NamedTuple):
    """
    A JSON response: its status, its body, and any headers beyond Content-Type and Content-Length.
    """
    status: int
    body: bytes
    headers: Tuple[Tuple[bytes, bytes], ...] = ()


def error_answer(error: APIError) -> Answer:
    return Answer(error.status, error_body(error.code, error.message), tuple(error.headers.items()))


def expected_error(failure) -> Optional[APIError]:
    """
    The client-facing error for a failure a kv operation can meet, or ``None`` for anything else.
    """
    if failure.check(APIError):
        return failure.value
    if failure.check(Unavailable):
        return unavailable(str(failure.value) or "Too few replicas are reachable.")
    if failure.check(ClockSkewed):
        return APIError(503, "clock_skew", str(failure.value))
    if failure.check(EntryTooLarge):
        return too_large("The entry is larger than the whole memory budget.")
    return None


def failure_answer(failure) -> Answer:
    """
    The answer to a failed operation: its error, or a bare 500 after logging the traceback.
    """
    error = expected_error(failure)
    if error is None:
        write_traceback(exc_info=(failure.type, failure.value, failure.tb))
        return Answer(500, INTERNAL_ERROR_BODY)
    return error_answer(error)


def json_key(key: str) -> bytes:
    # Most keys are printable ASCII without a quote or backslash: those need no escaping.
    if key.isascii() and key.isprintable() and '"' not in key and "\\" not in key:
        return b'"' + key.encode("ascii") + b'"'
    return json_bytes(key)


def entry_json(entry) -> bytes:
    """
    A stored entry as the response body. The value is spliced in as stored: never parsed again.
    """
    expires = b"null" if entry.expires_at is None else json_bytes(round(entry.expires_at, 3))
    return b"".join([b'{"key":', json_key(entry.key), b',"value":', entry.value, b',"version":',
                     _version_json(entry.version), b',"expires_at":', expires, b"}"])


def written_json(entry) -> bytes:
    """
    The body of an answered write: the key, its new version and when it expires.
    """
    expires = b"null" if entry.expires_at is None else json_bytes(round(entry.expires_at, 3))
    return b"".join([b'{"key":', json_key(entry.key), b',"version":', _version_json(entry.version),
                     b',"expires_at":', expires, b"}"])


def _version_json(version) -> bytes:
    # As format_version, quoted, without the JSON encoder: a node id is letters, digits, "-", "_" and "."
    # (hlc.NODE_ID_PATTERN: a peer's entry or version with any other is refused), which need no escaping.
    wall, counter, node = version
    return b'"%d.%d.%s"' % (wall, counter, node.encode("ascii"))


class KVOperations:
    """
    The kv operations of one node. Each raises :class:`~kvresponder.http.errors.APIError` for a request it
    refuses before doing anything, and otherwise returns an :class:`Answer` or a Deferred firing with one
    (never failing: failures become answers through :func:`failure_answer`).

    :param node: the :class:`~kvresponder.node.Node`.
    :param parse_key: turns a percent-decoded path below ``kv/`` and the key length limit into a key, or
        raises ``APIError``.
    :param parse_write: turns a PUT's body and Content-Type into ``(value, ttl)``, or raises ``APIError``.
    """

    def __init__(self, node, parse_key, parse_write) -> None:
        self._node = node
        self._coordinator = node.coordinator
        self._metrics = node.metrics
        self._parse_key = parse_key
        self._parse_write = parse_write
        self._key_limit = node.settings.max_key_length
        self._max_value = node.settings.max_value_size

    def key(self, raw: bytes) -> str:
        """
        The key a request names by ``raw``, its percent-decoded path below ``/<tenant>/kv/``.
        """
        return self._parse_key(raw, self._key_limit)

    def is_local_only(self) -> bool:
        """
        Whether this node is alone in its ring: its writes involve no other node.
        """
        return self._coordinator.is_local_only()

    def get(self, key: str) -> Union[Answer, Deferred]:
        if not self._node.serving():
            raise unavailable("This node is stopping; send the request to another node.")
        try:
            entry = self._coordinator.get_nowait(key)
        except ClockSkewed as error:
            raise APIError(503, "clock_skew", str(error))
        except Unavailable as error:
            raise unavailable(str(error))
        if entry is not REMOTE:
            return self._read(entry)
        return self._coordinator.get(key).addCallbacks(self._read, failure_answer)

    def _read(self, entry) -> Answer:
        if entry is None:
            self._metrics.cache("get", "miss")
            return Answer(404, MISS_BODY)
        self._metrics.cache("get", "hit")
        return Answer(200, entry_json(entry))

    def put(self, key: str, body: bytes, content_type: Optional[bytes]) -> Union[Answer, Deferred]:
        answered: Deferred = Deferred()
        answer = self.put_to(key, body, content_type, answered.callback)
        return answered if answer is None else answer

    def put_to(self, key: str, body: bytes, content_type: Optional[bytes],
               reply: Callable[[Answer], None]) -> Optional[Answer]:
        """
        :meth:`put`, for a caller that takes an answer that comes later through ``reply`` rather than a
        Deferred: the :class:`Answer` now, or ``None``, and ``reply`` is called once with it (possibly before
        this returns). The fast lane's PUT, which a Deferred and its callbacks made visibly dearer.
        """
        value, ttl = self._parse_write(body, content_type)
        if len(value) > self._max_value:
            # The body was within the limit, but the value as stored is not (JSON written again: 1E15 becomes
            # 1000000000000000.0). Refused as a bulk write's is: peers take copies up to that size.
            raise too_large("The value, as stored, is larger than MAX_VALUE_SIZE (%d bytes)." % (self._max_value,))
        try:
            self._coordinator.store.check_fits(key, value, ttl)
        except EntryTooLarge:
            raise too_large("The entry is larger than the whole memory budget (MAX_MEMORY).")
        try:
            result = self._coordinator.put_to(key, value, ttl, _WriteReply(self._written, reply))
        except Exception:
            return failure_answer(Failure())
        return None if result is None else self._written(result)

    def _written(self, result) -> Answer:
        created = result.created
        self._metrics.cache("put", "created" if created else "replaced")
        return Answer(201 if created else 200, written_json(result.entry))

    def delete(self, key: str) -> Deferred:
        def deleted(result):
            if not result.existed:
                self._metrics.cache("delete", "miss")
                return error_answer(not_found("No value is stored under this key."))
            self._metrics.cache("delete", "deleted")
            return Answer(200, json_bytes({"key": key, "deleted": True}))

        return self._coordinator.delete(key).addCallbacks(deleted, failure_answer)


@implementer(Waiter)
class _WriteReply:
    """
    A replicated write's waiter that turns its outcome into the client's :class:`Answer` and hands it on.
    """

    __slots__ = ("_written", "_reply", "called")

    def __init__(self, written: Callable[[object], Answer], reply: Callable[[Answer], None]) -> None:
        self._written = written
        self._reply = reply
        self.called = False

    def callback(self, result) -> None:
        if self.called:
            return
        self.called = True
        try:
            answer = self._written(result)
        except Exception:
            answer = failure_answer(Failure())
        self._reply(answer)

    def errback(self, error) -> None:
        if self.called:
            return
        self.called = True
        self._reply(failure_answer(error if isinstance(error, Failure) else Failure(error)))
