"""
What the JIT scripts here share: a node started with a launcher of their own (``python -c LAUNCH`` in place of
twistd's entry point), loaded, and, for ``coord``, made the coordinator of a 3-node cluster; pinned as
``cluster_ratio`` pins.
"""
import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b  # noqa: E402
import cluster_ratio as cr  # noqa: E402


def launched(launch: str, mode: str, name: str, extra: dict):
    """
    Start node ``n1`` by ``launch`` with the ``extra`` environment, load it, add two peers if ``mode`` is
    ``coord``, and pin it: ``(python, n1, every node)``. The caller stops them (``b.stop_all()``).
    """
    python = b.interpreter_path("pypy")
    env = b.with_secret({"REPLICATION_FACTOR": "2"})
    discovery = b.free_port(socket.SOCK_DGRAM)
    port = b.free_port()
    settings = dict(env, HEARTBEAT_INTERVAL="0.5", LOG_FILE=os.path.join(b.log_dir(), "%s-%d.eliot.log" % (name, port)))
    settings.update(extra)
    command = [python, "-c", launch, "-n", "--pidfile=", "kvresponder", "--tenant", b.TENANT,
               "--port", str(port), "--node-id", "n1", "--discovery-port", str(discovery)]
    n1 = b.Process("n1", command, b.node_env(settings), port, "http://127.0.0.1:%d/%s" % (port, b.TENANT))
    nodes = [n1]
    n1.wait_ready()
    b.bulk_load(n1.base, b.HIT_KEYS)
    if mode == "coord":
        nodes += [b.start_node(python, "n%d" % i, discovery, env) for i in (2, 3)]
        for node in nodes:
            node.wait_ready()
        b.wait_formed(nodes)
        b.wait_keys(nodes, 2 * b.HIT_KEYS)
    cr.pin([n1], nodes[1:])
    return python, n1, nodes
