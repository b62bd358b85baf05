"""
The resource tree: ``/<tenant>/`` and nothing else.

::

    /                       404, naming the tenant served
    /<other tenant>/...     404, naming the tenant served
    /<tenant>/kv[/<key>]    KVResource (a lean leaf: the hot path)
    /<tenant>/_internal/copies  CopyStreamResource (a peer's copy stream: an HTTP upgrade)
    /<tenant>/_internal/... InternalAPI (Klein; peers only)
    /<tenant>/...           PublicAPI (Klein)
"""

from twisted.web.resource import Resource

from .api import KVResource, PublicAPI
from .copies import CopyStreamResource
from .errors import bad_request, not_found, write_error
from .internal import InternalAPI


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, message: str) -> None:
        Resource.__init__(self)
        self._message = message

    def render(self, request):
        return write_error(request, not_found(self._message))


class _BadPath(Resource):
    isLeaf = True

    def render(self, request):
        return write_error(request, bad_request("invalid_path", "The path is not valid UTF-8."))


class TenantResource(Resource):
    """
    Everything under ``/<tenant>/``.
    """

    def __init__(self, kv: Resource, public: Resource, internal: Resource, copies: Resource) -> None:
        Resource.__init__(self)
        self.kv = self._kv = kv
        self._public = public
        self._internal = internal
        self._copies = copies

    def getChildWithDefault(self, path: bytes, request):
        if path == b"kv":
            return self._kv
        try:
            path.decode("utf-8")
            for segment in request.postpath:
                segment.decode("utf-8")
        except UnicodeDecodeError:
            return _BadPath()
        if path == b"_internal":
            if request.postpath == [b"copies"]:
                return self._copies
            return self._internal
        # Klein routes on the path below the tenant: give it this segment back.
        request.prepath.pop()
        request.postpath.insert(0, path)
        return self._public

    def render(self, request):
        return write_error(request, not_found("No such route; try kv, health, peers, metrics or diag."))


class RootResource(Resource):
    """
    Serves one tenant; any other prefix gets a 404 that names the tenant this node serves.
    """

    def __init__(self, tenant: str, tenant_resource: Resource) -> None:
        Resource.__init__(self)
        self._tenant = tenant.encode("ascii")
        self._tenant_resource = tenant_resource
        self._elsewhere = _NotFound("This node serves tenant %r only; use /%s/." % (tenant, tenant))

    def getChildWithDefault(self, path: bytes, request):
        if path == self._tenant:
            return self._tenant_resource
        return self._elsewhere

    def shortcuts(self):
        """
        Path prefixes whose requests all end at one leaf, for :class:`~kvresponder.http.site.KVSite` to
        serve without walking the tree: ``/<tenant>/kv/`` (the hot path).
        """
        return [(b"/" + self._tenant + b"/kv/", self._tenant_resource.kv)]

    def render(self, request):
        return self._elsewhere.render(request)


def build_root(node, authenticator=None) -> RootResource:
    tenant = TenantResource(KVResource(node), PublicAPI(node).resource(),
                            InternalAPI(node, authenticator).resource(), CopyStreamResource(node, authenticator))
    return RootResource(node.settings.tenant, tenant)
