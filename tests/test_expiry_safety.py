"""
TTL expiry across a cluster: an expired write that overwrote a value on a replica stays a version that hides
every older one, so that neither a read nor hint handoff nor anti-entropy brings back the value it overwrote;
one that overwrote nothing leaves nothing behind (ARCHITECTURE.md, TTL).
"""

from .support import MemoryCluster


def _owned_by(cluster, first: str, second: str) -> str:
    ring = cluster.nodes[0].ring()
    return next(key for key in ("key-%d" % i for i in range(10000))
                if ring.preference_list(key, 2) == [first, second])


def _codes(cluster, key):
    return {node.node_id: cluster.request("GET", node, "/kv/" + key)[0] for node in cluster.nodes}


def test_an_expired_overwrite_does_not_bring_the_older_value_back():
    """
    If an owner missed a write with a TTL while it was unreachable (the write was acknowledged by the other
    owner and by a hint elsewhere), and the TTL ends before the hint is handed back, then the older value the
    owner still holds is never served again: not by a read through any node, nor after the periodic passes
    and anti-entropy, which replace it with the expired write's tombstone instead of copying it back.

    Sequence: K="old" on owners n1, n2. n2 is unreachable for a moment (still heartbeating, so no membership
    change starts a pass); PUT K="new" ttl=2 is acknowledged by n1 and by n3 as a hint. n2 is reachable
    again. The TTL ends on n1 and on n3 before any pass runs.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n1, n2, n3 = cluster.nodes
    key = _owned_by(cluster, "n1", "n2")
    assert cluster.request("PUT", n1, "/kv/" + key, {"value": "old"})[0] == 201
    route = b"10.0.0.2:3000"
    saved = cluster.router.roots.pop(route)
    code, body = cluster.request("PUT", n1, "/kv/" + key, {"value": "new", "ttl": 2})
    assert code == 200, body
    assert n3.store.get(key) is not None  # the hint
    cluster.router.roots[route] = saved
    cluster.run(seconds=3.0)  # the TTL has ended everywhere
    assert n2.store.get(key).value == b'"old"'  # not yet repaired: only read as absent
    assert _codes(cluster, key) == {"n1": 404, "n2": 404, "n3": 404}
    cluster.run(seconds=6.0)  # past SETTLE_MS, and one periodic pass on each node
    for node in cluster.nodes:
        node.rebalancer.run_pass("anti-entropy")
    cluster.run(seconds=2.0)
    assert _codes(cluster, key) == {"n1": 404, "n2": 404, "n3": 404}
    # Repaired, not only hidden: n2 now holds the expired write's version, as a tombstone, which n1 left
    # because its copy replaced "old". The hint on n3 replaced nothing there, and left nothing.
    current = n2.store.current(key)
    assert current is not None and current.is_tombstone
    assert current.version == n1.store.current(key).version
    assert n3.store.current(key) is None


def test_an_expired_write_of_a_new_key_leaves_nothing_on_any_node():
    """
    If a key no node held is written with a TTL, then once the TTL has ended, and after the periodic passes
    and anti-entropy, no node holds anything of it: no value and no tombstone.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n1 = cluster.nodes[0]
    key = _owned_by(cluster, "n1", "n2")
    code, body = cluster.request("PUT", n1, "/kv/" + key, {"value": "new", "ttl": 2})
    assert code in (200, 201), body
    cluster.run(seconds=9.0)  # the TTL, SETTLE_MS and one periodic pass on each node
    for node in cluster.nodes:
        node.rebalancer.run_pass("anti-entropy")
    cluster.run(seconds=2.0)
    assert _codes(cluster, key) == {"n1": 404, "n2": 404, "n3": 404}
    assert [(node.store.current(key), node.store.tombstone_count) for node in cluster.nodes] == [(None, 0)] * 3
