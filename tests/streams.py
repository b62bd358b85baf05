"""
Shared by the copy-stream tests: a node's real HTTP server on a loopback port, copy streams to it, fake endpoints
on which a test plays the peer, and small builders.
"""

import binascii
import struct
import time
from collections import namedtuple

import pytest
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kvresponder.copystream import UPGRADE_TOKEN, CopyStreams, encode_answer
from kvresponder.discovery import derive_key
from kvresponder.http.root import build_root
from kvresponder.http.site import KVSite
from kvresponder.node import Node
from kvresponder.peers import PeerAuthenticator
from kvresponder.store import Entry

from .support import make_settings


Peer = namedtuple("Peer", "node_id address port")

SECRET = "a-cluster-secret-of-enough-length"


def signer(secret=SECRET):
    return PeerAuthenticator(derive_key(secret, "peer"), time.time)


def numbered_entry(index, value=b"v", tick=0):
    return Entry("k%d" % (index,), value, (1_700_000_000_000 + index, tick, "n9"), None)


class PeerServer:
    """
    A node's real HTTP server on a loopback port.
    """

    def __init__(self, secret=SECRET, timeout=30.0, root=None, **overrides):
        if secret:
            overrides["cluster_secret"] = secret
        settings = make_settings("t1", "n2", advertise_address="127.0.0.1", port="3000", request_timeout=str(timeout),
                                 **overrides)
        self.node = Node(settings, reactor, http=None)
        self.site = KVSite(root or build_root(self.node, self.node.authenticator), reactor, timeout=timeout)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.peer = Peer("n2", "127.0.0.1", self.port.getHost().port)

    def stop(self):
        return self.port.stopListening()


def loopback_streams(auth=None, timeout_clock=reactor, metrics=None):
    # A connection to a peer on loopback is made at once or refused at once; the timeout only bounds a stalled
    # machine (one CI run saw a 2 s stall fail a test about something else).
    return CopyStreams(timeout_clock, lambda host, port: TCP4ClientEndpoint(reactor, host, port, timeout=10),
                       "t1", auth, metrics)


@pytest.fixture
def server():
    servers = []

    def start(**kwargs):
        servers.append(PeerServer(**kwargs))
        return servers[-1]
    yield start
    for each in servers:
        each.stop()


def keeping(outcomes: dict, key):
    """
    A callback that keeps a call's outcome under ``key`` and consumes it: a failure kept here is no unhandled error
    when its Deferred is collected.
    """
    def keep(outcome) -> None:
        outcomes.setdefault(key, outcome)
    return keep


def fake_endpoint_streams(auth=None):
    clock = Clock()
    endpoints = FakeEndpoints()
    return clock, endpoints, CopyStreams(clock, endpoints, "t1", auth)


PEER = Peer("n2", "10.0.0.2", 3000)


class FakeEndpoints:
    """
    Each connect gives the protocol a StringTransport; the test plays the peer.
    """

    def __init__(self):
        self.connections = []

    def __call__(self, host, port):
        return self

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    def answer(self, index, data):
        self.connections[index][0].dataReceived(data)

    def upgrade(self, index):
        self.answer(index, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + UPGRADE_TOKEN +
                    b"\r\nX-KV-Stream-Nonce: " + binascii.hexlify(b"n" * 16) + b"\r\n\r\n")

    def frames(self, index):
        data = self.connections[index][1].value()
        data = data[data.index(b"\r\n\r\n") + 4:]
        found = []
        while data:
            (length,) = struct.unpack("!I", data[:4])
            found.append(data[4:4 + length])
            data = data[4 + length:]
        return found

    def answer_frame(self, index, batch_id, results):
        answer = encode_answer(batch_id, results)
        self.answer(index, struct.pack("!I", len(answer)) + answer)
