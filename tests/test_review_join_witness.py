"""
Review finding: a write coordinated by the node that is joining, for a key whose every owner the join replaced,
does not ask the previous owners, so an earlier acknowledged write stamped by a clock ahead (within
MAX_CLOCK_OFFSET) wins over it once the handoff lands.
"""

import json

from kvresponder.ring import HashRing

from .support import MemoryCluster
from .test_cluster_memory import get, put


def test_a_later_write_through_the_joining_node_wins_over_an_earlier_one_the_join_displaced():
    """
    If a write is acknowledged through n3 (clock 0.4 s ahead, within the bound), n4 joins and takes both owners'
    places for the key, and a second write is then made through n4 itself while it joins (kv requests are served
    in every state), then once the join's handoff has run every node answers the second write.
    """
    cluster = MemoryCluster(3, wall_offsets={3: 0.4})
    cluster.run(seconds=1.0)
    n1, n2, n3 = cluster.nodes
    assert not n3.clock_offsets.skewed
    before = HashRing(["n1", "n2", "n3"], vnodes=n1.settings.vnodes)
    after = HashRing(["n1", "n2", "n3", "n4"], vnodes=n1.settings.vnodes)
    key = next(key for key in ("key-%d" % i for i in range(100000))
               if set(before.preference_list(key, 2)) == {"n2", "n3"}
               and set(after.preference_list(key, 2)) == {"n1", "n4"})
    assert put(cluster, n3, key, "earlier")[0] == 201
    n4 = cluster.add()
    assert n4.state == "joining"
    assert sorted(n4.ring().preference_list(key, 2)) == ["n1", "n4"]
    code, body = put(cluster, n4, key, "later")
    assert code in (200, 201), body
    cluster.run(seconds=5.0)
    answers = {node.node_id: json.loads(get(cluster, node, key)[1]).get("value") for node in cluster.nodes}
    assert answers == dict.fromkeys(answers, "later"), answers
