"""
The resource tree: ``/<tenant>/`` and nothing else.

::

    /                       404, naming the tenant served
    /<other tenant>/...     404, naming the tenant served
    /<tenant>/kv[/<key>]    KVResource (a lean leaf: the hot path)
    /<tenant>/_internal/copies  CopyStreamResource (a peer's copy stream: an HTTP upgrade)
    /<tenant>/_internal/... InternalAPI (Klein; peers only)
    /<tenant>/...           PublicAPI (Klein)

The tree also says which body limit each request gets (:meth:`RootResource.body_limit_for`): the limit of
the resource the path routes to, found by the same walk over the same decoded segments, before the body
is read.
"""

from typing import Optional

from twisted.web.resource import Resource

from .api import KVResource, PublicAPI
from ..copystream import max_frame
from .limits import INTERNAL, VALUE, internal_body_limit
from .copies import CopyStreamResource
from .errors import NO_ROUTE_MESSAGE, bad_request, not_found, write_error
from .internal import InternalAPI
from .peerguard import UNSIGNED, PeerGuard


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, message: str) -> None:
        Resource.__init__(self)
        self._message = message

    def render(self, request):
        return write_error(request, not_found(self._message))


_NO_ROUTE = _NotFound(NO_ROUTE_MESSAGE)


class _BadPath(Resource):
    isLeaf = True

    def render(self, request):
        return write_error(request, bad_request("invalid_path", "The path is not valid UTF-8."))


def _not_utf8(path: bytes, postpath) -> bool:
    """
    Whether a path segment, or one of those after it, is not UTF-8 once percent-decoded.
    """
    try:
        path.decode("utf-8")
        for segment in postpath:
            segment.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _encoded_slash(path: bytes, postpath) -> bool:
    """
    Whether a segment (decoded: ``%2F`` is a slash in it) holds a slash.
    """
    return b"/" in path or any(b"/" in segment for segment in postpath)


class TenantResource(Resource):
    """
    Everything under ``/<tenant>/``.
    """

    def __init__(self, kv: Resource, public: Resource, internal: Resource, copies: Resource,
                 public_limit=None, internal_limit: str = INTERNAL) -> None:
        Resource.__init__(self)
        self.kv = self._kv = kv
        self._public = public
        self._internal = internal
        self._copies = copies
        self._public_limit = public_limit
        self._internal_limit = internal_limit

    def getChildWithDefault(self, path: bytes, request):
        if path == b"kv":
            return self._kv
        if _not_utf8(path, request.postpath):
            return _BadPath()
        if (not path and request.postpath) or _encoded_slash(path, request.postpath):
            # An empty segment (``/<tenant>//bulk``), or a slash sent encoded (``/<tenant>/health%2Fready``),
            # names no route: Klein, given the segments joined again, would have served some such paths (bulk,
            # health) and not others (kv). Only a key, under kv, may hold an encoded slash.
            return _NO_ROUTE
        if path == b"_internal":
            if request.postpath == [b"copies"]:
                return self._copies
            return self._internal
        # Klein routes on the path below the tenant: give it this segment back.
        request.prepath.pop()
        request.postpath.insert(0, path)
        return self._public

    def body_limit_for(self, segments, method: bytes) -> str:
        """
        The body limit (:mod:`~kvresponder.http.limits`) of the resource that the decoded ``segments``
        below the tenant route to, as :meth:`getChildWithDefault` routes them.
        """
        if not segments:
            return VALUE
        path = segments[0]
        if path == b"kv":
            return VALUE
        try:
            for segment in segments:
                segment.decode("utf-8")
        except UnicodeDecodeError:
            return VALUE
        if (not path and len(segments) > 1) or _encoded_slash(path, segments[1:]):
            return VALUE
        if path == b"_internal":
            return self._internal_limit
        if self._public_limit is None:
            return VALUE
        return self._public_limit(segments, method)

    def render(self, request):
        return write_error(request, not_found(NO_ROUTE_MESSAGE))


class RootResource(Resource):
    """
    Serves one tenant; any other prefix gets a 404 that names the tenant this node serves.

    :param guard: the :class:`~kvresponder.http.peerguard.PeerGuard` of the internal routes, or ``None``.
    """

    def __init__(self, tenant: str, tenant_resource: Resource, guard: Optional[PeerGuard] = None,
                 probes=None) -> None:
        Resource.__init__(self)
        self._tenant = tenant.encode("ascii")
        self._tenant_resource = tenant_resource
        self._guard = guard
        #: The probes' routes below the tenant, and their answers (``PublicAPI.probes``).
        self._probes = dict(probes or {})
        self._elsewhere = _NotFound("This node serves tenant %r only; use /%s/." % (tenant, tenant))

    def getChildWithDefault(self, path: bytes, request):
        if path == self._tenant:
            return self._tenant_resource
        if _not_utf8(path, request.postpath):
            # Any path that is not UTF-8 is a 400, whichever tenant it names.
            return _BadPath()
        return self._elsewhere

    def body_limit_for(self, segments, method: bytes) -> str:
        """
        The body limit (:mod:`~kvresponder.http.limits`) of the resource that a request for the decoded path
        ``segments`` (the path without its query string, split at ``/`` and each part percent-decoded, as
        :class:`~kvresponder.http.site.KVRequest` gives them to traversal) and ``method`` routes to.
        """
        if segments and segments[0] == self._tenant:
            return self._tenant_resource.body_limit_for(segments[1:], method)
        return VALUE

    def length_signature(self, headers, method: bytes, path: bytes, length) -> str:
        """
        Who the head of a request for an internal route shows its body comes from
        (:meth:`~kvresponder.http.peerguard.PeerGuard.length_signature`): only a peer's, or anyone's with
        --insecure-cluster, gets the internal body limit, and only a peer's is left out of the body budget.
        """
        if self._guard is None:
            return UNSIGNED
        return self._guard.length_signature(headers, method, path, length)

    def shortcuts(self):
        """
        Path prefixes whose requests all end at one leaf, for :class:`~kvresponder.http.site.KVSite` to
        serve without walking the tree: ``/<tenant>/kv/`` (the hot path).
        """
        return [(b"/" + self._tenant + b"/kv/", self._tenant_resource.kv)]

    def probes(self):
        """
        The probes' full paths, each with its route and its answer, for :class:`~kvresponder.http.site.KVSite` to
        answer over its connection cap.
        """
        return {b"/" + self._tenant + route.encode("ascii"): (route, answer) for route, answer in self._probes.items()}

    def fast_lane_route(self):
        """
        The prefix of the kv routes and the operations that answer them, for the site's fast lane
        (:mod:`~kvresponder.http.fastlane`).
        """
        return b"/" + self._tenant + b"/kv/", self._tenant_resource.kv.operations

    def render(self, request):
        return self._elsewhere.render(request)


def build_root(node, authenticator=None) -> RootResource:
    """
    The whole tree of ``node``. Internal routes check signatures with ``authenticator``, by default the node's
    own (from CLUSTER_SECRET); without one they are closed, unless the node was started with
    ``--insecure-cluster``.
    """
    settings = node.settings
    guard = PeerGuard(authenticator or node.authenticator, settings.insecure_cluster)
    public = PublicAPI(node)
    copies = CopyStreamResource(node, guard, node.clock,
                                max_frame(settings.max_value_size, internal_body_limit(settings.max_value_size)),
                                settings.request_timeout)
    # Internal routes closed to everyone take no more than a value: their answer is 403 whatever the body.
    tenant = TenantResource(KVResource(node), public.resource(), InternalAPI(node, guard).resource(),
                            copies, public.body_limit_for, VALUE if guard.closed else INTERNAL)
    return RootResource(node.settings.tenant, tenant, guard, public.probes())
