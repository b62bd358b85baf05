"""
The peer-to-peer routes under ``/<tenant>/_internal/``. Not part of the public API.

Each route continues the caller's Eliot task (``X-Eliot-Task-Id``), so a replica's store actions appear in
the coordinator's tree, and, with a cluster secret, refuses any request not signed with it (401).
"""

import json

from eliot import Action
from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred

from ..hlc import version_from_wire
from ..peers import AUTH_HEADER, CLOCK_HEADER, TASK_HEADER, TASKS_HEADER
from ..store import EntryTooLarge
from ..wire import BATCH_TYPE, decode_batch, entries_from_wire, entry_to_wire
from .api import failure_body, render_value, handle_routing_errors
from .errors import APIError, bad_request, write_error

MAX_SYNC_KEYS = 50000


def internal_route(app: Klein, path: str):
    """
    A POST route taking and returning JSON, authenticated and continuing the caller's task.
    """
    def decorator(function):
        def handler(self, request):
            request.route = "/_internal" + path
            # Our clock, for the caller's estimate of its offset from ours (kvresponder.clockskew).
            request.setHeader(CLOCK_HEADER, b"%.6f" % (self._node.wall(),))
            try:
                self._authorize(request)
                body = _parse(request)
            except APIError as error:
                return write_error(request, error)
            task_id = request.getHeader(TASK_HEADER)
            action = None
            if task_id:
                try:
                    action = Action.continue_task(task_id=task_id)
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


def _parse(request):
    if request.getHeader(b"content-type") == BATCH_TYPE:
        return {"batch": request.content.read(), "task_ids": request.getHeader(TASKS_HEADER)}
    try:
        body = json.loads(request.content.read())
    except (ValueError, RecursionError):
        raise bad_request("invalid_json", "The body is not valid JSON.")
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "The body must be a JSON object.")
    return body


class InternalAPI:
    """
    :param node: the :class:`~kvresponder.node.Node` served.
    :param authenticator: a :class:`~kvresponder.peers.PeerAuthenticator`, or ``None`` without a secret.
    """

    app = Klein()

    def __init__(self, node, authenticator=None) -> None:
        self._node = node
        self._auth = authenticator

    def resource(self):
        return self.app.resource()

    def _authorize(self, request) -> None:
        if self._auth is None:
            return
        body = request.content.read()
        request.content.seek(0)
        if not self._auth.verify(request.getHeader(AUTH_HEADER), request.method, request.path, body):
            raise APIError(401, "unauthorized", "Internal routes need a valid cluster signature.")

    def _run(self, request, function, body):
        try:
            result = function(self, body)
        except APIError as error:
            return write_error(request, error)
        except (ValueError, TypeError, KeyError) as error:
            return write_error(request, bad_request("invalid_body", "Malformed internal request: %s" % (error,)))
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            # Klein waits for the Deferred (NOT_DONE_YET would make it answer at once).
            d = result if isinstance(result, Deferred) else ensureDeferred(result)
            d.addCallback(lambda value: render_value(request, value))
            d.addErrback(lambda failure: failure_body(request, failure))
            return d
        return render_value(request, result)

    @internal_route(app, "/apply")
    def apply(self, body):
        now = self._node.wall()
        if "batch" in body:
            entries = decode_batch(body["batch"], now)
        else:
            entries = entries_from_wire(body.get("entries"), now)
        task_ids = (body.get("task_ids") or b"").split()
        try:
            results = self._node.coordinator.apply_copies(entries, task_ids)
        except EntryTooLarge:
            raise APIError(413, "payload_too_large", "An entry exceeds this node's memory budget.")
        return {"results": [[result.applied, result.had_live] if result.newer is None else
                            [result.applied, result.had_live, list(result.newer)] for result in results]}

    @internal_route(app, "/get")
    def get(self, body):
        store = self._node.store
        if "keys" in body:
            keys = body["keys"]
            if not isinstance(keys, list) or len(keys) > MAX_SYNC_KEYS or \
                    not all(isinstance(key, str) for key in keys):
                raise bad_request("invalid_key", "keys must be a list of strings")
            entries = [store.current(key) for key in keys]
            now = self._node.wall()
            return {"entries": [None if entry is None else entry_to_wire(entry, now) for entry in entries]}
        key = body.get("key")
        if not isinstance(key, str):
            raise bad_request("invalid_key", "key must be a string")
        entry = store.current(key)
        return {"entry": None if entry is None else entry_to_wire(entry, self._node.wall())}

    @internal_route(app, "/keys")
    def keys(self, body):
        prefix, after, limit = body.get("prefix", ""), body.get("after"), body.get("limit", 1000)
        if not isinstance(prefix, str) or not (after is None or isinstance(after, str)) \
                or type(limit) is not int or not 0 < limit <= 10001:
            raise bad_request("invalid_body", "prefix, after and limit are malformed")
        return {"keys": self._node.store.keys(prefix, after, limit)}

    @internal_route(app, "/sync/buckets")
    def sync_buckets(self, body):
        sender, theirs = body.get("from"), body.get("buckets")
        if not isinstance(sender, str) or not isinstance(theirs, dict):
            raise bad_request("invalid_body", "from and buckets are required")

        async def compare():
            ours = await self._node.rebalancer.shared_digest(sender)
            return {"differ": sorted(int(bucket) for bucket, value in theirs.items()
                                     if ours.get(int(bucket)) != value)}
        return compare()

    @internal_route(app, "/sync/versions")
    def sync_versions(self, body):
        versions = body.get("versions")
        if not isinstance(versions, dict) or len(versions) > MAX_SYNC_KEYS:
            raise bad_request("invalid_body", "versions must map at most %d keys" % (MAX_SYNC_KEYS,))
        parsed = {key: version_from_wire(value) for key, value in versions.items()}
        return {"want": self._node.rebalancer.wanted(parsed)}

    @internal_route(app, "/sync/request")
    def sync_request(self, body):
        sender = body.get("from")
        if not isinstance(sender, str):
            raise bad_request("invalid_body", "from is required")
        return self._node.rebalancer.share_for(sender[:80])


handle_routing_errors(InternalAPI.app)
