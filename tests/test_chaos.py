"""
Chaos scenarios on real ``twistd`` nodes, each in its own network namespace, discovering each other over real
multicast across a private bridge (tests/netns.py): kill -9 under load, an iptables partition and its
healing, a restart at the same address, a rolling restart, scaling 3 → 5 → 2, and forged heartbeats from an
attacker namespace.

Every scenario drives a bounded load (per-worker keys, bounded in count and time) and ends with the history
check (tests/history.py): acknowledged writes lost == 0, replicas converged, sum(kv_store_keys) == 2 × live
keys.

Needs root and ``ip``/``iptables``; skips otherwise, except in CI (CI=true), where it fails.
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import time

import pytest

from kvresponder.discovery import HeartbeatCodec, derive_key
from kvresponder.membership import Heartbeat
from kvresponder.settings import discovery_group_for

from .conftest import require_tool
from .harness import REPO
from .history import History, Load, check, preload, settle
from .netns import DISCOVERY_PORT, TENANT, Network, NetnsUnavailable, session, wait_until

pytestmark = pytest.mark.netns

RF = 2


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def network(request):
    if os.geteuid() != 0:
        _unavailable("the chaos tests build network namespaces and need root")
    require_tool("ip")
    require_tool("iptables")
    log_dir = tempfile.mkdtemp(prefix="kvchaos-")
    failures = request.session.testsfailed
    # KVCHAOS_REPO: run the nodes from another checkout (e.g. to try a fix) with these tests.
    net = Network(log_dir, repo=os.environ.get("KVCHAOS_REPO") or REPO)
    try:
        try:
            net.open()
        except (NetnsUnavailable, RuntimeError) as error:
            _unavailable("cannot build network namespaces here: %s" % (error,))
        yield net
    finally:
        net.close()
        leftovers = net.leftovers()
        if os.environ.get("KVCHAOS_KEEP_LOGS") or request.session.testsfailed > failures:
            sys.stderr.write("chaos node logs kept in %s\n" % (log_dir,))
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
        assert leftovers == [], "namespaces or links left behind: %s" % (leftovers,)


@pytest.fixture
def net(network):
    """
    The module's network with no node running; every node the test started is killed afterwards. The
    nodes' last log lines go to stderr, which pytest shows only when the test failed.
    """
    try:
        yield network
    finally:
        sys.stderr.write(network.describe() + "\n")
        network.stop_all()


class Targets:
    """
    The nodes the load may use, as ``(node_id, url)``; the test drops a node just before it kills it.
    """

    def __init__(self, nodes) -> None:
        self._lock = threading.Lock()
        self._nodes = list(nodes)

    def __call__(self):
        with self._lock:
            return [(node.node_id, node.url) for node in self._nodes]

    def remove(self, node) -> None:
        with self._lock:
            self._nodes = [n for n in self._nodes if n is not node]

    def add(self, node) -> None:
        with self._lock:
            if node not in self._nodes:
                self._nodes.append(node)


def start_cluster(net, indexes, **kwargs):
    """
    Start nodes in namespaces ``indexes`` at once; wait until every running node sees all the others.
    """
    nodes = [net.start(index, wait=False, **kwargs) for index in indexes]
    for node in nodes:
        node.wait_ready()
    net.wait_formed()
    return nodes


def failures(history, exclude=()):
    """
    The load's operations that were not acknowledged (unknown or rejected), except through ``exclude``.
    """
    return [op for op in history.ops if op.outcome != "ok" and op.node not in exclude and op.worker != "preload"]


def verify(history, nodes, label):
    """
    Settle, then check the history against every live node; print the counts.
    """
    took = settle(nodes, RF, timeout=30)
    report = check(history, nodes, RF)
    sys.stdout.write("\n[%s] settled in %.1fs: %s %s\n" % (label, took, report.summary(), history.counts()))
    for op in failures(history)[:5]:
        sys.stdout.write("  not acknowledged: %s %s via %s: %s %s\n" % (op.kind, op.key, op.node, op.status,
                                                                     op.detail[:120]))
    return report


def finish(history, nodes, label):
    report = verify(history, nodes, label)
    report.assert_ok()
    assert report.acknowledged_writes > 0
    return report


@pytest.fixture(scope="module")
def kill_9_run(network):
    """
    Scenario 1, run once for the two tests below: three nodes, a load through all of them, kill -9 of
    node3 (dropped from the load's targets just before), then settle and check.
    """
    try:
        nodes = start_cluster(network, [1, 2, 3])
        history = History()
        preload(history, nodes[0].url, nodes[0].node_id, "k9pre", 150)
        targets = Targets(nodes)
        load = Load(history, targets, "k9", workers=4, keys_per_worker=25, max_ops=400, max_seconds=20).start()
        victim = nodes[2]
        try:
            time.sleep(1.5)
            targets.remove(victim)
            time.sleep(0.2)
            victim.kill()
            time.sleep(4.0)
        finally:
            load.stop()
        survivors = nodes[:2]
        network.wait_formed(survivors)
        report = verify(history, survivors, "kill -9")
        return {"report": report, "failed": failures(history, exclude=(victim.node_id,))}
    finally:
        sys.stderr.write(network.describe() + "\n")
        network.stop_all()


def test_kill_9_under_load_loses_no_acknowledged_write(kill_9_run):
    kill_9_run["report"].assert_ok()
    assert kill_9_run["report"].acknowledged_writes > 0


def test_kill_9_fails_no_request_through_the_survivors(kill_9_run):
    """
    The survivors fail over at once: no request through them fails (a write's copy for the dead owner goes
    to the next node on the ring).
    """
    failed = kill_9_run["failed"]
    assert failed == [], ["%s %s via %s: %s %s" % (op.kind, op.key, op.node, op.status, op.detail[:100])
                          for op in failed[:5]]


def test_partition_then_heal_converges(net):
    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "ptpre", 100)
    majority, isolated = nodes[:2], nodes[2]
    load = Load(history, Targets(nodes), "pt", workers=4, keys_per_worker=25, max_ops=500, max_seconds=25,
                timeout=2.5).start()
    try:
        time.sleep(1.0)
        cut = time.monotonic()
        net.partition([isolated], majority)
        # Each side sees the other leave: the majority keeps a ring of 2, the isolated node a ring of 1.
        wait_until(lambda: all(n.metric("kv_ring_members") == 2 for n in majority)
                   and isolated.metric("kv_ring_members") == 1, 10, "the partition to be seen", net.describe)
        time.sleep(3.0)
        healed = time.monotonic()
        net.heal()
        net.wait_formed(nodes, timeout=15)
        time.sleep(1.5)
    finally:
        load.stop()
    during = [op for op in history.ops if cut + 2 < op.start < healed and op.node != isolated.node_id
              and op.kind == "put"]
    assert during and sum(op.acknowledged for op in during) >= 0.9 * len(during), \
        "the majority side must keep acknowledging writes during the partition"
    finish(history, nodes, "partition")


def test_restart_at_the_same_address_replaces_the_old_incarnation(net):
    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "rspre", 150)
    targets = Targets(nodes)
    victim = nodes[1]
    before = {peer["id"]: peer["incarnation"] for peer in nodes[0].peers()}
    load = Load(history, targets, "rs", workers=4, keys_per_worker=25, max_ops=400, max_seconds=25).start()
    try:
        time.sleep(1.0)
        targets.remove(victim)
        time.sleep(0.2)
        victim.kill()
        time.sleep(0.5)
        victim.start()
        victim.wait_ready()
        net.wait_formed(nodes)
        targets.add(victim)
        time.sleep(2.0)
    finally:
        load.stop()
    for observer in (nodes[0], nodes[2]):
        entries = [peer for peer in observer.peers() if peer["id"] == victim.node_id]
        assert len(entries) == 1 and entries[0]["state"] == "alive", entries
        assert entries[0]["incarnation"] != before[victim.node_id]
        assert entries[0]["address"] == victim.address
    finish(history, nodes, "restart")


def _drained(node) -> bool:
    drains = [m for m in node.log_messages() if m.get("action_type") == "kvresponder:rebalance:drain"
              and m.get("action_status") == "succeeded"]
    return bool(drains) and drains[-1].get("remaining") == 0


def test_rolling_restart_of_every_node(net):
    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "rrpre", 150)
    targets = Targets(nodes)
    load = Load(history, targets, "rr", workers=4, keys_per_worker=25, max_ops=800, max_seconds=50).start()
    try:
        for node in nodes:
            targets.remove(node)
            time.sleep(0.2)
            assert node.terminate(timeout=30) in (0, -15), node.log_tail()
            assert _drained(node), "%s did not hand off everything:\n%s" % (node.node_id, node.log_tail())
            node.start()
            node.wait_ready()
            net.wait_formed(nodes)
            targets.add(node)
            time.sleep(1.0)
    finally:
        load.stop()
    finish(history, nodes, "rolling restart")


def test_scaling_3_to_5_to_2(net):
    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    keys = preload(history, nodes[0].url, nodes[0].node_id, "scpre", 200)
    targets = Targets(nodes)
    load = Load(history, targets, "sc", workers=4, keys_per_worker=25, max_ops=800, max_seconds=50).start()
    try:
        time.sleep(1.0)
        newcomers = start_cluster(net, [4, 5])
        nodes = nodes + newcomers
        for node in newcomers:
            targets.add(node)
        # Their share: each holds about 2/5 of the preloaded keys once the rebalance has run.
        wait_until(lambda: all(n.metric("kv_store_keys") > len(keys) * RF / 5 * 0.5 for n in newcomers), 20,
                   "the newcomers to receive their share", net.describe)
        for leaver in nodes[:3]:
            targets.remove(leaver)
            time.sleep(0.2)
            assert leaver.terminate(timeout=30) in (0, -15), leaver.log_tail()
            assert _drained(leaver), "%s did not hand off everything:\n%s" % (leaver.node_id, leaver.log_tail())
            remaining = [n for n in nodes if n.alive]
            net.wait_formed(remaining)
            time.sleep(0.5)
    finally:
        load.stop()
    survivors = [n for n in nodes if n.alive]
    assert [n.node_id for n in survivors] == ["node4", "node5"]
    finish(history, survivors, "scale 3-5-2")


# -- forged heartbeats ------------------------------------------------------------------------------------

ATTACKER = r"""
import json, socket, sys
args = json.loads(sys.argv[1])
group, port, me = args["group"], args["port"], args["address"]
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
rx.bind((group, port))
rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(me))
rx.settimeout(10)
while True:
    captured, source = rx.recvfrom(4096)
    if source[0] != me:
        break
rx.close()
body = json.loads(captured)
forged = dict(body, node="intruder", addr=me)                      # a real MAC on someone else's body
unsigned = {k: v for k, v in forged.items() if k not in ("mac", "ts")}  # no MAC at all
foreign = dict(unsigned, tenant="other-tenant")                    # another tenant's heartbeat
payloads = {
    "bad_mac": [json.dumps(forged).encode(), json.dumps(unsigned).encode()],
    "foreign_tenant": [json.dumps(foreign).encode()],
    "replayed": [captured, bytes.fromhex(args["stale"])],
}
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(me))
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
tx.bind((me, 0))
for kind, datagrams in payloads.items():
    for datagram in datagrams:
        for destination in [group] + args["unicast"]:
            tx.sendto(datagram, (destination, port))
print(json.dumps({"captured_from": body.get("node"), "source": source[0]}))
"""


def test_forged_heartbeats_from_another_namespace_are_refused(net):
    secret = "chaos-secret-" + os.urandom(8).hex()
    nodes = start_cluster(net, [1, 2, 3], env={"CLUSTER_SECRET": secret})
    attacker = net.host(90)
    target = nodes[0]

    def counts(node):
        series = node.metrics()
        return {result: sum(v for k, v in series.items()
                            if k.startswith("kv_discovery_messages_total{") and 'result="%s"' % result in k)
                for result in ("bad_mac", "foreign_tenant", "replayed", "accepted")}

    before = {node.node_id: counts(node) for node in nodes}
    # A correctly signed heartbeat of a node that never existed, captured "long ago": outside the window.
    codec = HeartbeatCodec(TENANT, derive_key(secret, "discovery"))
    stale = codec.encode(Heartbeat("ghost", 1, attacker.address, 3000, "alive", 1), False, time.time() - 120)
    args = {"group": discovery_group_for(TENANT), "port": DISCOVERY_PORT, "address": attacker.address,
            "unicast": [target.address], "stale": stale.hex()}
    result = attacker.run([net.python, "-c", ATTACKER, json.dumps(args)], timeout=30)
    captured = json.loads(result.stdout.decode())
    assert captured["captured_from"] in {n.node_id for n in nodes}, captured
    time.sleep(1.5)

    ids = {node.node_id for node in nodes}
    for node in nodes:
        peers = node.peers()
        assert {peer["id"] for peer in peers} == ids - {node.node_id}, (node.node_id, peers)
        assert all(peer["address"] != attacker.address for peer in peers)
        assert node.metric("kv_ring_members") == 3
        after = counts(node)
        delta = {k: after[k] - before[node.node_id][k] for k in after}
        sys.stdout.write("\n[spoof] %s: %s" % (node.node_id, delta))
        unicast = 1 if node is target else 0
        assert delta["bad_mac"] >= 2 * (1 + unicast), (node.node_id, delta)
        assert delta["foreign_tenant"] >= 1 + unicast, (node.node_id, delta)
        # The stale one everywhere; the replay of the captured datagram everywhere but on its own sender.
        replays = (1 + unicast) * (1 if node.node_id == captured["captured_from"] else 2)
        assert delta["replayed"] >= replays, (node.node_id, delta)
    # The cluster still works, and peer calls without the secret are refused.
    s = session()
    assert s.put(nodes[1].url + "/kv/after-spoof", json={"value": 1}, timeout=5).status_code == 201
    assert s.get(nodes[2].url + "/kv/after-spoof", timeout=5).json()["value"] == 1
    assert s.post(target.url + "/_internal/get", json={"key": "after-spoof"}, timeout=5).status_code == 401
