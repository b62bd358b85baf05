"""
The coordinator's CPU for a replicated write, in one process: no HTTP, no sockets, no other process on the CPU.

Three nodes, RF=2. The coordinator ``n1``, its peer client and copy streams, and the copy-stream servers and
coordinators of ``n2`` and ``n3`` are all the real classes; the streams' bytes go through in-memory transports
that this script pumps, and ``task.Clock`` runs the callLater(0) that flushes each batch. Each write is started
inside an action standing for the client request's, as the HTTP layer does, and every log line is encoded by the
service's own destination (written to ``/dev/null``). The time spent in the replicas is measured apart and taken
out, so what is left is the coordinator's share: the ring, its actions, the copies' queue, framing, callbacks.
``--single`` gives the same write on a one-node ring, for comparison.

Run it with the interpreter to measure, in the work tree (for PyPy, the python that .ci/setup-pypy.sh prints)::

    /var/cache/kv-pypy311/python bench/write_path.py
    /var/cache/kv-pypy311/python bench/write_path.py --single
    /var/cache/kv-pypy311/python bench/write_path.py --replication-level debug

Each round writes ``--writes`` random keys, ``--concurrency`` at a time, and prints µs a write; the first rounds
include the JIT's warm-up on PyPy.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eliot import add_destinations, remove_destination, start_action  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from kvresponder.coordinator import Coordinator  # noqa: E402
from kvresponder.copystream import CopyStreamServer, CopyStreams, new_nonce, upgrade_answer  # noqa: E402
from kvresponder.hlc import HybridLogicalClock  # noqa: E402
from kvresponder.log import JSONLineDestination, LogPolicy, use_fast_task_ids  # noqa: E402
from kvresponder.metrics import Metrics  # noqa: E402
from kvresponder.peers import PeerClient  # noqa: E402
from kvresponder.ring import HashRing  # noqa: E402
from kvresponder.store import Store  # noqa: E402

VALUE = b'"' + b"v" * 98 + b'"'  # 100 bytes of JSON, as the wrk scenarios store


class _Peer:
    def __init__(self, node_id: str, port: int) -> None:
        self.node_id, self.address, self.port = node_id, "127.0.0.1", port


class _Buffer:
    """
    A transport that keeps what is written until it is taken.
    """

    def __init__(self) -> None:
        self.chunks = []
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def writeSequence(self, data) -> None:
        self.chunks.extend(data)

    def loseConnection(self) -> None:
        pass

    abortConnection = loseConnection

    def registerProducer(self, producer, streaming) -> None:
        pass  # never full: nothing to pause

    def unregisterProducer(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


class _Link:
    """
    One copy stream from the coordinator to a replica's stream server, over two buffers.
    """

    def __init__(self, replica: Coordinator) -> None:
        self.replica = replica

    def connect(self, factory):
        self.client = factory.buildProtocol(None)
        self.to_server, self.to_client = _Buffer(), _Buffer()
        self.client.makeConnection(self.to_server)
        self.to_server.take()  # the upgrade request
        nonce = new_nonce()
        self.server = CopyStreamServer(self.replica.apply_copies, None, nonce, 64 << 20, lambda reason: None,
                                       wall=time.time)
        self.server.makeConnection(self.to_client)
        self.client.dataReceived(upgrade_answer(nonce))
        return succeed(self.client)

    def pump(self) -> float:
        """
        Deliver the frames each way; the seconds spent in the replica.
        """
        spent = 0.0
        data = self.to_server.take()
        if data:
            started = time.perf_counter()
            self.server.dataReceived(data)
            spent = time.perf_counter() - started
        data = self.to_client.take()
        if data:
            self.client.dataReceived(data)
        return spent


def main() -> None:
    p = argparse.ArgumentParser(description="The coordinator's CPU for a replicated write, in one process.")
    p.add_argument("--single", action="store_true", help="a one-node ring: the same write, stored locally only")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--writes", type=int, default=50000, help="writes a round (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="writes started before each pump (default 16)")
    p.add_argument("--keys", type=int, default=100000, help="distinct keys (default %(default)s)")
    p.add_argument("--replication-level", default="info", help="the replication area's log level (default info)")
    args = p.parse_args()

    policy = LogPolicy("info")
    policy.set_area("replication", args.replication_level)
    sink = open(os.devnull, "w")
    destination = JSONLineDestination(sink, policy, "bench", "n1", flush=False)
    use_fast_task_ids()
    add_destinations(destination)

    clock = Clock()
    metrics = Metrics("bench")
    ring = HashRing(["n1"] if args.single else ["n1", "n2", "n3"])
    # The replicas only store copies; they get a peer client of their own that never sends.
    replicas = {node: Coordinator(Store(time.time, 1 << 30), HybridLogicalClock(time.time, node), lambda: ring,
                                  lambda node_id: None, PeerClient(None, clock, "bench", 5.0, None, metrics, None,
                                                                   policy), 2, None, time.time, metrics, policy)
                for node in ("n2", "n3")}
    links = {2: _Link(replicas["n2"]), 3: _Link(replicas["n3"])}
    streams = CopyStreams(clock, lambda address, port: links[port], "bench")
    peers = PeerClient(None, clock, "bench", 5.0, None, metrics, None, policy, streams)
    peer_of = {"n2": _Peer("n2", 2), "n3": _Peer("n3", 3)}.get
    coordinator = Coordinator(Store(time.time, 1 << 30), HybridLogicalClock(time.time, "n1"), lambda: ring,
                              peer_of, peers, 2, None, time.time, metrics, policy)

    keys = ["key-%d" % random.randrange(args.keys) for _ in range(args.writes)]
    answered = [0]

    def count(result):
        answered[0] += 1

    try:
        for round_ in range(args.rounds):
            in_replicas = 0.0
            started = time.perf_counter()
            for first in range(0, len(keys), args.concurrency):
                for key in keys[first:first + args.concurrency]:
                    with start_action(action_type="bench:request"):
                        coordinator.put(key, VALUE, None).addCallback(count)
                clock.advance(0)
                for link in links.values():
                    if hasattr(link, "client"):
                        in_replicas += link.pump()
            elapsed = time.perf_counter() - started - in_replicas
            print("round %d: coordinator %.2f µs a write, replicas %.2f µs a write" % (
                round_ + 1, elapsed / len(keys) * 1e6, in_replicas / len(keys) * 1e6), flush=True)
    finally:
        destination.flush()
        remove_destination(destination)
        sink.close()
    if answered[0] != args.rounds * len(keys):
        raise SystemExit("only %d of %d writes answered" % (answered[0], args.rounds * len(keys)))


if __name__ == "__main__":
    main()
