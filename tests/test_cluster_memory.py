"""
Several nodes in one process, on task.Clock, calling each other through StubTreq: replication, failover,
read repair, hinted handoff, re-replication, join, anti-entropy and drain.
"""

import json

import pytest
from eliot import add_destinations, remove_destination
from twisted.internet.task import Clock, deferLater

from kvresponder.node import JOIN_WAIT_INTERVALS, Node
from kvresponder.rebalance import SETTLE_MS
from kvresponder.ring import HashRing
from kvresponder.store import Entry

from .support import MemoryCluster, build_root, make_settings


def holders(cluster, key):
    return sorted(node.node_id for node in cluster.nodes
                  if node.node_id not in cluster.down and node.store.get(key) is not None)


def copies(cluster):
    return sum(len(node.store) for node in cluster.nodes if node.node_id not in cluster.down)


def put(cluster, node, key, value):
    return cluster.request("PUT", node, "/kv/" + key, {"value": value})


def get(cluster, node, key):
    return cluster.request("GET", node, "/kv/" + key)


def bulk_get(cluster, node, key):
    """
    A read of ``key`` in a bulk get, as a single read answers it: 200 and the value, 404 for a miss, 503 for
    ``{"error": "unavailable"}``.
    """
    code, body = cluster.request("POST", node, "/bulk", {"get": [key]})
    assert code == 200, body
    found = json.loads(body)["get"][key]
    if found is None:
        return 404, b""
    if found == {"error": "unavailable"}:
        return 503, b""
    return 200, json.dumps(found).encode("utf-8")


@pytest.fixture
def cluster():
    c = MemoryCluster(3)
    c.run(seconds=1)
    assert all(node.state == "ready" for node in c.nodes)
    return c


def test_a_write_is_stored_on_replication_factor_nodes_and_readable_everywhere(cluster):
    """
    If keys are written through one node, then each is on exactly 2 nodes and readable through every node.
    """
    keys = ["key-%d" % (i,) for i in range(40)]
    for key in keys:
        assert put(cluster, cluster.nodes[0], key, key)[0] == 201
    for key in keys:
        assert len(holders(cluster, key)) == 2, key
        assert holders(cluster, key) == sorted(cluster.nodes[0].ring().preference_list(key, 2))
        for node in cluster.nodes:
            code, body = get(cluster, node, key)
            assert code == 200, (node.node_id, key)
    assert copies(cluster) == 2 * len(keys)


def test_a_replaced_key_answers_200(cluster):
    put(cluster, cluster.nodes[0], "k", 1)
    assert put(cluster, cluster.nodes[1], "k", 2)[0] == 200
    assert b'"value":2' in get(cluster, cluster.nodes[2], "k")[1]


def test_a_stale_replica_is_repaired_by_a_read(cluster):
    """
    If one replica holds an older version, then a read coordinated by a node that does not own the key
    answers the newest and repairs the stale one.
    """
    put(cluster, cluster.nodes[0], "k", "new")
    first, second = [node for node in cluster.nodes if node.node_id in holders(cluster, "k")]
    [coordinator] = [node for node in cluster.nodes if node not in (first, second)]
    newest = first.store.current("k")
    second.store.forget("k", newest.version)
    second.store.apply(Entry("k", b'"old"', (1, 0, "n9")))
    code, body = get(cluster, coordinator, "k")
    assert code == 200 and b'"new"' in body
    cluster.run(seconds=0.5)
    assert second.store.get("k").value == b'"new"'


def test_an_owner_holding_the_key_answers_from_its_own_copy_once_the_ring_has_settled(cluster):
    """
    If the coordinator owns the key and holds it, and the ring has settled, then it answers without asking the
    other replicas (while the ring settles, it asks them: its copy may be older than one on its way to it).
    """
    for _ in range(60):
        if not any(node.ring_settling() for node in cluster.nodes):
            break
        cluster.run(seconds=1)
    assert not any(node.ring_settling() for node in cluster.nodes)
    put(cluster, cluster.nodes[0], "k", "v")
    owner = [node for node in cluster.nodes if node.node_id in holders(cluster, "k")][0]
    calls = []
    original = owner.peers.transport.call

    async def counting(peer, op, *args, **kwargs):
        calls.append(op)
        return await original(peer, op, *args, **kwargs)
    owner.peers.transport.call = counting
    code, body = get(cluster, owner, "k")
    assert code == 200 and b'"v"' in body
    assert calls == []
    owner.store.forget("k", owner.store.current("k").version)
    assert get(cluster, owner, "k")[0] == 200
    assert calls == ["get"]


def test_a_dead_owner_fails_over_at_once_and_its_copy_is_hinted(cluster):
    """
    If an owner stops answering before anyone notices, then writes still succeed at once (the next node on
    the ring takes a hint), reads still find every key, and the hint goes home when the owner returns.
    """
    victim = cluster.nodes[1]
    cluster.kill(victim)
    keys = ["key-%d" % (i,) for i in range(30)]
    for key in keys:
        assert put(cluster, cluster.nodes[0], key, key)[0] == 201
        assert get(cluster, cluster.nodes[2], key)[0] == 200
    hinted = [key for key in keys if "n2" in cluster.nodes[0].ring().preference_list(key, 2)]
    assert hinted, "no key had the dead node as owner"
    for key in hinted:
        assert holders(cluster, key) == ["n1", "n3"]

    # The owner comes back (same incarnation: it never left the ring), and the hint holders hand back.
    cluster.down.discard(victim.node_id)
    cluster.router.roots[b"10.0.0.2:3000"] = __import__("kvresponder.http.root", fromlist=["x"]).build_root(victim)
    victim.start()
    for node in cluster.nodes:
        node.rebalancer.run_pass("test")
    cluster.run(seconds=2)
    for key in keys:
        assert holders(cluster, key) == sorted(cluster.nodes[0].ring().preference_list(key, 2)), key
    assert copies(cluster) == 2 * len(keys)


def test_a_dead_node_is_re_replicated(cluster):
    """
    If a node dies and is declared dead, then the survivors restore 2 copies of every key.
    """
    keys = ["key-%d" % (i,) for i in range(60)]
    for key in keys:
        put(cluster, cluster.nodes[0], key, key)
    cluster.kill(cluster.nodes[2])
    cluster.run(seconds=cluster.nodes[0].settings.peer_timeout + 3)
    survivors = [node for node in cluster.nodes if node.node_id not in cluster.down]
    assert all(len(node.ring()) == 2 for node in survivors)
    for key in keys:
        assert holders(cluster, key) == ["n1", "n2"], key
    assert sum(node.metrics.rereplication_entries.labels("t1", "sent")._value.get() for node in survivors) > 0


def test_a_joining_node_receives_its_share(cluster):
    """
    If a fourth node joins, then it is sent the keys it now owns, the old holders drop theirs, and the
    total stays 2 copies per key.
    """
    keys = ["key-%d" % (i,) for i in range(200)]
    for key in keys:
        put(cluster, cluster.nodes[0], key, key)
    newcomer = cluster.add()
    cluster.run(seconds=3)
    assert newcomer.state == "ready"
    owned = [key for key in keys if "n4" in newcomer.ring().preference_list(key, 2)]
    assert len(owned) > 40
    assert all(newcomer.store.get(key) is not None for key in owned)
    assert copies(cluster) == 2 * len(keys)
    for key in keys:
        assert holders(cluster, key) == sorted(newcomer.ring().preference_list(key, 2))


def test_anti_entropy_converges_replicas_by_last_writer_wins(cluster):
    """
    If replicas diverge (a write that reached only one of them), then an anti-entropy pass brings the other
    the newest version, and a tombstone wins over an older value.
    """
    put(cluster, cluster.nodes[0], "k", "v1")
    put(cluster, cluster.nodes[0], "gone", "v1")
    first, second = [node for node in cluster.nodes if node.node_id in holders(cluster, "k")]
    first.store.apply(Entry("k", b'"v2"', first.hlc.now()))
    owner_of_gone = [node for node in cluster.nodes if node.node_id in holders(cluster, "gone")][0]
    owner_of_gone.store.apply(Entry("gone", None, owner_of_gone.hlc.now()))
    cluster.run(seconds=SETTLE_MS / 1000 + 0.5)
    for node in cluster.nodes:
        node.rebalancer.run_pass("anti-entropy")
    cluster.run(seconds=2)
    assert second.store.get("k").value == b'"v2"'
    assert holders(cluster, "gone") == []
    assert get(cluster, cluster.nodes[2], "gone")[0] == 404


def test_anti_entropy_leaves_a_fresh_write_to_the_write_path_and_repairs_it_once_it_has_settled(cluster):
    """
    A divergence younger than SETTLE_MS may be a copy still on its way: a pass skips it, and the first pass
    after it settles repairs it.
    """
    put(cluster, cluster.nodes[0], "k", "v1")
    first, second = [node for node in cluster.nodes if node.node_id in holders(cluster, "k")]
    first.store.apply(Entry("k", b'"v2"', first.hlc.now()))
    for node in cluster.nodes:
        node.rebalancer.run_pass("anti-entropy")
    cluster.run(seconds=1)
    assert second.store.get("k").value == b'"v1"'
    cluster.run(seconds=SETTLE_MS / 1000)
    for node in cluster.nodes:
        node.rebalancer.run_pass("anti-entropy")
    cluster.run(seconds=2)
    assert second.store.get("k").value == b'"v2"'


def test_anti_entropy_repairs_a_version_stamped_far_ahead_of_the_clock_at_once(cluster):
    """
    A version whose wall time is more than SETTLE_MS ahead of the clock (a node whose clock ran ahead) is not
    a write in flight: a pass repairs it, rather than wait for the clock to catch up.
    """
    put(cluster, cluster.nodes[0], "k", "v1")
    first, second = [node for node in cluster.nodes if node.node_id in holders(cluster, "k")]
    ahead = (int(cluster.clock.seconds() * 1000) + 3600 * 1000, 0, first.node_id)
    first.store.apply(Entry("k", b'"v2"', ahead))
    for node in cluster.nodes:
        node.rebalancer.run_pass("anti-entropy")
    cluster.run(seconds=2)
    assert second.store.get("k").value == b'"v2"'


def test_a_draining_node_hands_everything_off(cluster):
    """
    If a node drains, then it ends empty and every key still has 2 copies on the others.
    """
    keys = ["key-%d" % (i,) for i in range(80)]
    for key in keys:
        put(cluster, cluster.nodes[0], key, key)
    leaver = cluster.nodes[2]
    remaining = cluster.run(leaver.drain(), seconds=20)
    assert remaining == 0
    assert len(leaver.store) == 0
    others = cluster.nodes[:2]
    for key in keys:
        assert sorted(node.node_id for node in others if node.store.get(key) is not None) == ["n1", "n2"], key


def test_write_quorum_unmet_is_503():
    """
    If fewer nodes than WRITE_QUORUM can store a write, then the answer is 503 with a clear message.
    """
    cluster = MemoryCluster(2, write_quorum=2)
    cluster.run(seconds=1)
    cluster.kill(cluster.nodes[1])
    code, body = put(cluster, cluster.nodes[0], "k", 1)
    assert code == 503
    assert b"copies" in body


def test_listing_spans_the_cluster_without_duplicates(cluster):
    keys = sorted("key-%02d" % (i,) for i in range(30))
    for key in keys:
        put(cluster, cluster.nodes[0], key, key)
    cluster.request("DELETE", cluster.nodes[1], "/kv/key-05")
    seen, cursor = [], None
    while True:
        import json
        code, body = cluster.request("GET", cluster.nodes[2], "/kv?limit=7" + ("&cursor=" + cursor if cursor else ""))
        body = json.loads(body)
        seen.extend(body["keys"])
        cursor = body["next"]
        if not cursor:
            break
    assert seen == [key for key in keys if key != "key-05"]


def test_a_node_that_does_not_own_a_key_answers_a_read_from_its_owners_not_from_a_copy_of_its_own(cluster):
    """
    If a node that is not among a key's owners holds an older copy of it (a hint not yet handed back, a copy
    from before a ring change), then a read through it answers the owners' newer value, single or in a bulk
    get, and a delete's tombstone on the owners makes it 404.
    """
    n1 = cluster.nodes[0]
    key = next(k for k in ("nowner-%d" % i for i in range(1000)) if "n1" not in n1.ring().preference_list(k, 2))
    stale = n1.coordinator.hlc.now()
    assert put(cluster, cluster.nodes[1], key, "new")[0] == 201
    n1.store.apply(Entry(key, b'"old"', stale, None))
    assert json.loads(get(cluster, n1, key)[1])["value"] == "new"
    assert json.loads(bulk_get(cluster, n1, key)[1])["value"] == "new"
    assert cluster.request("DELETE", cluster.nodes[1], "/kv/" + key)[0] == 200
    n1.store.apply(Entry(key, b'"old"', stale, None))
    assert get(cluster, n1, key)[0] == 404


def test_a_listing_that_as_many_nodes_as_copies_do_not_answer_is_503_and_one_fewer_is_200(cluster):
    """
    If as many nodes as a key has copies (2) do not answer a listing, then it is 503: every copy of some keys may
    be on them, and a partial page would say those keys do not exist. With one node silent, every key still has
    a copy among those that answer, and the listing is whole.
    """
    n1, n2, n3 = cluster.nodes
    keys = ["list-%02d" % (i,) for i in range(20)]
    for key in keys:
        assert put(cluster, n1, key, 1)[0] == 201
    cluster.kill(n3)
    code, body = cluster.request("GET", n1, "/kv?prefix=list-")
    assert (code, json.loads(body)["keys"]) == (200, keys)
    cluster.kill(n2)
    code, body = cluster.request("GET", n1, "/kv?prefix=list-")
    assert (code, json.loads(body)["error"]) == (503, "unavailable"), body


def test_a_list_prefix_longer_than_any_key_finds_nothing_on_a_cluster_too(cluster):
    """
    If a listing's prefix is longer than any key can be, then a cluster answers an empty page, as one node does,
    not 503 because its peers refuse to list it.
    """
    put(cluster, cluster.nodes[0], "a" * 20, 1)
    for length in (1024, 1025, 3000):
        code, body = cluster.request("GET", cluster.nodes[0], "/kv?prefix=" + "a" * length)
        assert (code, json.loads(body)) == (200, {"keys": [], "count": 0, "next": None}), length


@pytest.mark.parametrize("get", [get, bulk_get], ids=["single", "bulk"])
def test_a_read_just_after_a_ring_change_finds_keys_still_on_their_previous_holder(cluster, get):
    """
    If the ring changed moments ago and a key's owners do not have it yet, then a read, single or in a bulk
    get, also asks the other nodes and finds it; once the ring has settled, owners alone answer.
    """
    put(cluster, cluster.nodes[0], "k", "v")
    owners = cluster.nodes[0].ring().preference_list("k", 2)
    [other] = [node for node in cluster.nodes if node.node_id not in owners]
    entry = [node for node in cluster.nodes if node.node_id in owners][0].store.current("k")
    for node in cluster.nodes:
        if node.node_id in owners:
            node.store.forget("k", entry.version)
    other.store.apply(entry)
    for node in cluster.nodes:
        node._rebuild_ring()
    code, body = get(cluster, cluster.nodes[0], "k")
    assert code == 200 and b'"v"' in body
    # Once settled (and the read repair above is undone), the non-owner is no longer consulted.
    for node in cluster.nodes:
        if node.node_id in owners:
            node.store.forget("k", entry.version)
    for node in cluster.nodes:
        node.ring_changed_at -= 60
        node.rebalancer.pending = 0
    assert get(cluster, cluster.nodes[0], "k")[0] == 404


@pytest.mark.parametrize("get", [get, bulk_get], ids=["single", "bulk"])
def test_a_read_with_every_owner_unreachable_is_unavailable_not_a_miss(cluster, get):
    """
    If every owner of a stored key is unreachable and the fallback holds no hint of it, then a read, single or
    in a bulk get, is unavailable (503, or ``{"error": "unavailable"}``): a fallback's "none" says nothing of
    the key, and a client must not take the key for a miss.
    """
    n1, n2, n3 = cluster.nodes
    key = next(key for key in ("key-%d" % i for i in range(10000))
               if n1.ring().preference_list(key, 2) == ["n1", "n2"])
    assert put(cluster, n1, key, "stored")[0] == 201
    for route in (b"10.0.0.1:3000", b"10.0.0.2:3000"):
        cluster.router.roots.pop(route)
    assert get(cluster, n3, key)[0] == 503


def test_bulk_through_a_cluster_answers_after_the_replicas(cluster):
    """
    If a bulk request needs peers (so it completes later), then the answer carries every result, not an
    empty page.
    """
    code, body = cluster.request("POST", cluster.nodes[0], "/bulk", {
        "put": [{"key": "b%d" % (i,), "value": i} for i in range(10)], "get": ["b1", "nope"]})
    assert code == 200, body
    body = json.loads(body)
    assert [item["status"] for item in body["put"]] == [201] * 10
    assert body["get"]["nope"] is None
    assert copies(cluster) == 20


def test_a_sync_request_answers_only_after_the_pass(cluster):
    """
    If a peer asks for a pass (a joining node), then the answer comes once the pass has run.
    """
    import json
    node = cluster.nodes[1]
    passes = node.rebalancer.passes
    code, body = cluster.request("POST", node, "/_internal/sync/request", {"from": "n1"})
    assert code == 200, body
    assert set(json.loads(body)) == {"handed_off", "repaired", "pending"}
    assert node.rebalancer.passes == passes + 1


def test_an_explicit_quorum_is_strict_even_for_a_node_alone():
    """
    If WRITE_QUORUM is set explicitly above 1 and the node is alone in its ring, then writes answer 503
    rather than being acknowledged with one copy.
    """
    cluster = MemoryCluster(1, write_quorum=2)
    cluster.run(seconds=1)
    code, body = put(cluster, cluster.nodes[0], "k", 1)
    assert code == 503


def test_the_default_quorum_lets_a_lone_node_acknowledge():
    cluster = MemoryCluster(1)
    cluster.run(seconds=1)
    assert put(cluster, cluster.nodes[0], "k", 1)[0] == 201


def test_concurrent_writes_to_a_peer_share_one_request(cluster):
    """
    If several writes are coordinated in the same reactor turn, then each peer receives them in one
    request, and every write still gets its own result.
    """
    from twisted.internet.defer import gatherResults
    node = cluster.nodes[0]
    calls = []
    original = node.peers.transport.call

    async def counting(peer, op, *args, **kwargs):
        calls.append((peer.node_id, op))
        return await original(peer, op, *args, **kwargs)
    node.peers.transport.call = counting
    keys = ["c%d" % (i,) for i in range(30)]
    results = cluster.run(gatherResults([node.coordinator.put(key, b"1", None) for key in keys]))
    assert [result.copies for result in results] == [2] * 30
    assert all(result.created for result in results)
    applies = [peer for peer, op in calls if op == "apply"]
    assert sorted(applies) == sorted(set(applies)), applies
    assert 1 <= len(applies) <= 2
    for key in keys:
        assert holders(cluster, key) == sorted(node.ring().preference_list(key, 2))


def _earlier_write_that_a_join_will_displace():
    """
    A 3-node cluster, n3's clock 0.4 s ahead (within the bound), and a key written "earlier" through n3 whose
    two owners (n2, n3) a fourth node's join replaces with n1 and n4.
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
    return cluster, key


def test_a_later_write_wins_over_an_earlier_one_across_a_join_that_replaces_every_owner_of_the_key():
    """
    If a write is acknowledged through a node whose clock is ahead (within MAX_CLOCK_OFFSET), a node joins and
    takes both owners' places for the key, and a second write is then made through a node whose clock is
    behind, then once the join's handoff has run every node answers the second write: it asked the previous
    owners, heard of the first write's version, and was stamped above it.
    """
    cluster, key = _earlier_write_that_a_join_will_displace()
    n1 = cluster.nodes[0]
    cluster.add()
    assert sorted(n1.ring().preference_list(key, 2)) == ["n1", "n4"]
    code, body = put(cluster, n1, key, "later")
    assert code == 200, body
    cluster.run(seconds=5.0)
    answers = {node.node_id: json.loads(get(cluster, node, key)[1]).get("value") for node in cluster.nodes}
    assert answers == dict.fromkeys(answers, "later"), answers


def test_a_later_write_through_one_of_two_nodes_joining_at_once_wins_over_an_earlier_one():
    """
    If a write is acknowledged through a node whose clock is ahead (within MAX_CLOCK_OFFSET), two nodes join at
    once (an autoscaler's step) and between them take both owners' places for the key, and a second write is
    then made through one of them, then once their hand-offs have run every node answers the second write: the
    joining node asked the owners of the ring before both joins, not those of its peers' ring with the other
    joining node in it, which holds nothing yet.
    """
    cluster = MemoryCluster(3, wall_offsets={3: 0.4})
    cluster.run(seconds=1.0)
    n1, n2, n3 = cluster.nodes
    vnodes = n1.settings.vnodes
    before = HashRing(["n1", "n2", "n3"], vnodes=vnodes)
    # The ring the first joining node would take for its peers' (itself left out, the other joining node in).
    peers_view = HashRing(["n1", "n2", "n3", "n5"], vnodes=vnodes)
    after = HashRing(["n1", "n2", "n3", "n4", "n5"], vnodes=vnodes)
    key = next(key for key in ("key-%d" % i for i in range(100000))
               if set(before.preference_list(key, 2)) == {"n2", "n3"}
               and not {"n2", "n3"} & set(peers_view.preference_list(key, 2))
               and not {"n2", "n3"} & set(after.preference_list(key, 2)))
    assert put(cluster, n3, key, "earlier")[0] == 201
    n4 = cluster.add()
    cluster.add()
    # Heartbeats, with no time for the hand-offs to run: for n4 to hear every peer name the ring with n5 in it,
    # and serve.
    cluster.introduce()
    cluster.introduce()
    assert sorted(n4.ring().nodes) == ["n1", "n2", "n3", "n4", "n5"]
    assert [holders(cluster, key), n4.state] == [["n2", "n3"], "joining"]
    code, body = put(cluster, n4, key, "later")
    assert code in (200, 201), body
    cluster.run(seconds=5.0)
    answers = {node.node_id: json.loads(get(cluster, node, key)[1]).get("value") for node in cluster.nodes}
    assert answers == dict.fromkeys(answers, "later"), answers


def test_a_joining_node_takes_peers_that_say_they_are_joining_out_of_the_ring_its_data_came_from():
    """
    If two nodes join at once, then each keeps among its previous rings its peers' ring without it and that
    ring without the other joining node too (whose heartbeats say it is joining) until the ring settles; a node
    that joins once they are ready keeps just its peers' ring.
    """
    cluster = _settled_cluster()
    n4 = cluster.add()
    cluster.add()
    assert _members(n4.previous_rings()) == [["n1", "n2", "n3", "n5"], ["n1", "n2", "n3"]]
    cluster.run(seconds=2.0)
    assert n4.state == "ready"
    assert _members(n4.previous_rings()) == [["n1", "n2", "n3", "n5"], ["n1", "n2", "n3"]]
    cluster.run(seconds=200.0)
    n6 = cluster.add()
    assert _members(n6.previous_rings()) == [["n1", "n2", "n3", "n4", "n5"]]


def _members(rings):
    return [sorted(ring.nodes) for ring in rings]


def _settled_cluster(**settings):
    cluster = MemoryCluster(3, **settings)
    cluster.run(seconds=40.0)
    assert all(node.previous_rings() == [] for node in cluster.nodes)
    return cluster


def test_a_ready_node_keeps_the_ring_a_join_replaced_until_the_ring_settles():
    """
    If a node joins, then a ready node keeps the ring the join replaced among its previous rings (its owners may
    still hold what the new owners lack) until the ring has settled; the joining node keeps none of the rings it
    built while it discovered its peers, which placed no data, but asks its peers' ring while it joins and until
    the ring settles.
    """
    cluster = _settled_cluster()
    n1 = cluster.nodes[0]
    n4 = cluster.add()
    assert _members(n1.previous_rings()) == [["n1", "n2", "n3"]]
    # While it joins, the joining node's one previous ring is its peers' ring without it, and it keeps that one
    # once ready, until the ring settles: a hand-off that did not reach it leaves earlier writes there.
    assert _members(n4.previous_rings()) == [["n1", "n2", "n3"]]
    cluster.run(seconds=2.0)
    assert n4.state == "ready" and _members(n4.previous_rings()) == [["n1", "n2", "n3"]]
    cluster.run(seconds=40.0)
    assert n1.previous_rings() == [] and n4.previous_rings() == []


def test_only_the_ring_in_force_remembers_where_keys_start_not_the_rings_kept_from_before():
    """
    If keys are written before and after a node joins, then the ring in force remembers where the written keys
    start, the ring the join replaced forgets what it remembered, and writes while the ring settles (which also
    look their keys up on that earlier ring, for its owners) leave nothing remembered there: a node keeps up to
    eight earlier rings, and each would otherwise hold up to ``PLACED_KEYS`` keys of its own.
    """
    cluster = _settled_cluster()
    n1 = cluster.nodes[0]
    for index in range(20):
        assert put(cluster, n1, "before-%d" % (index,), index)[0] in (200, 201)
    before = n1.ring()
    assert {"before-%d" % (index,) for index in range(20)} <= set(before._placed)
    cluster.add()
    assert _members(n1.previous_rings()) == [["n1", "n2", "n3"]] and n1.previous_rings()[0] is before
    for index in range(20):
        assert put(cluster, n1, "after-%d" % (index,), index)[0] in (200, 201)
    assert n1.ring_settling()
    assert before._placed == {}
    assert {"after-%d" % (index,) for index in range(20)} <= set(n1.ring()._placed)


def test_the_ring_a_join_replaced_is_dropped_once_every_node_has_handed_off_not_after_the_settle_time():
    """
    If a node joins a settled cluster, then the others keep the ring it replaced until every node, the joiner
    included, has said in its heartbeats that it has handed off under the new ring: seconds, not the 30 s a ring
    change settles for at most. A node tells its listeners once, when it has handed off.
    """
    cluster = _settled_cluster()
    n1 = cluster.nodes[0]
    told = []
    n1.subscribe_settled(lambda: told.append(sorted(n1.ring().nodes)))
    n4 = cluster.add()
    cluster.run(seconds=2.0)
    assert n1.ring_settling() and _members(n1.previous_rings()) == [["n1", "n2", "n3"]]
    assert n1.heartbeat().settled is None
    cluster.run(seconds=8.0)
    assert not any(node.ring_settling() for node in cluster.nodes)
    assert n1.previous_rings() == [] and n4.previous_rings() == []
    assert n1.heartbeat().settled == n1.ring().digest
    assert told == [["n1", "n2", "n3", "n4"]]


def test_a_node_that_has_drained_says_so_and_the_others_settle_without_waiting_for_it_to_time_out():
    """
    If a node drains its store empty and exits, then its last heartbeats say it has handed off, and the other
    nodes' ring settles in seconds, not once its silence has lasted PEER_TIMEOUT (15 s here, as at the
    default 5 s heartbeats): it no longer holds anything the ring places elsewhere, and takes no copies while it
    leaves.
    """
    cluster = _settled_cluster(peer_timeout=15)
    n1, _, n3 = cluster.nodes
    for index in range(40):
        assert put(cluster, n1, "key-%d" % (index,), index)[0] in (200, 201)
    # It says it leaves, at once, as the service announces it, then drains.
    n3.begin_leaving()
    cluster.introduce()
    cluster.run(seconds=0.5)
    assert cluster.run(n3.drain(), seconds=20) == 0
    cluster.run(seconds=1.0)
    assert n3.heartbeat().settled == n3.ring().digest == n1.ring().digest
    # The process exits: nothing more is heard from it.
    cluster.kill(n3)
    assert n1.ring_settling()
    cluster.run(seconds=8.0)
    assert "n3" in {peer.node_id for peer in n1.membership.peers()}
    assert not any(node.ring_settling() for node in cluster.nodes[:2])


def test_a_drained_nodes_claim_counts_even_when_first_heard_with_its_leaving():
    """
    If the first heartbeat the others hear from a leaving node already says it has drained (the one that said
    it leaves was lost, or the drain had nothing to do), then its claim still counts: a leaving node says so
    only while its store is empty, whenever it began to.
    """
    cluster = _settled_cluster(peer_timeout=15)
    n1, _, n3 = cluster.nodes
    n3.begin_leaving()
    assert cluster.run(n3.drain(), seconds=20) == 0
    assert n3.heartbeat().settled is not None
    cluster.introduce()
    cluster.run(seconds=1.0)
    cluster.kill(n3)
    cluster.run(seconds=8.0)
    assert "n3" in {peer.node_id for peer in n1.membership.peers()}
    assert not any(node.ring_settling() for node in cluster.nodes[:2])


def test_a_read_begun_before_a_node_left_repairs_nothing_into_it_once_drained():
    """
    If a read through a node that owns the key but lacks it is still asking the other owner when the node
    begins to leave and drains (at once: its store is empty), then the answer's read repair is not stored on
    the leaving node: it would leave with the process, and the node says it has drained.
    """
    cluster = _settled_cluster(peer_timeout=15)
    n1, n2, n3 = cluster.nodes
    key = next(key for key in ("k%d" % (index,) for index in range(1000)) if "n3" in n3.ring().preference_list(key, 2))
    [other] = [node for node in (n1, n2) if node.node_id in n3.ring().preference_list(key, 2)]
    other.coordinator.apply_local(Entry(key, b'"v"', other.hlc.now(), None))
    assert len(n3.store) == 0
    read = n3.coordinator.get(key)
    n3.begin_leaving()
    assert cluster.run(n3.drain(), seconds=1.0) == 0
    assert cluster.run(read, seconds=5.0).value == b'"v"'
    cluster.run(seconds=1.0)
    assert len(n3.store) == 0
    # Not tried, so not counted as a repair that failed.
    assert n3.metrics._stats.replication.get(("repair", "failure"), 0) == 0
    assert n3.heartbeat().settled == n3.ring().digest
    # Were anything to get in all the same, the claim would be withdrawn with it.
    n3.store.apply(Entry("stray", b'"x"', n3.hlc.now(), None))
    assert n3.heartbeat().settled is None


def test_a_node_whose_drain_left_entries_behind_does_not_say_it_has_handed_off():
    """
    If a node's drain ends with entries it could not hand off (its peers unreachable), then its heartbeats do
    not say it has handed off: the others settle only once it has timed out, or after the settle time.
    """
    cluster = _settled_cluster()
    n1, n2, n3 = cluster.nodes
    for index in range(40):
        assert put(cluster, n1, "key-%d" % (index,), index)[0] in (200, 201)
    held = len(n3.store)
    assert held > 0
    for node in (n1, n2):
        cluster.kill(node)
    assert cluster.run(n3.drain(), seconds=40) == held
    assert n3.heartbeat().settled is None


def test_a_peer_that_never_says_it_has_handed_off_keeps_the_ring_settling_for_the_settle_time():
    """
    If one node's heartbeats never say it has handed off (a node older than that field, in a rolling upgrade),
    then the others keep the ring a join replaced for the whole 30 s, as before the field.
    """
    cluster = _settled_cluster()
    cluster.older.add("n2")
    n1 = cluster.nodes[0]
    cluster.add()
    cluster.run(seconds=25.0)
    assert n1.heartbeat().settled == n1.ring().digest
    assert n1.ring_settling() and _members(n1.previous_rings()) == [["n1", "n2", "n3"]]
    cluster.run(seconds=6.0)
    assert not n1.ring_settling() and n1.previous_rings() == []


class _SlowHandOff:
    """
    A node's peer client whose first hand-off of ``key`` to each peer takes ``delay`` seconds more (a large
    batch, or a slow peer: a hand-off may take up to max(PEER_REQUEST_TIMEOUT, 10 s)). Put in place of the
    rebalancer's client: the test reaches into it, there being no other seam for a slow hand-off.
    """

    def __init__(self, real, clock, key, delay):
        self._real, self._clock, self._key, self._delay, self._done = real, clock, key, delay, set()

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def apply(self, peer, batch, timeout=None):
        if peer.node_id not in self._done and any(entry.key == self._key for entry in batch):
            self._done.add(peer.node_id)
            await deferLater(self._clock, self._delay, lambda: None)
        return await self._real.apply(peer, batch, timeout=timeout)


def _key_moved_twice():
    """
    A key owned by n4 and n5; by two other nodes once n5 is gone; by neither of those once n6 joins.
    """
    before, without_n5, with_n6 = (HashRing(["n1", "n2", "n3", "n4", "n5"]), HashRing(["n1", "n2", "n3", "n4"]),
                                   HashRing(["n1", "n2", "n3", "n4", "n6"]))
    return next(key for key in ("key-%d" % (i,) for i in range(100000))
                if set(before.preference_list(key, 2)) == {"n4", "n5"}
                and not set(before.preference_list(key, 2)) & set(without_n5.preference_list(key, 2))
                and not set(without_n5.preference_list(key, 2)) & set(with_n6.preference_list(key, 2)))


def _death_then_join_with_a_slow_hand_off():
    """
    n5 dies: the ring without it moves the key from {n4, n5} to two other nodes, to which n4's pass hands it,
    slowly; n6 joins meanwhile, whose ring gives the key to neither of them. They must not say they have
    handed off under the new ring before n4's pass under the one before has brought them the key.
    """
    cluster = MemoryCluster(5, anti_entropy_interval=100)
    cluster.run(seconds=40.0)
    key = _key_moved_twice()
    n1, n2, n3, n4, n5 = cluster.nodes
    assert put(cluster, n1, key, "earlier")[0] == 201
    assert holders(cluster, key) == ["n4", "n5"]
    n4.rebalancer._peers = _SlowHandOff(n4.peers, cluster.clock, key, 8.0)
    cluster.kill(n5)
    cluster.run(seconds=4.0)
    assert sorted(n1.ring().nodes) == ["n1", "n2", "n3", "n4"]
    cluster.add()
    cluster.run(seconds=14.0)
    return cluster, key


def test_a_key_a_pass_under_the_ring_before_hands_on_late_is_still_found_by_a_read():
    """
    If a pass under the ring before the last change is still handing a key to nodes that the new ring does not
    make its owners (a death, then a join, and a slow hand-off), then no node takes the ring as settled before
    that pass is done and those nodes have handed the key on: a read through any node finds it.
    """
    cluster, key = _death_then_join_with_a_slow_hand_off()
    code, body = get(cluster, cluster.nodes[2], key)
    assert code == 200, (code, body, holders(cluster, key))
    assert json.loads(body)["value"] == "earlier"


def test_a_write_with_a_ttl_after_a_late_hand_off_is_not_undone_by_the_older_copy():
    """
    If a key that a pass under the ring before hands on late is written again with a TTL, then once that write
    expires the key stays gone: the older copy the late hand-off left does not come back.
    """
    cluster, key = _death_then_join_with_a_slow_hand_off()
    code, _ = cluster.request("PUT", cluster.nodes[2], "/kv/" + key, {"value": "later", "ttl": 2})
    assert code in (200, 201)
    cluster.run(seconds=110.0)
    code, body = get(cluster, cluster.nodes[2], key)
    assert code == 404, (code, body, holders(cluster, key))


class _LossyCluster(MemoryCluster):
    """
    A memory cluster in which the heartbeats of some senders to some receivers are lost (``lost``: pairs of
    receiver and sender ids).
    """

    lost = frozenset()

    def introduce(self):
        for node in self.nodes:
            if node.node_id in self.down:
                continue
            for other in self.nodes:
                if other is node or other.node_id in self.down or (node.node_id, other.node_id) in self.lost:
                    continue
                node.membership.observe(other.heartbeat())
                node.clock_offsets.heard(other.node_id, other.incarnation, other.wall() - node.wall())
            node.membership.expire()


def test_a_ring_that_comes_back_does_not_count_the_peers_claims_from_before_it_went():
    """
    If n1 alone stops hearing n4 for a while (its ring goes without n4 and comes back), and a write through it
    meanwhile lands on owners the ring with n4 does not name, then n1 does not take the ring as settled on its
    peers' claims from before (they never changed ring, and hold that write without knowing it): a read through
    n1 finds the key.
    """
    with_n4, without_n4 = HashRing(["n1", "n2", "n3", "n4"]), HashRing(["n1", "n2", "n3"])
    key = next(key for key in ("key-%d" % (i,) for i in range(100000))
               if set(with_n4.preference_list(key, 2)) == {"n1", "n4"}
               and set(without_n4.preference_list(key, 2)) == {"n2", "n3"})
    cluster = _LossyCluster(4, anti_entropy_interval=100)
    cluster.run(seconds=40.0)
    n1 = cluster.nodes[0]
    cluster.lost = {("n1", "n4")}
    cluster.run(seconds=3.6)
    assert sorted(n1.ring().nodes) == ["n1", "n2", "n3"]
    assert put(cluster, n1, key, "during")[0] == 201
    cluster.lost = frozenset()
    cluster.run(seconds=1.0)
    # Its own claim from before went with the ring: the ring back is a change, with a pass of its own to come.
    assert sorted(n1.ring().nodes) == ["n1", "n2", "n3", "n4"] and n1.heartbeat().settled is None
    cluster.run(seconds=7.0)
    code, body = get(cluster, n1, key)
    assert code == 200, (code, body, n1.ring_settling(), holders(cluster, key))


def _holding_a_key_it_does_not_own_after_a_join():
    """
    A cluster a fourth node has just joined, and its n1, which holds a key it does not own that arrived after
    the change's pass (a hint, say): n1's settle pass must hand it off.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=40.0)
    n1 = cluster.nodes[0]
    cluster.add()
    cluster.run(seconds=1.0)
    ring = n1.ring()
    key = next(key for key in ("key-%d" % (i,) for i in range(1000)) if "n1" not in ring.preference_list(key, 2))
    n1.store.apply(Entry(key, b'"x"', n1.hlc.now(), None))
    return cluster, n1, key


def test_a_settle_pass_that_fails_does_not_count_as_one_that_left_nothing_to_hand_off():
    """
    If the pass a node runs to settle raises unexpectedly, then the node does not say it has handed off: the
    entry it holds and does not own is still there.
    """
    cluster, n1, key = _holding_a_key_it_does_not_own_after_a_join()
    real = n1.rebalancer._pass

    async def failing(reason):
        if reason == "settle":
            raise RuntimeError("an unexpected error in the pass")
        return await real(reason)

    n1.rebalancer._pass = failing
    cluster.run(seconds=8.0)
    assert n1.store.get(key) is not None
    assert n1.heartbeat().settled is None


def test_a_settle_pass_that_cannot_hand_an_entry_off_does_not_say_it_has_handed_off():
    """
    If the pass a node runs to settle cannot hand an entry it does not own to its owners (their calls fail),
    then the node does not say it has handed off, and the ring stays settling while the entry waits.
    """
    from kvresponder.peers import PeerError

    class Refusing:
        def __init__(self, real, key):
            self._real, self._key = real, key

        def __getattr__(self, name):
            return getattr(self._real, name)

        async def apply(self, peer, batch, timeout=None):
            if any(entry.key == self._key for entry in batch):
                raise PeerError("refused, for the test")
            return await self._real.apply(peer, batch, timeout=timeout)

    cluster, n1, key = _holding_a_key_it_does_not_own_after_a_join()
    n1.rebalancer._peers = Refusing(n1.peers, key)
    cluster.run(seconds=8.0)
    assert n1.store.get(key) is not None
    assert n1.heartbeat().settled is None and n1.ring_settling()


def test_a_joiner_whose_share_comes_after_its_peers_have_handed_off_still_takes_the_ring_as_settled_early():
    """
    If a joining node gets one peer's share late (a large share), so that its other peers have handed off and
    said so before it is ready, then it still counts their claims once it is ready (they were made after its
    ring last changed), and the whole cluster, the joiner included, settles well before the 30 s.
    """
    cluster = _settled_cluster()
    n4 = cluster.add()
    real = n4.peers.request_sync

    async def slow(peer, sender, timeout):
        if peer.node_id == "n3":
            await deferLater(cluster.clock, 8.0, lambda: None)
        return await real(peer, sender, timeout)

    # The join's first step waits a moment before it asks for the shares: in time to slow one down.
    n4.peers.request_sync = slow
    cluster.run(seconds=5.0)
    assert n4.state == "joining"
    cluster.run(seconds=14.0)
    assert n4.state == "ready"
    assert [node.node_id for node in cluster.nodes if node.ring_settling()] == []


def test_a_node_alone_says_it_has_handed_off_without_walking_its_store():
    """
    If a node serves alone, then it says it has handed off under its ring of one without a pass over its store:
    the ring places every key on it, and a walk would copy every value out of the store for nothing (a single
    node holding 200 values of 1 MiB grew by their copies).
    """
    cluster = MemoryCluster(1)
    cluster.run(seconds=10.0)
    n1 = cluster.nodes[0]
    assert n1.heartbeat().settled == n1.ring().digest
    assert n1.rebalancer.passes == 0


def test_with_a_clock_bound_over_half_the_settle_time_the_previous_rings_are_kept_for_twice_the_bound():
    """
    If MAX_CLOCK_OFFSET is 20 s (the most it may be), then a ready node keeps the ring a join replaced for 40 s,
    not 30: an earlier write on its previous owners alone may be stamped that far ahead, and a later write must ask
    them until then.
    """
    cluster = MemoryCluster(3, max_clock_offset="20")
    cluster.run(seconds=50.0)
    n1 = cluster.nodes[0]
    assert n1.previous_rings() == []
    cluster.add()
    cluster.run(seconds=36.0)
    assert _members(n1.previous_rings()) == [["n1", "n2", "n3"]]
    cluster.run(seconds=8.0)
    assert n1.previous_rings() == []


def test_a_peer_restarting_at_the_same_place_in_the_ring_adds_no_previous_ring():
    """
    If a peer comes back with a new incarnation (the ring's members unchanged), then no previous ring is kept
    for it: the owners are the same.
    """
    from kvresponder.membership import Heartbeat

    cluster = _settled_cluster()
    n1, n2 = cluster.nodes[:2]
    beat = n2.heartbeat()
    n1.membership.observe(Heartbeat(beat.node_id, beat.incarnation + 1, beat.address, beat.port, beat.state,
                                    beat.ring_size))
    assert n1.previous_rings() == []


def test_past_its_bound_a_node_keeps_the_last_settled_ring_and_the_latest_ones():
    """
    If the ring changes more often within one settling than the previous rings kept (a long rolling restart),
    then the ring in force when it last settled stays first, and the latest rings follow it.
    """
    from kvresponder.membership import Heartbeat
    from kvresponder.node import MAX_PREVIOUS_RINGS

    cluster = _settled_cluster()
    n1 = cluster.nodes[0]
    joined = ["p%02d" % (i,) for i in range(MAX_PREVIOUS_RINGS + 3)]
    for index, peer in enumerate(joined):
        n1.membership.observe(Heartbeat(peer, 1, "10.0.1.%d" % (index + 1,), 3000, "alive", 3))
    rings = _members(n1.previous_rings())
    assert len(rings) == MAX_PREVIOUS_RINGS
    assert rings[0] == ["n1", "n2", "n3"]
    # The ring before the last join, and the ones before it.
    assert rings[-1] == sorted(["n1", "n2", "n3"] + joined[:-1])
    assert rings[1] == sorted(["n1", "n2", "n3"] + joined[:len(joined) - MAX_PREVIOUS_RINGS + 1])


# -- a node that joins: the owners its join displaced, and its first moments ----------------------------------


def test_a_later_write_through_the_joining_node_wins_over_an_earlier_one_the_join_displaced():
    """
    If a write is acknowledged through n3 (clock 0.4 s ahead, within the bound), n4 joins and takes both owners'
    places for the key, and a second write is then made through n4 itself while it joins (kv requests are served
    in every state), then once the join's handoff has run every node answers the second write: the joining node
    asked its peers' ring for the key's version.
    """
    cluster, key = _earlier_write_that_a_join_will_displace()
    n4 = cluster.add()
    assert n4.state == "joining"
    assert sorted(n4.ring().preference_list(key, 2)) == ["n1", "n4"]
    code, body = put(cluster, n4, key, "later")
    assert code == 200, body  # replaced: the earlier write is held (by the previous owners)
    cluster.run(seconds=5.0)
    answers = {node.node_id: json.loads(get(cluster, node, key)[1]).get("value") for node in cluster.nodes}
    assert answers == dict.fromkeys(answers, "later"), answers


def _start_unheard(cluster: MemoryCluster) -> Node:
    """
    Start n4 as ``MemoryCluster.add`` does, but before any heartbeat reaches it or its peers (the first
    moments of a pod: its port is open, and the answers to its first heartbeat have not come yet).
    """
    index = len(cluster.nodes) + 1
    settings = make_settings(cluster.tenant, "n%d" % (index,), advertise_address="10.0.0.%d" % (index,),
                             port="3000", **cluster.settings)
    node = Node(settings, cluster.clock, cluster.stub, join_settle=0.1)
    cluster.router.roots[b"10.0.0.%d:3000" % (index,)] = build_root(node)
    cluster.nodes.append(node)
    node.start()
    return node


def test_a_starting_node_that_heard_no_peer_refuses_writes_rather_than_lose_them_to_an_earlier_one():
    """
    If a key is written through n3 (clock 0.4 s ahead, within the bound) and then, later in real time, through
    n4 in its first moments (joining, no peer heard yet: a cluster of one in its own eyes), then n4 answers 503
    rather than acknowledge a write with its one copy that the earlier one would replace; once it has heard its
    peers, the same write through it is acknowledged, and every node answers it.
    """
    cluster = MemoryCluster(3, wall_offsets={3: 0.4})
    cluster.run(seconds=1.0)
    n3 = cluster.nodes[2]
    assert put(cluster, n3, "k", "earlier")[0] == 201
    n4 = _start_unheard(cluster)
    assert n4.state == "joining" and len(n4.ring()) == 1
    code, body = put(cluster, n4, "k", "later")
    assert code == 503 and json.loads(body)["error"] == "unavailable", (code, body)
    cluster.introduce()
    cluster.run(seconds=5.0)
    assert put(cluster, n4, "k", "later")[0] == 200
    answers = {node.node_id: json.loads(get(cluster, node, "k")[1]).get("value") for node in cluster.nodes}
    assert answers == dict.fromkeys(answers, "later"), answers


def test_a_joining_node_that_heard_only_some_of_its_peers_refuses_writes_rather_than_lose_them():
    """
    If a key is written through n3 (clock 0.4 s ahead) whose owners n2 and n3 a fourth node's join replaces,
    and n4 has heard only n1 when a later write of the key comes through it (the answers to its first heartbeat
    arrive one by one), then n4 answers 503: its peers' ring as it knows it so far ({n1}) would not ask the
    owners that hold the earlier write, which would win. Once it has heard them all, the write is taken, and
    every node answers it.
    """
    cluster, key = _earlier_write_that_a_join_will_displace()
    n1 = cluster.nodes[0]
    n4 = _start_unheard(cluster)
    n4.membership.observe(n1.heartbeat())
    assert n4.state == "joining" and sorted(n4.ring().nodes) == ["n1", "n4"]
    code, body = put(cluster, n4, key, "later")
    assert code == 503 and json.loads(body)["error"] == "unavailable", (code, body)
    for peer in cluster.nodes[1:3]:
        n4.membership.observe(peer.heartbeat())
    code, body = put(cluster, n4, key, "later")
    assert code == 200, (code, body)  # replaced, as above
    cluster.run(seconds=5.0)
    answers = {node.node_id: json.loads(get(cluster, node, key)[1]).get("value") for node in cluster.nodes}
    assert answers == dict.fromkeys(answers, "later"), answers


def test_a_join_waits_a_while_for_the_peers_it_has_not_heard_yet():
    """
    If a joining node has heard one peer of three when its settling time ends (the others' answers lost), then
    it stays joining and refuses kv requests until it has heard them, for up to three heartbeat intervals; a
    peer whose ring never matches does not keep it joining past that.
    """
    from kvresponder.node import JOIN_WAIT_INTERVALS

    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n1, n2, n3 = cluster.nodes
    n4 = _start_unheard(cluster)
    n4.membership.observe(n1.heartbeat())
    _turn(cluster, n4.join_settle + 0.2)
    assert n4.state == "joining" and n4.unjoined()
    for peer in (n2, n3):
        n4.membership.observe(peer.heartbeat())
    assert not n4.unjoined()
    _hear_each_other(n4, (n1, n2, n3))
    _turn(cluster, 1.0)
    assert n4.state == "ready"

    # A peer that names a ring n5 can never match: once the wait is over, n5 serves kv requests and is ready all
    # the same, and says which peers did not match.
    n5 = _start_unheard(cluster)
    n5.membership.observe(n1.heartbeat()._replace(ring_digest="0" * 16))
    _turn(cluster, n5.join_settle + JOIN_WAIT_INTERVALS * n5.settings.heartbeat_interval - 0.2)
    assert n5.state == "joining" and n5.unjoined()
    messages = []
    add_destinations(messages.append)
    try:
        _turn(cluster, 1.0)
    finally:
        remove_destination(messages.append)
    assert n5.state == "ready" and not n5.unjoined()
    assert [(m["peers"], m["ring"]) for m in messages
            if m.get("message_type") == "kvresponder:discovery:join-view-unmatched"] == [(["n1"], ["n1", "n5"])]


def test_a_stopped_node_leaves_no_sweep_waiting_for_its_next_turn():
    """
    If a node stops while expired entries still wait for the sweep's next turn, then that turn is called off:
    a stopped node runs nothing more.
    """
    from kvresponder.node import SWEEP_CHUNK

    clock = _TurnClock()
    clock.rightNow = 1_000_000.0
    node = Node(make_settings("t1", "n1"), clock, http=None)
    node.start()
    expires = node.wall() + 2
    for index in range(3 * SWEEP_CHUNK):
        node.store.apply(Entry("t%d" % (index,), b"1", (int(node.wall() * 1000), index, "n1"), expires))
    while node.store.expirations == 0:
        clock.advance(0.25)
    assert node.store.sweep_behind
    node.stop()
    left = node.store.expirations
    clock.advance(0)
    clock.advance(1.0)
    assert node.store.expirations == left
    assert not [call for call in clock.getDelayedCalls() if getattr(call.func, "__name__", "") == "_sweep"]


def test_evictions_and_expiries_are_logged_at_debug_and_not_at_info():
    """
    If the store area is at debug, then entries evicted to stay within MAX_MEMORY are logged as
    ``store:evicted`` and expired ones reclaimed as ``store:swept``, with their counts; at info, neither.
    """
    for level, logged in (("debug", True), ("info", False)):
        cluster = MemoryCluster(1, max_memory="64Ki", log_level=level)
        cluster.run(seconds=1.5)
        (node,) = cluster.nodes
        messages = []
        add_destinations(messages.append)
        # Eliot hands a first destination what was logged before there was one: not this test's.
        del messages[:]
        try:
            for index in range(200):
                node.store.apply(Entry("e%d" % (index,), b"x" * 1000, (int(node.wall() * 1000), index, "n1"),
                                       node.wall() + 2))
            cluster.run(seconds=3.5)
        finally:
            remove_destination(messages.append)
        evicted = [m["count"] for m in messages if m.get("message_type") == "kvresponder:store:evicted"]
        swept = [m for m in messages if m.get("message_type") == "kvresponder:store:swept"]
        assert node.store.evictions > 0 and node.store.expirations > 0
        if logged:
            assert sum(evicted) == node.store.evictions
            assert sum(m["count"] for m in swept) == node.store.expirations
            assert all(isinstance(m["tombstones"], int) for m in swept)
        else:
            assert evicted == [] and swept == []


class _TurnClock(Clock):
    """
    A Clock whose ``advance`` is one reactor turn: it runs the calls due when it starts, and leaves those they
    schedule for the next turn (``Clock.advance`` runs a ``callLater(0)`` made meanwhile in the same call).
    """

    def advance(self, amount):
        self.rightNow += amount
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in sorted(due, key=lambda call: call.getTime()):
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


def test_many_keys_expiring_together_are_reclaimed_a_chunk_a_reactor_turn():
    """
    If many more keys than SWEEP_CHUNK expire in the same second (a bulk load given one TTL), then the node's
    sweep reclaims them a chunk at a time, one reactor turn each, so that heartbeats, probes and peers' calls are
    served between the chunks, until none is left.
    """
    from kvresponder.node import SWEEP_CHUNK

    clock = _TurnClock()
    clock.rightNow = 1_000_000.0
    node = Node(make_settings("t1", "n1"), clock, http=None)
    node.start()
    expires = node.wall() + 5
    count = 3 * SWEEP_CHUNK + 10
    for index in range(count):
        node.store.apply(Entry("t%d" % (index,), b"1", (int(node.wall() * 1000), index, "n1"), expires))
    reclaimed = []
    while len(reclaimed) < 12:
        clock.advance(0.25)
        if node.wall() >= expires - 1:
            reclaimed.append(node.store.expirations)
    steps = [later - earlier for earlier, later in zip([0] + reclaimed, reclaimed)]
    assert max(steps) <= SWEEP_CHUNK, steps
    assert reclaimed[-1] == count and len(node.store) == 0, reclaimed
    node.stop()


def _hear_each_other(joiner: Node, peers) -> None:
    # The peers hear the joiner's heartbeat, and it hears theirs, which now name a ring with it.
    for peer in peers:
        peer.membership.observe(joiner.heartbeat())
    for peer in peers:
        joiner.membership.observe(peer.heartbeat())


def test_a_joining_node_asks_for_its_share_only_once_its_peers_count_it():
    """
    If a joining node hears its peers but they do not hear it (its heartbeats lost), then it serves kv requests
    (its view matches theirs) but stays joining, and does not ask for its share: they would answer with a pass
    over a ring without it, which hands it nothing, and it would be ready owning keys it does not hold. Once they
    hear it, it asks, receives every key it owns, and is ready.
    """
    cluster = MemoryCluster(2)
    cluster.run(seconds=1.0)
    n1, n2 = cluster.nodes
    for index in range(200):
        assert put(cluster, n1, "k%d" % (index,), index)[0] in (200, 201)
    n3 = _start_unheard(cluster)
    for peer in (n1, n2):
        n3.membership.observe(peer.heartbeat())
    _turn(cluster, n3.join_settle + 1.5)
    assert n3.state == "joining" and not n3.unjoined()
    assert len(n3.store) == 0
    _hear_each_other(n3, (n1, n2))
    owned = [key for key in ("k%d" % (index,) for index in range(200))
             if "n3" in n3.ring().preference_list(key, 2)]
    # Ready no sooner than it holds every key it owns: it asked its peers, and waited for their answers.
    for _ in range(20):
        _turn(cluster, 0.05)
        if n3.state == "ready":
            break
    assert n3.state == "ready"
    assert owned and all(n3.store.current(key) is not None for key in owned)


def _turn(cluster: MemoryCluster, seconds: float) -> None:
    """
    Turn the clock and the in-memory connections for ``seconds``, with no heartbeat heard meanwhile (unlike
    ``MemoryCluster.run``).
    """
    for _ in range(round(seconds / 0.05)):
        cluster.stub.flush()
        cluster.clock.advance(0.05)
    cluster.stub.flush()


def test_a_node_slow_to_start_still_waits_a_whole_heartbeat_interval_from_its_start_for_its_peers():
    """
    If a node's process is slow between building the node and starting it (imports, a loaded machine: no
    heartbeat is heard meanwhile), then once started it still waits a whole heartbeat interval for its peers
    before it takes itself for the first node of its cluster and is ready alone.
    """
    cluster = MemoryCluster(1)
    settings = make_settings(cluster.tenant, "n9", advertise_address="10.0.0.9", port="3000", **cluster.settings)
    node = Node(settings, cluster.clock, cluster.stub, join_settle=0.1)
    interval = settings.heartbeat_interval
    cluster.clock.advance(3 * interval)
    node.start()
    _turn(cluster, interval - 0.2)
    assert node.state == "joining" and node.unjoined()
    _turn(cluster, 0.5)
    assert node.state == "ready"


def test_a_node_that_heard_no_peer_waits_one_heartbeat_interval_before_it_serves_alone():
    """
    If a starting node hears no peer (the answers to its first heartbeat lost, or its DNS seeds slow), then it
    does not take itself for the first node of its cluster at the end of its short settling time: it stays
    joining, and refuses kv requests, until a heartbeat interval has passed (every peer sends one within it);
    only then is it ready alone.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n4 = _start_unheard(cluster)
    interval = n4.settings.heartbeat_interval
    _turn(cluster, interval - 0.2)
    assert n4.state == "joining" and n4.unjoined() and interval - 0.2 > n4.join_settle
    _turn(cluster, 0.5)
    assert n4.state == "ready" and not n4.unjoined() and len(n4.ring()) == 1


def test_a_node_that_heard_only_older_peers_waits_one_heartbeat_interval_before_it_serves():
    """
    If a joining node's peers are of a version whose heartbeats name their rings by size alone, then it serves
    kv requests only once a heartbeat interval has passed, in which every peer sends one: until then, a ring
    missing a peer and a peer that has not heard it yet look the same size.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n4 = _start_unheard(cluster)
    for peer in cluster.nodes[:3]:
        n4.membership.observe(peer.heartbeat()._replace(ring_digest=None, ring_size=4))
    assert len(n4.ring()) == 4 and n4.unjoined()
    _turn(cluster, n4.settings.heartbeat_interval)
    assert not n4.unjoined()


def test_a_read_through_a_starting_node_that_heard_no_peer_is_a_503_not_a_miss():
    """
    If a key the cluster holds is read through n4 in its first moments (joining, no peer heard yet), then the
    answer is 503 ``unavailable``, not 404: the node knows it has not heard from its cluster yet.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    assert put(cluster, cluster.nodes[0], "k", "value")[0] == 201
    n4 = _start_unheard(cluster)
    code, body = get(cluster, n4, "k")
    assert code == 503 and json.loads(body)["error"] == "unavailable", (code, body)


def test_a_starting_node_whose_clock_is_off_says_so_rather_than_that_it_is_starting():
    """
    If a node in its first moments (joining, no peer taken in) has measured its clock far from its peers' (it
    refuses their heartbeats, or they its), then its requests are answered 503 ``clock_skew``, not
    ``unavailable``: the skew is what it cannot get past by waiting, and what the operator must be told.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n4 = _start_unheard(cluster)
    for peer in ("n1", "n2", "n3"):
        n4.clock_offsets.heard(peer, 1, -30.0)
    n4.clock_offsets.evaluate()
    assert n4.state == "joining" and n4.clock_offsets.skewed
    for code, body in (get(cluster, n4, "k"), put(cluster, n4, "k", "v")):
        assert code == 503 and json.loads(body)["error"] == "clock_skew", (code, body)



def test_a_listing_includes_the_keys_a_leaving_node_has_not_handed_off_yet():
    """
    If, with one copy a key, a node has begun to leave (the others took it out of their rings) and has not yet
    handed its keys off, then a listing through another node still has every key: it asks the leaving node too.
    And once that node is gone, a listing that cannot reach it still answers, from the nodes of the ring.
    """
    cluster = _settled_cluster(replicas=1)
    n1, _, n3 = cluster.nodes
    keys = sorted("key-%02d" % (index,) for index in range(40))
    for key in keys:
        assert put(cluster, n1, key, key)[0] == 201
    held = sorted(n3.store.keys("", None, 100))
    assert held
    n3.begin_leaving()
    cluster.introduce()
    assert "n3" not in n1.ring().nodes
    code, body = cluster.request("GET", n1, "/kv?limit=1000")
    assert code == 200 and json.loads(body)["keys"] == keys
    cluster.kill(n3)
    code, body = cluster.request("GET", n1, "/kv?limit=1000")
    assert code == 200 and json.loads(body)["keys"] == sorted(set(keys) - set(held))


def test_a_bulk_write_that_misses_its_quorum_says_so_per_item_with_a_code_and_a_message():
    """
    If a bulk put and delete cannot store enough copies (an explicit write quorum of 2 with one node of three
    left), then each failed item has status 503, the code ``unavailable`` in ``error`` (as every other error
    body has a code there) and the reason in ``message``; and the answer matches the API's schema.
    """
    from jsonschema import Draft202012Validator

    from .test_openapi import SPEC_PATH

    with open(SPEC_PATH, encoding="utf-8") as handle:
        spec = json.load(handle)
    cluster = _settled_cluster(write_quorum=2)
    n1, n2, n3 = cluster.nodes
    cluster.kill(n2)
    cluster.kill(n3)
    code, body = cluster.request("POST", n1, "/bulk", {"put": [{"key": "a", "value": 1}], "delete": ["b"]})
    assert code == 200, body
    answer = json.loads(body)
    for item in answer["put"] + answer["delete"]:
        assert item["status"] == 503 and item["error"] == "unavailable", item
        assert "copies" in item["message"], item
    Draft202012Validator({"components": spec["components"], "$ref": "#/components/schemas/BulkResult"}).validate(answer)


def test_a_peer_that_says_it_is_gone_takes_its_clock_offset_and_suspicion_with_it_and_starts_no_pass(
        cluster, eliot_logger):
    """
    If a leaving peer's last heartbeat says it is gone, then the node forgets its clock offset (it no longer
    votes on this node's skew) and whatever made a suspect of it, logs the change (``peer-changed``, ``gone``),
    and starts no rebalance pass, nor builds its ring again: the peer was out of the ring already.
    """
    from kvresponder.membership import GONE

    n1, n2 = cluster.nodes[:2]
    assert n2.node_id in n1.clock_offsets.offsets()
    n2.begin_leaving()
    assert cluster.run(n2.drain(), seconds=20) == 0
    cluster.run(seconds=10)
    passes = n1.rebalancer.passes
    changed_at, settled = n1.ring_changed_at, n1.heartbeat().settled
    assert settled is not None and n2.node_id not in n1.ring().nodes
    peer = n1.membership.peer(n2.node_id)
    n1.peers.suspects.failed(peer, "TimeoutError")
    last_words = n2.heartbeat()._replace(state=GONE)
    cluster.kill(n2)
    n1.membership.observe(last_words)
    cluster.run(seconds=1)
    assert n2.node_id not in n1.clock_offsets.offsets()
    assert not n1.peers.suspects.suspected(peer)
    assert n1.rebalancer.passes == passes
    # Its ring was not built again: it would count as changed, and n1 as unsettled until its next pass.
    assert (n1.ring_changed_at, n1.heartbeat().settled) == (changed_at, settled)
    changes = [m["change"] for m in eliot_logger.messages
               if m.get("action_type") == "kvresponder:discovery:peer-changed" and m.get("peer") == n2.node_id
               and m.get("action_status") == "started"]
    # n1 and n3 each saw it leave; only n1 heard its last words.
    assert changes == ["left", "left", "gone"]


def test_a_node_told_to_stop_while_it_joins_asks_no_peer_for_its_share():
    """
    If a starting node is told to stop (SIGTERM) before its join has asked its peers for its share, then it never
    asks: each would walk its whole store for a node that, leaving, refuses every copy. A node left to join asks.
    """
    for stops in (True, False):
        cluster = MemoryCluster(2)
        cluster.run(seconds=1.0)
        n3 = _start_unheard(cluster)
        _hear_each_other(n3, cluster.nodes[:2])
        if stops:
            n3.begin_leaving()
        # Past the longest a join waits for its peers to count it (a leaving node they never will).
        _turn(cluster, n3.join_settle + JOIN_WAIT_INTERVALS * n3.settings.heartbeat_interval + 1.0)
        asked = 'kv_peer_request_duration_seconds_count{op="sync/request",tenant="t1"}'
        text = n3.metrics.exposition().decode()
        assert (asked in text) is not stops, (stops, [line for line in text.splitlines() if "sync/request" in line])
