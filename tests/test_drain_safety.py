"""
A node that is leaving stores none of the copies its peers send it, so that nothing it acknowledges is taken down
when its process exits.

A SIGTERMed node's drain ends as soon as its store is empty, and tap.py then stops it. Its peers learn that it is
leaving from a heartbeat (UDP: in flight, or lost), so for a moment they still send it the copies of writes it
owned, and hand-offs. Stored and answered 200, such a copy counted towards a write's acknowledgement and was lost
with the process. Refused with a 503 ``leaving``, it fails over at once to the next node on the sender's ring.

In memory (tests/support.py's MemoryCluster: real sites and resources over StubTreq, on a Clock), and once with
real processes.
"""

import json
import os
import signal
import time

import pytest
import requests

from kvresponder.ring import HashRing

from .harness import Cluster
from .support import MemoryCluster


def _owned_by(node, owners, replicas):
    """
    A key whose preference list on ``node``'s ring is ``owners``, in order.
    """
    ring = node.ring()
    return next(key for key in ("key-%d" % (i,) for i in range(10000))
                if ring.preference_list(key, replicas) == owners)


def _holders(cluster, key):
    return sorted(node.node_id for node in cluster.nodes
                  if node.node_id not in cluster.down and node.store.get(key) is not None)


def _drained(node) -> int:
    outcome = []
    node.drain().addCallback(outcome.append)
    assert outcome, "the drain of an empty store ends at once"
    return outcome[0]


def test_a_write_whose_owner_has_finished_draining_is_stored_on_the_next_node_and_survives_its_exit():
    """
    If a node's drain has ended (its store was empty) and a peer that has not yet heard it is leaving sends it
    the copy of a write it owns (REPLICATION_FACTOR=1), then it refuses the copy, the write fails over to the
    next node at once (no timeout waited, the leaving node made no suspect) and is acknowledged there, and the
    write is still readable once the leaving node has exited.
    """
    cluster = MemoryCluster(2, replicas=1)
    cluster.run(seconds=1.0)
    n1, n2 = cluster.nodes
    key = _owned_by(n1, ["n2"], 1)
    assert _drained(n2) == 0
    started = cluster.clock.seconds()
    code, body = cluster.request("PUT", n1, "/kv/" + key, {"value": "acknowledged"})
    assert code == 201, body
    assert cluster.clock.seconds() - started < n1.settings.peer_request_timeout
    assert not n1.peers.suspects.suspected(n1.membership.peer("n2"))
    assert _holders(cluster, key) == ["n1"]
    cluster.kill(n2)  # what tap.py does next: node.stop(), discovery and HTTP stop, the process exits
    cluster.run(seconds=n1.settings.peer_timeout + 2)
    code, body = cluster.request("GET", n1, "/kv/" + key)
    assert code == 200, body
    assert json.loads(body)["value"] == "acknowledged"


def test_a_write_acknowledged_with_two_copies_keeps_two_once_a_drained_owner_has_exited():
    """
    If one of a key's two owners has finished draining and a peer that has not heard it yet writes the key, then
    that owner's copy fails over to the next node, the write is acknowledged with two copies, and both are on
    nodes that stay.
    """
    cluster = MemoryCluster(3)
    cluster.run(seconds=1.0)
    n1, n2, n3 = cluster.nodes
    key = _owned_by(n1, ["n2", "n3"], 2)
    assert _drained(n3) == 0
    code, body = cluster.request("PUT", n1, "/kv/" + key, {"value": "acknowledged"})
    assert code == 201, body
    assert _holders(cluster, key) == ["n1", "n2"]
    cluster.kill(n3)
    cluster.run(seconds=n1.settings.peer_timeout + 2)
    assert _holders(cluster, key) == ["n1", "n2"]


def test_in_a_cluster_of_two_a_write_overlapping_the_others_leave_is_acknowledged_on_the_node_that_stays():
    """
    If of two nodes one has begun leaving and the other has not heard it yet, then a write through the one that
    stays, whose copy the leaving node refuses with nowhere to fail over to, is acknowledged with its one copy
    (as a write begun after the leave was heard is: the quorum follows the nodes that stay), single or bulk,
    and both stay readable once the leaving node has exited. With an explicit quorum of two it is refused.
    """
    for quorum, expected in ((None, (201, 201)), ("2", (503, 503))):
        cluster = MemoryCluster(2, **({"write_quorum": quorum} if quorum else {}))
        cluster.run(seconds=1.0)
        n1, n2 = cluster.nodes
        assert _drained(n2) == 0
        assert "n2" in n1.ring()
        code, body = cluster.request("PUT", n1, "/kv/single", {"value": "acknowledged"})
        bulk_code, bulk = cluster.request("POST", n1, "/bulk", {"put": [{"key": "bulk", "value": "acknowledged"}]})
        assert bulk_code == 200, bulk
        assert (code, json.loads(bulk)["put"][0]["status"]) == expected, (body, bulk)
        if quorum is None:
            assert _holders(cluster, "single") == _holders(cluster, "bulk") == ["n1"]
            cluster.kill(n2)
            cluster.run(seconds=n1.settings.peer_timeout + 2)
            for key in ("single", "bulk"):
                code, body = cluster.request("GET", n1, "/kv/" + key)
                assert code == 200 and json.loads(body)["value"] == "acknowledged", body


def test_a_hand_off_refused_by_a_drained_node_is_not_counted_as_delivered_and_goes_elsewhere():
    """
    If two nodes leave at once, and one hands an entry off to the other, whose drain has already ended, before
    hearing that it is leaving too, then the hand-off is refused, the sender keeps the entry, and its next pass
    hands it to a node that stays: once both have exited, every key is still readable.
    """
    cluster = MemoryCluster(3, replicas=1)
    cluster.run(seconds=1.0)
    n1, n2, n3 = cluster.nodes
    ring = n1.ring()
    keys = [key for key in ("key-%d" % (i,) for i in range(400)) if ring.preference_list(key, 1) == ["n2"]][:40]
    for key in keys:
        assert cluster.request("PUT", n1, "/kv/" + key, {"value": key})[0] == 201
    assert _holders(cluster, keys[0]) == ["n2"]
    # Once n2 leaves, some of its keys belong to n3: the drain's first pass sends them there.
    without_n2 = [node for node in ring.nodes if node != "n2"]
    assert any(HashRing(without_n2, vnodes=ring.vnodes).preference_list(key, 1) == ["n3"] for key in keys)
    assert _drained(n3) == 0
    remaining = cluster.run(n2.drain(), seconds=20)
    assert remaining == 0
    assert len(n3.store) == 0
    cluster.kill(n2)
    cluster.kill(n3)
    cluster.run(seconds=n1.settings.peer_timeout + 2)
    lost = [key for key in keys if cluster.request("GET", n1, "/kv/" + key)[0] != 200]
    assert lost == []


def test_a_node_takes_copies_until_it_begins_leaving():
    """
    If a node is starting, joining or ready, then it stores its peers' copies; from the moment it begins leaving
    (draining, then stopped), it does not.
    """
    cluster = MemoryCluster(1)
    [node] = cluster.nodes
    assert node.takes_copies()  # joining
    cluster.run(seconds=1.0)
    assert node.state == "ready" and node.takes_copies()
    node.begin_leaving()
    assert not node.takes_copies()
    node.stop()
    assert not node.takes_copies()


# -- real processes -------------------------------------------------------------------------------------


@pytest.fixture
def processes(log_dir):
    cluster = Cluster("drain", log_dir)
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            if node.alive:
                # A node stopped by the test would take its SIGKILL only once continued.
                os.kill(node.process.pid, signal.SIGCONT)
        cluster.stop()


@pytest.mark.e2e
def test_a_sigtermed_node_refuses_a_peers_copy_while_it_drains(processes):
    """
    If a node has received SIGTERM and is draining (its hand-offs wait on a peer that does not answer), then a
    peer's signed copy sent to ``/_internal/apply`` is answered 503 ``leaving`` and is not stored.
    """
    from kvresponder.discovery import derive_key
    from kvresponder.peertransport import PeerAuthenticator

    n1 = processes.add()
    n2 = processes.add()
    processes.wait_formed()
    for index in range(20):
        assert n2.put("held-%d" % (index,), index).status_code in (200, 201)
    # n1 stops answering, so that n2's drain waits on its hand-off for as long as the test needs.
    os.kill(n1.process.pid, signal.SIGSTOP)
    n2.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while requests.get(n2.url + "/health/ready", timeout=2).json().get("status") != "draining":
        assert time.monotonic() < deadline, n2.log_tail()
        time.sleep(0.02)
    signer = PeerAuthenticator(derive_key(processes.env["CLUSTER_SECRET"], "peer"), time.time)

    def call(route, payload):
        # As a peer calls it: signed with the cluster's peer key.
        path = "/%s/_internal/%s" % (processes.tenant, route)
        body = json.dumps(payload).encode("utf-8")
        return requests.post("http://127.0.0.1:%d%s" % (n2.port, path), data=body, timeout=5, headers={
            "Content-Type": "application/json", "X-KV-Auth": signer.sign(b"POST", path.encode("ascii"), body)})

    response = call("apply", {"entries": [{"k": "late", "v": "1", "ver": [int(time.time() * 1000), 0, "n1"],
                                           "exp": None}]})
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "leaving"
    held = call("get", {"key": "late"})
    assert held.status_code == 200 and held.json() == {"entry": None}, held.text
    os.kill(n1.process.pid, signal.SIGCONT)
    assert n2.terminate() in (0, -15)
