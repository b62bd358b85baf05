"""
A node that leaves (SIGTERM: drain, exit) and whose address then goes, as a pod's goes with its sandbox: three real
nodes in their own namespaces. Packets to an address that is gone are answered by nothing, not even a reset, so a
call to it waits for its whole timeout.
"""

import time

import pytest

from .netns import network_for_test, session, wait_until

pytestmark = pytest.mark.netns

#: Long enough that, without the ``gone`` heartbeat, the others keep the leaver (as leaving) through the test.
PEER_TIMEOUT = "30"
PEER_REQUEST_TIMEOUT = 2.0


@pytest.fixture
def network():
    yield from network_for_test("the departure test", "kvdepart-")


def test_once_a_node_has_exited_and_its_address_is_gone_the_others_answer_without_waiting_for_it(network):
    """
    If a node is SIGTERMed and exits, and its address goes at once (its link down), then the writes and reads
    through the two others of every key it held, made right after, are each answered well within
    PEER_REQUEST_TIMEOUT, and none fails: its last heartbeats said it was gone, and the others forgot it. Kept as
    leaving until PEER_TIMEOUT, it was asked, while their ring settled, for the versions and values it might not
    have handed off, and the first such call from each node waited the whole timeout.
    """
    net = network
    env = {"PEER_TIMEOUT": PEER_TIMEOUT, "PEER_REQUEST_TIMEOUT": str(PEER_REQUEST_TIMEOUT),
           # The exit follows the drain at once, while the others' ring still settles.
           "SERVE_AFTER_LEAVING": "0"}
    nodes = [net.node(index, "dep%d" % (index,), env=env).start() for index in (41, 42, 43)]
    for node in nodes:
        node.wait_ready()
    net.wait_formed(nodes)
    client = session()
    keys = ["dep-%03d" % (i,) for i in range(120)]
    for key in keys:
        assert client.put(nodes[0].url + "/kv/" + key, json={"value": "before"}, timeout=10).status_code == 201
    leaver, stayers = nodes[2], nodes[:2]
    wait_until(lambda: leaver.metric("kv_store_keys") > 0, 20, "the leaver to hold some of the keys")

    assert leaver.terminate() in (0, -15)
    leaver.host.run(["ip", "link", "set", leaver.host.veth, "down"])
    slow, failed = [], []
    for i, key in enumerate(keys):
        node = stayers[i % 2]
        for method in ("put", "get"):
            started = time.monotonic()
            if method == "put":
                response = client.put(node.url + "/kv/" + key, json={"value": "after"}, timeout=10)
                ok = response.status_code == 200
            else:
                response = client.get(node.url + "/kv/" + key, timeout=10)
                ok = response.status_code == 200 and response.json()["value"] == "after"
            took = time.monotonic() - started
            if not ok:
                failed.append((node.node_id, method, key, response.status_code, response.text[:200]))
            if took > PEER_REQUEST_TIMEOUT / 2:
                slow.append((node.node_id, method, key, round(took, 2)))
    assert failed == []
    assert slow == []
    for node in stayers:
        assert leaver.node_id not in {peer["id"] for peer in node.peers()}
