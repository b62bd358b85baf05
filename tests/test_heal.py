"""
A node the cluster dropped and took back (its heartbeats unheard for longer than PEER_TIMEOUT: a partition, a
stall, loss one way) stays READY on its own side, so it never joins again: the ring the others wrote under
meanwhile is its ring without itself. Until that ring settles it is among the node's previous rings, so that a
read it coordinates finds, and a write it coordinates is stamped above, what the cluster acknowledged meanwhile.

In memory (a MemoryCluster whose nodes hear each other as the test says), with the returning node's clock 0.4 s
behind (within MAX_CLOCK_OFFSET): a write through it, stamped below the one the cluster took meanwhile, is
stamped again above it only if it asks the owners that hold it.
"""

import json

from kvresponder.ring import HashRing

from .support import PartitionedCluster

ALL = ["n1", "n2", "n3", "n4"]


def _owners(nodes, key):
    return set(HashRing(nodes).preference_list(key, 2))


# n4 owns it on the whole ring, and its owners on {n1, n2, n3} (where the cluster writes while n4 is out) are
# none of the owners on the rings n4 goes through as it hears n1, then n2, then n3 again.
KEY = next(k for k in ("key-%d" % i for i in range(10000))
           if "n4" in _owners(ALL, k)
           and not _owners(["n1", "n2", "n3"], k) & (_owners(ALL, k) | _owners(["n4"], k) | _owners(["n1", "n4"], k)
                                                     | _owners(["n1", "n2", "n4"], k)))


def _cluster():
    cluster = PartitionedCluster(4, wall_offsets={4: -0.4})
    cluster.run(seconds=40)
    assert all(node.state == "ready" for node in cluster.nodes)
    return cluster


def _value(cluster, node):
    code, body = cluster.request("GET", node, "/kv/" + KEY)
    return json.loads(body)["value"] if code == 200 else code


def _drop_n4(cluster, n4_hears_them: bool):
    """n4's heartbeats go unheard for 40 s (more than PEER_TIMEOUT, and than the ring's settling)."""
    if n4_hears_them:
        cluster.hears = lambda listener, speaker: speaker != "n4"
    else:
        cluster.hears = lambda listener, speaker: "n4" not in (listener, speaker)
    cluster.run(seconds=40)
    assert sorted(cluster.nodes[0].ring().nodes) == ["n1", "n2", "n3"]
    assert sorted(cluster.nodes[3].ring().nodes) == (ALL if n4_hears_them else ["n4"])


def _take_n4_back(cluster):
    cluster.hears = lambda listener, speaker: True
    cluster.introduce()


def test_a_read_through_a_node_taken_back_answers_what_the_cluster_wrote_while_it_was_out():
    cluster = _cluster()
    n1, n2, n3, n4 = cluster.nodes
    assert cluster.request("PUT", n1, "/kv/" + KEY, {"value": "old"})[0] == 201
    _drop_n4(cluster, n4_hears_them=False)
    assert cluster.request("PUT", n2, "/kv/" + KEY, {"value": "new"})[0] == 200
    assert n2.store.get(KEY).value == n3.store.get(KEY).value == b'"new"'
    _take_n4_back(cluster)
    assert _value(cluster, n4) == "new"


def _later_write_through_n4_wins(n4_hears_them: bool) -> None:
    cluster = _cluster()
    n1, n2, n3, n4 = cluster.nodes
    _drop_n4(cluster, n4_hears_them)
    assert cluster.request("PUT", n2, "/kv/" + KEY, {"value": "earlier"})[0] == 201
    _take_n4_back(cluster)
    code, body = cluster.request("PUT", n4, "/kv/" + KEY, {"value": "later"})
    assert code in (200, 201), body
    cluster.run(seconds=60)
    assert [_value(cluster, node) for node in cluster.nodes] == ["later"] * 4


def test_a_write_through_a_node_taken_back_wins_over_the_earlier_write_the_cluster_acknowledged():
    _later_write_through_n4_wins(n4_hears_them=False)


def test_a_write_through_a_node_whose_peers_alone_stopped_hearing_it_wins_over_their_earlier_write():
    """
    If n4 kept hearing its peers while they did not hear it (its ring never changed), then its peers' heartbeats
    naming a ring without it tell it: the write it coordinates after they take it back still asks the owners
    the cluster wrote to meanwhile, and wins.
    """
    _later_write_through_n4_wins(n4_hears_them=True)


def _newcomer(node, joining: bool, incarnation: int = 1):
    """A heartbeat from a new peer n9 to ``node``, naming ``node``'s ring with n9 in it and without ``node``."""
    from kvresponder.membership import Heartbeat
    from kvresponder.ring import members_digest

    ring = (node.ring().nodes | {"n9"}) - {node.node_id}
    return Heartbeat("n9", incarnation, "10.0.0.9", 3000, "alive", len(ring), members_digest(ring), joining)


def _remembers_ring_without(node) -> bool:
    without = HashRing(node.ring().nodes - {node.node_id}).digest
    return without in [ring.digest for ring in node.previous_rings()]


def test_a_joining_peer_that_has_not_heard_this_node_yet_is_not_taken_for_a_cluster_that_left_it_out():
    """
    If a peer that joins (its heartbeats say ``joining``) names this node's ring without this node (it has not
    heard it yet), then that ring is not kept among the previous rings: the newcomer holds nothing of it. The
    same ring named by a peer that is not joining is kept.
    """
    from .support import MemoryCluster

    for joining, kept in ((True, False), (False, True)):
        cluster = MemoryCluster(3)
        cluster.run(seconds=40)
        n1 = cluster.nodes[0]
        n1.membership.observe(_newcomer(n1, joining))
        assert sorted(n1.ring().nodes) == ["n1", "n2", "n3", "n9"]
        assert _remembers_ring_without(n1) is kept


def test_a_peer_timed_out_and_heard_again_as_a_new_incarnation_was_restarted_not_cut_off():
    """
    If a peer this node timed out comes back as a new incarnation (restarted: it holds nothing), then this node
    does not take it for a side of a partition that wrote under a ring of its own; as the same incarnation, it
    does: that ring (the peer alone, here) is kept among the previous rings.
    """
    from .support import MemoryCluster

    for later, kept in ((1, False), (0, True)):
        cluster = MemoryCluster(3)
        cluster.run(seconds=40)
        n1, n2, n3 = cluster.nodes
        cluster.kill(n3)
        cluster.run(seconds=n1.settings.peer_timeout + 40)
        assert sorted(n1.ring().nodes) == ["n1", "n2"] and not n1.previous_rings()
        beat = n3.heartbeat()._replace(incarnation=n3.incarnation + later, ring_digest=None, state="alive",
                                       settled=None)
        n1.membership.observe(beat)
        assert sorted(n1.ring().nodes) == ["n1", "n2", "n3"]
        assert (HashRing(["n3"]).digest in [ring.digest for ring in n1.previous_rings()]) is kept


def test_after_a_split_of_two_and_three_a_node_of_the_three_finds_what_the_two_acknowledged():
    """
    If the cluster splits n1, n2 | n3, n4, n5 (each side writing under its own ring) and heals, then n3 keeps the
    ring of the peers that came back (n1, n2), not its ring without itself: a read through it finds what the
    other side acknowledged, and a later write through it (its clock 0.4 s behind) wins, for a key whose owners
    on every other ring n3 goes through are n4 and n5.
    """
    every, small = ["n1", "n2", "n3", "n4", "n5"], {"n1", "n2"}
    rings_n3_goes_through = [{"n3", "n4", "n5"}, {"n1", "n4", "n5"}, {"n1", "n3", "n4", "n5"},
                             {"n1", "n2", "n4", "n5"}, set(every)]
    key = next(k for k in ("key-%d" % i for i in range(20000))
               if all(not (_owners(sorted(ring), k) & small) for ring in rings_n3_goes_through))
    for read in (True, False):
        cluster = PartitionedCluster(5, wall_offsets={3: -0.4})
        cluster.run(seconds=40)
        n1, n2, n3, n4, n5 = cluster.nodes
        if read:
            assert cluster.request("PUT", n1, "/kv/" + key, {"value": "old"})[0] == 201
        cluster.hears = lambda listener, speaker: (listener in small) == (speaker in small)
        cluster.run(seconds=40)
        assert sorted(n1.ring().nodes) == ["n1", "n2"] and sorted(n3.ring().nodes) == ["n3", "n4", "n5"]
        assert cluster.request("PUT", n1, "/kv/" + key, {"value": "earlier"})[0] in (200, 201)
        cluster.hears = lambda listener, speaker: True
        cluster.introduce()
        if read:
            code, body = cluster.request("GET", n3, "/kv/" + key)
            assert code == 200 and json.loads(body)["value"] == "earlier", body
            continue
        assert cluster.request("PUT", n3, "/kv/" + key, {"value": "later"})[0] in (200, 201)
        cluster.run(seconds=60)
        for node in cluster.nodes:
            code, body = cluster.request("GET", node, "/kv/" + key)
            assert json.loads(body)["value"] == "later", (node.node_id, body)


def test_a_left_out_node_does_not_bring_back_rings_of_a_change_that_settled_long_ago():
    """
    If a node's ring settled long ago (its previous rings not yet cleared: nothing asked for them since) and a
    peer then names its ring without it, then the previous rings are that ring alone, not the settled change's
    rings before it.
    """
    from kvresponder.ring import members_digest

    from .support import MemoryCluster

    cluster = MemoryCluster(4)
    cluster.run(seconds=40)
    n1, n2, n3, n4 = cluster.nodes
    cluster.kill(n4)
    cluster.run(seconds=n1.settings.peer_timeout + 120)
    assert not n1.ring_settling()
    n1.membership.observe(n2.heartbeat()._replace(ring_digest=members_digest({"n2", "n3"})))
    assert [sorted(ring.nodes) for ring in n1.previous_rings()] == [["n2", "n3"]]
