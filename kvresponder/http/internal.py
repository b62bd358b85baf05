"""
The peer-to-peer routes under ``/<tenant>/_internal/``. Not part of the public API.

Each route lets in only whom the :class:`~kvresponder.http.peerguard.PeerGuard` lets in (403 without a
cluster secret and without ``--insecure-cluster``; 401 for a bad signature), checks its body against its
declared schema (:mod:`~kvresponder.http.schemas`; 400 for a body that does not fit), continues the caller's
Eliot task (``X-Eliot-Task-Id``, so a replica's store actions appear in the coordinator's tree), and maps
every failure, raised at once or later by a Deferred or a coroutine, to one JSON error.

A node that has begun leaving (:meth:`~kvresponder.node.Node.takes_copies`) answers ``/apply`` 503 ``leaving``
and stores nothing, so that the sender fails the copies over to the next node; its reads still answer.
"""

import json

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from ..copystream import LEAVING_ERROR, LEAVING_MESSAGE
from ..hlc import version_from_wire
from ..log.replication import PEER_SERVED
from ..batcher import MAX_BATCH_BYTES
from ..privateapi import continue_typed_task
from ..peers import CLOCK_HEADER, TASK_HEADER, TASKS_HEADER
from ..store import EntryTooLarge
from ..wire import BATCH_TYPE, OMITTED, decode_batch, entries_from_wire, entry_to_wire
from .api import failure_body, render_value, handle_routing_errors
from .errors import APIError, bad_request, write_error
from .peerguard import PeerGuard
from .schemas import check_body, check_entries


def internal_route(app: Klein, path: str):
    """
    A POST route taking and returning JSON, guarded, schema-checked and continuing the caller's task.
    """
    def decorator(function):
        route = "/_internal" + path  # as the metrics and the spans name it

        def handler(self, request):
            request.name_route(route)
            # Our clock, for the caller's estimate of its offset from ours (kvresponder.clockskew).
            request.setHeader(CLOCK_HEADER, b"%.6f" % (self._node.wall(),))
            try:
                raw = request.content.read()
                self._guard.check(request, raw)
                now = self._node.wall()
                # Expiries arrive as the time they have left, added to this node's clock. A captured call sent
                # again later (within the signature's window) would so store its entries again with a fresh TTL,
                # bringing back one that has expired: they are read as of when the call was signed, give or take
                # the clocks' allowed difference, and with this node's measured lead over its peers taken off its
                # clock (a node stepped ahead took every copy for a late one and cut its TTL by the step: a short
                # one became a tombstone). Only a lead: the estimate trails a step by a few heartbeats, and a node
                # behind that has just been set right would take its old lag for lateness.
                slack = 2 * self._node.settings.max_clock_offset
                late = self._guard.late_by(request, now - max(0.0, self._node.clock_offsets.skew), slack)
                body = _parse(request, path, raw, now - late)
            except APIError as error:
                return write_error(request, error)
            task_id = request.getHeader(TASK_HEADER)
            action = None
            if task_id:
                try:
                    action = continue_typed_task(PEER_SERVED, task_id, route=route)
                except Exception:
                    action = None
            if action is not None:
                request.adopt_action(action)
                with action.context():
                    result = self._run(request, function, body)
            else:
                result = self._run(request, function, body)
            return result
        handler.__name__ = function.__name__
        return app.route(path, methods=["POST"])(handler)
    return decorator


def _parse(request, path: str, raw: bytes, now: float) -> dict:
    """
    The body of a request to ``path``, checked against its schema; ``/apply``'s entries as entries (their
    expiries on this node's clock, ``now``).

    :raises APIError: 400 for a body that does not fit, 415 for a batch sent to another route.
    """
    if request.getHeader(b"content-type") == BATCH_TYPE:
        if path != "/apply":
            raise APIError(415, "unsupported_media_type", "Only /_internal/apply takes a binary batch.")
        try:
            entries = check_entries(decode_batch(raw, now))
        except ValueError as error:
            raise bad_request("invalid_body", "Malformed batch: %s." % (error,))
        return {"entries": entries, "task_ids": (request.getHeader(TASKS_HEADER) or b"").split()}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request("invalid_json", "The body is not valid JSON.")
    try:
        check_body(path, body)
        if path == "/apply":
            return {"entries": entries_from_wire(body["entries"], now), "task_ids": []}
    except ValueError as error:
        raise bad_request("invalid_body", "Malformed internal request: %s." % (error,))
    return body


def _failure_answer(request, failure: Failure):
    """
    The one mapping of an internal route's failures, whether raised at once or by a Deferred or coroutine: a
    value the schema let through but the handler could not use is the caller's error (400), never a 500.
    """
    if failure.check(ValueError, TypeError, KeyError):
        message = "Malformed internal request: %s" % (str(failure.value)[:200],)
        return write_error(request, bad_request("invalid_body", message))
    return failure_body(request, failure)


class InternalAPI:
    """
    :param node: the :class:`~kvresponder.node.Node` served.
    :param guard: the :class:`~kvresponder.http.peerguard.PeerGuard` that says who may call.
    """

    app = Klein()

    def __init__(self, node, guard: PeerGuard) -> None:
        self._node = node
        self._guard = guard

    def resource(self):
        return self.app.resource()

    def _run(self, request, function, body):
        try:
            result = function(self, body)
        except Exception:
            return _failure_answer(request, Failure())
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            # Klein waits for the Deferred (NOT_DONE_YET would make it answer at once).
            d = result if isinstance(result, Deferred) else ensureDeferred(result)
            d.addCallback(lambda value: render_value(request, value))
            d.addErrback(lambda failure: _failure_answer(request, failure))
            return d
        return render_value(request, result)

    @internal_route(app, "/apply")
    def apply(self, body):
        if not self._node.takes_copies():
            # A write's copy, a hand-off or a repair sent by a peer that has not heard this node is leaving: the
            # sender fails it over to the next node (an answer, so the peer is not taken for unreachable).
            raise APIError(503, LEAVING_ERROR, LEAVING_MESSAGE)
        try:
            results = self._node.coordinator.apply_copies(body["entries"], body["task_ids"])
        except EntryTooLarge:
            raise APIError(413, "payload_too_large", "An entry exceeds this node's memory budget.")
        return {"results": [[result.applied, result.had_live] if result.newer is None else
                            [result.applied, result.had_live, list(result.newer)] for result in results]}

    @internal_route(app, "/get")
    def get(self, body):
        store = self._node.store
        if "keys" in body:
            # For a caller that asks for it (``partial``: one that asks again for what is left out; an older
            # node does not), up to about MAX_BATCH_BYTES of entries (the first found always goes): 256 keys of
            # 1 MiB values would otherwise make one answer of 256 MiB, built here and read there at once. The keys
            # left out answer ``false`` (OMITTED).
            now = self._node.wall()
            answers = []
            capped, taken = bool(body.get("partial")), 0
            for key in body["keys"]:
                entry = store.current(key)
                if entry is None:
                    answers.append(None)
                elif not capped or not taken or taken + entry.size <= MAX_BATCH_BYTES:
                    taken += entry.size
                    answers.append(entry_to_wire(entry, now))
                else:
                    answers.append(OMITTED)
            return {"entries": answers}
        entry = store.current(body["key"])
        return {"entry": None if entry is None else entry_to_wire(entry, self._node.wall())}

    @internal_route(app, "/keys")
    def keys(self, body):
        return {"keys": self._node.store.keys(body.get("prefix", ""), body.get("after"), body.get("limit", 1000))}

    @internal_route(app, "/sync/buckets")
    def sync_buckets(self, body):
        if not self._node.takes_copies():
            # A leaving node wants nothing a peer could send it (it would refuse the copies), and its store is
            # on its way out: no walk over it, and no anti-entropy round of the peer's counted as failed.
            return {"differ": []}
        sender, theirs, background = body["from"], body["buckets"], body.get("background", False)

        async def compare():
            ours = await self._node.rebalancer.shared_digest(sender, background)
            return {"differ": sorted(int(bucket) for bucket, value in theirs.items()
                                     if ours.get(int(bucket)) != value)}
        return compare()

    @internal_route(app, "/sync/versions")
    def sync_versions(self, body):
        if not self._node.takes_copies():
            return {"want": [], "lacking": []}
        parsed = {key: version_from_wire(value) for key, value in body["versions"].items()}
        want, lacking = self._node.rebalancer.wanted(parsed)
        return {"want": want, "lacking": lacking}

    @internal_route(app, "/sync/request")
    def sync_request(self, body):
        return self._node.rebalancer.share_for(body["from"])


handle_routing_errors(InternalAPI.app)
