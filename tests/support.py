"""
In-memory nodes for fast tests: real resources, real Sites, real HTTP parsing, on ``task.Clock`` and
``StubTreq``; no sockets.
"""

import json
import secrets
from typing import Dict, List

from twisted.internet.task import Clock
from twisted.web.resource import Resource
from treq.testing import StubTreq  # noqa: F401  (the type stub_over returns)

from kvresponder.http.root import build_root
from kvresponder.http.site import KVSite
from kvresponder.membership import Heartbeat
from kvresponder.node import Node
from kvresponder.privateapi import stub_treq_serving
from kvresponder.settings import load_settings


def make_settings(tenant: str = "t1", node_id: str = "n1", **overrides):
    given = {"tenant": tenant, "node-id": node_id, "heartbeat-interval": "1"}
    given.update({key.replace("_", "-"): str(value) for key, value in overrides.items()})
    return load_settings(given, {})


def stub_over(site: KVSite) -> StubTreq:
    """
    A StubTreq whose in-memory server is ``site`` (StubTreq builds a plain Site; ours carries the request
    accounting and limits under test).
    """
    return stub_treq_serving(site)


class _Router(Resource):
    """
    Sends each request to the node whose advertised address and port its Host header names.
    """
    isLeaf = False

    def __init__(self) -> None:
        Resource.__init__(self)
        self.roots: Dict[bytes, Resource] = {}

    def getChildWithDefault(self, path, request):
        root = self.roots.get(request.getHeader(b"host"))
        if root is None:
            return _Unreachable()
        request.prepath.pop()
        request.postpath.insert(0, path)
        return root


class _Unreachable(Resource):
    isLeaf = True

    def render(self, request):
        # A down node: the connection "fails". The client sees a 502-like status, which PeerClient treats as
        # an unusable answer, like a refused connection.
        request.setResponseCode(502)
        return b"{}"


class _RoutedRoot(Resource):
    def __init__(self, router):
        Resource.__init__(self)
        self._router = router

    def getChildWithDefault(self, path, request):
        return self._router.getChildWithDefault(path, request)

    def body_limit_for(self, segments, method):
        # Every node serves the same tenant, so any one routes a path as the others do.
        for root in self._router.roots.values():
            return root.body_limit_for(segments, method)
        return "value"


class MemoryCluster:
    """
    Several nodes in one process, wired to each other through one StubTreq, with membership fed directly
    (discovery is tested on its own).
    """

    def __init__(self, count: int, tenant: str = "t1", wall_offsets: Dict[int, float] = None, **settings) -> None:
        #: Seconds each node's wall clock is off real time, by its number (1 for n1): a skewed clock. Set while
        #: the nodes run, it steps that node's clock.
        self.wall_offsets = dict(wall_offsets or {})
        # A secret of the cluster's own, so the nodes' peer calls are signed and checked as in production (a
        # node without one serves alone); cluster_secret=None leaves it out.
        settings.setdefault("cluster_secret", "memory-cluster-" + secrets.token_hex(8))
        if settings["cluster_secret"] is None:
            del settings["cluster_secret"]
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.router = _Router()
        self.site = KVSite(_RoutedRoot(self.router), self.clock, internal_body_limit=64 << 20)
        self.stub = stub_over(self.site)
        self.tenant = tenant
        self.settings = settings
        self.nodes: List[Node] = []
        self.down = set()
        #: Node ids whose heartbeats leave out what nodes older than it did not send (``settled``): a rolling
        #: upgrade's older nodes.
        self.older = set()
        for index in range(count):
            self.add()

    def add(self) -> Node:
        index = len(self.nodes) + 1
        settings = make_settings(self.tenant, "n%d" % (index,), advertise_address="10.0.0.%d" % (index,),
                                 port="3000", **self.settings)
        node = Node(settings, self.clock, self.stub, join_settle=0.1,
                    wall=lambda: self.clock.seconds() + self.wall_offsets.get(index, 0.0))
        self.router.roots[b"10.0.0.%d:3000" % (index,)] = build_root(node)
        self.nodes.append(node)
        self.introduce()
        node.start()
        return node

    def introduce(self) -> None:
        """
        Let every live node hear every other live node's heartbeat.
        """
        for node in self.nodes:
            if node.node_id in self.down:
                continue
            for other in self.nodes:
                if other is not node and other.node_id not in self.down:
                    beat = other.heartbeat()
                    if other.node_id in self.older:
                        beat = beat._replace(settled=None)
                    node.membership.observe(beat)
                    # What the heartbeat's timestamp would tell: the sender's clock against ours.
                    node.clock_offsets.heard(other.node_id, other.incarnation, other.wall() - node.wall())
            node.membership.expire()

    def kill(self, node: Node) -> None:
        """
        The node stops answering; the others notice only when its heartbeats time out.
        """
        self.down.add(node.node_id)
        del self.router.roots[b"%s:3000" % (node.settings.advertise_address.encode("ascii"),)]
        node.stop()

    def run(self, d=None, seconds: float = 30.0, step: float = 0.05):
        """
        Turn the clock and the in-memory connections until ``d`` fires (or for ``seconds``).
        """
        results = []
        if d is not None:
            d.addBoth(results.append)
        elapsed = 0.0
        while elapsed < seconds and not (d is not None and results):
            self.stub.flush()
            self.clock.advance(step)
            elapsed += step
            if elapsed % 0.5 < step:
                self.introduce()
        self.stub.flush()
        if d is not None:
            assert results, "the Deferred did not fire"
            return results[0]
        return None

    def request(self, method: str, node: Node, path: str, body=None, headers=None):
        url = "http://%s:3000/%s%s" % (node.settings.advertise_address, self.tenant, path)
        kwargs = {"headers": headers or {}}
        data = b""
        if body is not None:
            data = kwargs["data"] = json.dumps(body).encode("utf-8")
            kwargs["headers"].setdefault("Content-Type", "application/json")
        if path.startswith("/_internal/") and node.authenticator is not None:
            # Signed as a peer signs it.
            kwargs["headers"].setdefault("X-KV-Auth", node.authenticator.sign(
                method.encode("ascii"), ("/%s%s" % (self.tenant, path)).encode("ascii"), data))
        d = self.stub.request(method, url, **kwargs)
        response = self.run(d)
        content = self.run(self.stub.content(response))
        return response.code, content


def heartbeat(node_id: str, incarnation: int = 1, address: str = "10.0.0.9", port: int = 3000,
              state: str = "alive") -> Heartbeat:
    return Heartbeat(node_id, incarnation, address, port, state, 1)


class PartitionedCluster(MemoryCluster):
    """
    A cluster whose nodes hear each other's heartbeats as ``hears(listener, speaker)`` says, and refuse one
    stamped more than twice MAX_CLOCK_OFFSET ahead after measuring it, as discovery does.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.hears = lambda listener, speaker: True
        super().__init__(*args, **kwargs)

    def introduce(self) -> None:
        for node in self.nodes:
            for other in self.nodes:
                if other is node or not self.hears(node.node_id, other.node_id):
                    continue
                offset = other.wall() - node.wall()
                node.clock_offsets.heard(other.node_id, other.incarnation, offset)
                if offset <= 2 * node.settings.max_clock_offset:
                    node.membership.observe(other.heartbeat())
            node.membership.expire()
