"""
Review finding 3: a starting node that has not yet heard any peer acts as a cluster of one: it acknowledges a
write with its one copy (201 "created") and answers reads from its empty store, for keys the cluster holds.
"""

import json

from kvresponder.node import Node

from .support import MemoryCluster, build_root, make_settings
from .test_cluster_memory import get, put


def _start_unheard(cluster: MemoryCluster) -> Node:
    """
    Start n4 as ``MemoryCluster.add`` does, but before any heartbeat reaches it or its peers (the first
    moments of a pod: its port is open, its first "want" heartbeat's answers are 20 ms away or lost).
    """
    index = len(cluster.nodes) + 1
    settings = make_settings(cluster.tenant, "n%d" % (index,), advertise_address="10.0.0.%d" % (index,),
                             port="3000", **cluster.settings)
    node = Node(settings, cluster.clock, cluster.stub, join_settle=0.1)
    cluster.router.roots[b"10.0.0.%d:3000" % (index,)] = build_root(node)
    cluster.nodes.append(node)
    node.start()
    return node


def test_a_write_through_a_starting_node_that_heard_no_peer_yet_does_not_lose_to_an_earlier_one():
    """
    If a key is written through n3 (clock 0.4 s ahead, within the bound) and then, later in real time, through
    n4 in its first moments (joining, no peer heard yet), then either n4 refuses the write, or once n4 has joined
    and the ring has settled every node answers the later write.
    """
    cluster = MemoryCluster(3, wall_offsets={3: 0.4})
    cluster.run(seconds=1.0)
    n3 = cluster.nodes[2]
    assert put(cluster, n3, "k", "earlier")[0] == 201
    n4 = _start_unheard(cluster)
    assert n4.state == "joining" and len(n4.ring()) == 1
    code, body = put(cluster, n4, "k", "later")
    cluster.introduce()
    cluster.run(seconds=5.0)
    if code in (200, 201):
        answers = {node.node_id: json.loads(get(cluster, node, "k")[1]).get("value") for node in cluster.nodes}
        assert answers == dict.fromkeys(answers, "later"), (code, answers)


def test_a_read_through_a_starting_node_that_heard_no_peer_yet_is_not_a_miss():
    """
    If a key the cluster holds is read through n4 in its first moments (joining, no peer heard yet), then the
    answer is not 404: the node knows it has not yet heard from the cluster.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    assert put(cluster, cluster.nodes[0], "k", "value")[0] == 201
    n4 = _start_unheard(cluster)
    code, body = get(cluster, n4, "k")
    assert code != 404, body
