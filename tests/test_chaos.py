"""
Chaos scenarios on real ``twistd`` nodes, each in its own network namespace, discovering each other over real
multicast across a private bridge (tests/netns.py): kill -9 under load, an iptables partition and its
healing, a peer cut off while still listed (how long writes and reads through the others wait), a restart at
the same address, a rolling restart, scaling 3 → 5 → 2, forged heartbeats from an attacker namespace, and clock
faults on one node (libfaketime, tests/clock_nemesis.py).

Every load scenario drives a bounded load (per-worker keys, bounded in count and time) and ends with the history
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

from . import clock_nemesis
from .conftest import require_tool
from .harness import REPO
from .history import (ERROR, History, Load, check, perform, preload, read_all, read_through,
                      real_time_order_violations, settle)
from .netns import DISCOVERY_PORT, HTTP_PORT, TENANT, Network, NetnsUnavailable, metric_sum, session, wait_until

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


def finish(history, nodes, label, load=None):
    """
    Check ``history`` against what ``nodes`` hold; and that ``load`` (if any) ran until it was stopped, so that
    the faults it was meant to see came while it ran.
    """
    if load is not None:
        assert not load.ran_out, "the load ran out before the test stopped it: %s" % (load.ran_out,)
    report = verify(history, nodes, label)
    report.assert_ok()
    # Checked, not skipped: each node's own copies (the replica check needs the internal routes).
    assert report.replica_checked, "the replica check could not read the nodes' own copies"
    if load is not None:
        assert not load.errors, "load workers failed: %s" % (load.errors[:3],)
        assert any(op.acknowledged and op.kind == "put" and op.worker.startswith(load.prefix + "-w")
                   for op in history.ops), "the load had no write acknowledged"
    else:
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
        load = Load(history, targets, "k9", workers=4, keys_per_worker=25, max_seconds=20).start()
        victim = nodes[2]
        try:
            time.sleep(1.5)
            targets.remove(victim)
            time.sleep(0.2)
            victim.kill()
            killed_at = time.monotonic()
            time.sleep(4.0)
        finally:
            load.stop()
        survivors = nodes[:2]
        network.wait_formed(survivors)
        assert not load.ran_out, load.ran_out
        assert not load.errors, "load workers failed: %s" % (load.errors[:3],)
        # The load went on through the survivors after the kill (the 150 preloaded writes alone would pass).
        assert any(op.acknowledged and op.worker.startswith(load.prefix + "-w") and op.start > killed_at
                   for op in history.ops), "no write through the survivors was acknowledged after the kill"
        report = verify(history, survivors, "kill -9")
        return {"report": report, "failed": failures(history, exclude=(victim.node_id,))}
    finally:
        sys.stderr.write(network.describe() + "\n")
        network.stop_all()


def test_kill_9_under_load_loses_no_acknowledged_write(kill_9_run):
    kill_9_run["report"].assert_ok()
    assert kill_9_run["report"].acknowledged_writes > 0
    assert kill_9_run["report"].replica_checked, "the replica check could not read the nodes' own copies"


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
    load = Load(history, Targets(nodes), "pt", workers=4, keys_per_worker=25, max_seconds=25,
                timeout=2.5).start()
    try:
        time.sleep(1.0)
        net.partition([isolated], majority)
        # Each side sees the other leave: the majority keeps a ring of 2, the isolated node a ring of 1.
        wait_until(lambda: all(n.metric("kv_ring_members") == 2 for n in majority)
                   and isolated.metric("kv_ring_members") == 1, 10, "the partition to be seen", net.describe)
        seen = time.monotonic()
        time.sleep(3.0)
        healed = time.monotonic()
        net.heal()
        net.wait_formed(nodes, timeout=15)
        time.sleep(1.5)
    finally:
        load.stop()
    # From the moment the majority's ring holds its two nodes (RF 2), every write through it has both its copies.
    during = [op for op in history.ops if seen < op.start and op.end < healed and op.node != isolated.node_id
              and op.kind == "put"]
    assert during and all(op.acknowledged for op in during), (
        "the majority side must acknowledge every write during the partition: %s"
        % ([(op.key, op.status, op.detail[:80]) for op in during if not op.acknowledged][:5],))
    finish(history, nodes, "partition", load)


def test_a_peer_cut_off_but_still_listed_holds_up_one_call_and_not_every_write_and_read(net):
    """
    If a peer's network is cut while its heartbeats have not yet timed out (a 5 s heartbeat, as the chart's, so
    the others keep it in their rings for 15 s), then writes and reads through another node wait out
    ``PEER_REQUEST_TIMEOUT`` only when a call finds it unreachable, then fail over at once while it is a suspect:
    writes are all acknowledged (their copies go to the next node), reads all answered, few of either slow.
    """
    nodes = start_cluster(net, [1, 2, 3], env={"HEARTBEAT_INTERVAL": "5", "PEER_REQUEST_TIMEOUT": "1"})
    entry, isolated = nodes[0], nodes[2]
    written = []
    with session() as s:
        for index in range(60):
            key = "cut-pre-%d" % (index,)
            assert s.put(entry.url + "/kv/" + key, json={"value": index}, timeout=5).status_code == 201
            written.append(key)
        net.partition([isolated], nodes[:2])
        cut = time.monotonic()
        puts, gets = [], []
        index = 0
        while time.monotonic() - cut < 7.0:
            key = "cut-%d" % (index,)
            started = time.monotonic()
            status = s.put(entry.url + "/kv/" + key, json={"value": index}, timeout=5).status_code
            puts.append((status, time.monotonic() - started))
            started = time.monotonic()
            status = s.get(entry.url + "/kv/" + written[index % len(written)], timeout=5).status_code
            gets.append((status, time.monotonic() - started))
            index += 1
        # The window this is about: the isolated node still in the entry node's ring (its last heartbeat came
        # up to 5 s before the cut, and it times out 15 s after that).
        assert entry.metric("kv_ring_members") == 3, "the cut peer left the ring too soon to test this"
    suspected = {m.get("peer") for m in entry.log_messages()
                 if m.get("message_type") == "kvresponder:replication:peer-suspected"}
    slow_puts = [took for _, took in puts if took > 0.5]
    slow_gets = [took for _, took in gets if took > 0.5]
    sys.stdout.write("\n[cut, still listed] %d puts (%d slow), %d gets (%d slow), suspected %s\n" % (
        len(puts), len(slow_puts), len(gets), len(slow_gets), sorted(suspected)))
    assert {status for status, _ in puts} == {201}
    assert {status for status, _ in gets} == {200}
    # One slow call a suspect period (5 s) at most, for writes and reads together; without suspects, every
    # write with a copy for the cut node (about two in three) and every read it owned waited a second.
    assert len(slow_puts) + len(slow_gets) <= 3, (slow_puts, slow_gets)
    assert len(puts) >= 30
    assert suspected == {isolated.node_id}


def test_restart_at_the_same_address_replaces_the_old_incarnation(net):
    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "rspre", 150)
    targets = Targets(nodes)
    victim = nodes[1]
    before = {peer["id"]: peer["incarnation"] for peer in nodes[0].peers()}
    load = Load(history, targets, "rs", workers=4, keys_per_worker=25, max_seconds=25).start()
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
    finish(history, nodes, "restart", load)


def _drained(node) -> bool:
    drains = [m for m in node.log_messages() if m.get("action_type") == "kvresponder:rebalance:drain"
              and m.get("action_status") == "succeeded"]
    return bool(drains) and drains[-1].get("remaining") == 0


def _restart_one_by_one_under_load(net, nodes, prefix: str, before_start=lambda node: None) -> History:
    """
    Preload keys, then under a load through the nodes not restarting, drain each node by SIGTERM and start it
    again (``before_start(node)`` first), once the cluster has formed again after the one before. The load is
    paced to last the whole run, and each restart must see writes acknowledged while it runs.
    """
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, prefix + "pre", 150)
    targets = Targets(nodes)
    # Bounded far past what the restarts take (about 20 s here): the test stops it; a slower machine must not
    # see it run out first.
    load = Load(history, targets, prefix, workers=4, keys_per_worker=25, max_seconds=150).start()

    def acknowledged() -> int:
        return sum(1 for op in list(history.ops) if op.acknowledged)
    try:
        for node in nodes:
            before = acknowledged()
            targets.remove(node)
            time.sleep(0.2)
            assert node.terminate(timeout=30) in (0, -15), node.log_tail()
            assert _drained(node), "%s did not hand off everything:\n%s" % (node.node_id, node.log_tail())
            before_start(node)
            node.start()
            node.wait_ready()
            net.wait_formed(nodes)
            targets.add(node)
            time.sleep(1.0)
            assert acknowledged() > before + 20, "the load had stopped by %s's restart" % (node.node_id,)
    finally:
        load.stop()
    assert not load.ran_out, load.ran_out
    assert not load.errors, load.errors[:3]
    return history


def test_rolling_restart_of_every_node(net):
    nodes = start_cluster(net, [1, 2, 3])
    history = _restart_one_by_one_under_load(net, nodes, "rr")
    finish(history, nodes, "rolling restart")


#: The code users may run when they upgrade to this one: the last version shipped (the end of the last working
#: session). Move it forward when a change to the wire (heartbeats, peer calls, copy streams) ships.
PREVIOUS_VERSION = "345f50e"


@pytest.fixture
def previous_version_tree():
    """
    A work tree of :data:`PREVIOUS_VERSION`, from this clone's history.
    """
    import subprocess

    tree = tempfile.mkdtemp(prefix="kv-previous-")
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", PREVIOUS_VERSION], capture_output=True, timeout=60)
        assert archive.returncode == 0, "the clone must hold %s: %s" % (PREVIOUS_VERSION, archive.stderr[-500:])
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True, timeout=60)
        yield tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _has_gauge_of_bodies_held(node) -> bool:
    return any(name.startswith("kv_request_body_bytes") for name in node.metrics())


def test_a_rolling_upgrade_from_the_previous_version_under_load_loses_no_acknowledged_write(net,
                                                                                          previous_version_tree):
    """
    If a cluster of the previous version (its heartbeats without ``members``, and whatever else changed on the
    wire since) is upgraded one node at a time, each drained by SIGTERM and started again on this version, under
    a load through the nodes not restarting, then every node joins and is ready (the mixed cluster forms), and
    no acknowledged write is lost.
    """
    nodes = [net.node(index) for index in (1, 2, 3)]
    for node in nodes:
        node.run_code_of(previous_version_tree)
        node.start()
    for node in nodes:
        node.wait_ready()
    net.wait_formed(nodes)
    # The previous version's own code runs: it has no gauge of the bodies held, which this one has.
    assert not any(_has_gauge_of_bodies_held(node) for node in nodes)
    history = _restart_one_by_one_under_load(net, nodes, "up", before_start=lambda node: node.run_code_of(REPO))
    assert all(_has_gauge_of_bodies_held(node) for node in nodes)
    finish(history, nodes, "rolling upgrade")


def test_if_a_cluster_scales_from_3_to_5_to_2_nodes_under_load_then_no_acknowledged_write_is_lost(net):
    """
    If two nodes join a cluster of three under writes, and then the first three leave one by one (SIGTERM), then
    the newcomers take their share, each leaver hands off everything, and every acknowledged write is readable
    on the two left.
    """
    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    keys = preload(history, nodes[0].url, nodes[0].node_id, "scpre", 200)
    targets = Targets(nodes)
    load = Load(history, targets, "sc", workers=4, keys_per_worker=25, max_seconds=150).start()  # stopped below
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
    finish(history, survivors, "scale 3-5-2", load)


def test_three_of_five_nodes_sigtermed_at_once_under_load_lose_no_acknowledged_write(net):
    """
    If three of five nodes get SIGTERM at the same moment (a Deployment scaled from 5 to 2, or an HPA's scale
    down: Kubernetes stops them together), under a load through the two that stay, then each drains while the
    others do (many keys have both their owners among them), every one exits, the two survivors hold every
    acknowledged write, and no request through them fails for want of a copy.
    """
    import signal
    from concurrent.futures import ThreadPoolExecutor

    nodes = start_cluster(net, [1, 2, 3, 4, 5])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "s3pre", 300)
    survivors, leavers = nodes[:2], nodes[2:]
    load = Load(history, Targets(survivors), "s3", workers=4, keys_per_worker=25, max_seconds=40).start()
    try:
        time.sleep(1.0)
        for node in leavers:
            os.kill(node.process.pid, signal.SIGTERM)
        with ThreadPoolExecutor(max_workers=3) as pool:
            codes = list(pool.map(lambda node: node.process.wait(timeout=40), leavers))
        assert all(code in (0, -15) for code in codes), [node.log_tail() for node in leavers]
        assert all(_drained(node) for node in leavers), [node.log_tail() for node in leavers]
        net.wait_formed(survivors, timeout=15)
        time.sleep(1.5)
    finally:
        load.stop()
    finish(history, survivors, "three sigtermed at once", load)


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


# -- clock faults -----------------------------------------------------------------------------------------
#
# One node of three runs under libfaketime (tests/clock_nemesis.py); the other two keep the host's clock.
# Each key is written first through the skewed node (a 503 from it is fine: not acknowledged), then, once
# that answered, through a healthy node; the later write must be what every node returns, whatever the
# clocks say (history.real_time_order_violations).

CLOCK_KEYS = 50
SKEWED = "node3"


def _require_libfaketime() -> None:
    if not os.path.exists(clock_nemesis.LIBFAKETIME):
        _unavailable("libfaketime is not installed (Debian package faketime; bash .ci/run installs it)")


def _start_with_one_skewed(net, skewed_env, env=None):
    """
    Nodes 1 and 2 on the host's clock, node 3 with ``skewed_env`` on top, all with a cluster secret (as a
    deployment has). Waits until the healthy ones are ready and see each other, and node 3 answers.
    """
    common = {"CLUSTER_SECRET": "chaos-secret-" + os.urandom(8).hex()}
    common.update(env or {})
    healthy = [net.start(index, wait=False, env=common) for index in (1, 2)]
    skewed = net.start(3, SKEWED, wait=False, env=dict(common, **skewed_env))
    for node in healthy:
        node.wait_ready()

    def answers():
        assert skewed.alive, skewed.log_tail()
        return skewed.session.get(skewed.url + "/health/live", timeout=1).status_code == 200
    wait_until(answers, 20, "%s to answer" % (SKEWED,), net.describe)
    wait_until(lambda: all(any(peer["id"] == other.node_id and peer["state"] == "alive" for peer in node.peers())
                           for node, other in ((healthy[0], healthy[1]), (healthy[1], healthy[0]))),
               20, "the healthy nodes to see each other", net.describe)
    return healthy, skewed


def _assert_clock_is_faked(node, expected: float) -> float:
    """
    The node's clock, read from outside, is ``expected`` seconds off the host's: libfaketime works, so the
    scenario cannot pass vacuously.
    """
    measured = clock_nemesis.clock_offset(node)
    assert abs(measured - expected) < 1.5, "%s's clock is %.1fs off, not %.1fs: is libfaketime preloaded?" % (
        node.node_id, measured, expected)
    return measured


def _assert_offset_shown(healthy, expected: float) -> None:
    """
    Each healthy node's ``kv_clock_offset_seconds{peer="node3"}`` settles within 1 s of the real offset.
    """
    def shown():
        values = [clock_nemesis.peer_offset(node, SKEWED) for node in healthy]
        return all(value is not None and abs(value - expected) < 1.0 for value in values)
    wait_until(shown, 20, "kv_clock_offset_seconds{peer=%r} within 1s of %.0f on %s" % (
        SKEWED, expected, [n.node_id for n in healthy]),
        lambda: "seen: %s\n%s" % ({n.node_id: clock_nemesis.peer_offset(n, SKEWED) for n in healthy},
                                  _describe(healthy)), interval=0.5)


def _describe(nodes) -> str:
    return "\n".join(node.log_tail(6, 300) for node in nodes)


def _write_pairs(history, first, then, prefix: str, count: int, ttl=None):
    """
    For each of ``count`` keys: PUT through ``first``, and once it answered, PUT through ``then`` (round
    robin). Returns ``[(first_op, later_op), ...]``.
    """
    sessions = {node.node_id: session() for node in [first] + list(then)}
    pairs = []
    for i in range(count):
        key = "%s-%03d" % (prefix, i)
        early = perform(history, sessions[first.node_id], first.url, first.node_id, "clock", "put", key,
                        "%s-early-%d" % (prefix, i))
        second = then[i % len(then)]
        late = perform(history, sessions[second.node_id], second.url, second.node_id, "clock", "put", key,
                       "%s-late-%d" % (prefix, i))
        pairs.append((early, late))
    return pairs


REFUSED = ("refused", "clock_skew")


def _read_or_refused(node, keys):
    """
    ``{key: value, ABSENT, REFUSED or ERROR}`` through ``node``: REFUSED is a 503 ``clock_skew``, which a
    skewed node may answer; a wrong value never.
    """
    return read_all(node.url, keys, refused=REFUSED)


def _assert_later_writes_win(history, pairs, nodes, label: str, may_refuse=()) -> None:
    """
    Every later write was acknowledged, and every node returns it (0 lost of ``len(pairs)``); a node in
    ``may_refuse`` (a skewed one) may instead refuse the read with 503 ``clock_skew``, but not answer
    anything else.
    """
    late_acked = [late for _, late in pairs if late.acknowledged]
    assert len(late_acked) == len(pairs), ["%s via %s: %s %s" % (op.key, op.node, op.status, op.detail[:100])
                                           for _, op in pairs if not op.acknowledged][:5]
    expected = {late.key: late.value for _, late in pairs}
    keys = list(expected)
    finals = {node.node_id: _read_or_refused(node, keys) for node in nodes}
    refusing = {node.node_id for node in may_refuse}
    lost = {node: [key for key in keys if states[key] != expected[key]
                   and not (node in refusing and states[key] == REFUSED)]
            for node, states in finals.items()}
    refused = {node: sum(state == REFUSED for state in states.values()) for node, states in finals.items()}
    violations = real_time_order_violations(history, {
        node: {key: ERROR if state == REFUSED else state for key, state in states.items()}
        for node, states in finals.items()})
    sys.stdout.write("\n[%s] later acknowledged writes: %d; lost, by node read through: %s; reads refused "
                     "(clock_skew): %s; real-time violations: %d; first writes acknowledged through the "
                     "skewed node: %d\n" % (
                         label, len(late_acked), {node: len(keys) for node, keys in lost.items()}, refused,
                         len(violations), sum(early.acknowledged for early, _ in pairs)))
    assert violations == [], violations[:5]
    assert all(keys == [] for keys in lost.values()), {
        node: [(key, finals[node][key]) for key in keys[:3]] for node, keys in lost.items() if keys}


def _assert_membership_holds(nodes, seconds: float = 3.0) -> None:
    """
    For ``seconds``, every node keeps all the others as live peers and drops none of their heartbeats (as
    replayed or as a clock ahead): offsets within MAX_CLOCK_OFFSET must not split the cluster.
    """
    ids = {node.node_id for node in nodes}

    def dropped():
        counts = {}
        for node in nodes:
            series = node.metrics()
            counts[node.node_id] = {result: metric_sum(series, "kv_discovery_messages_total", result=result)
                                    for result in ("replayed", "clock_ahead")}
        return counts
    before = dropped()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for node in nodes:
            alive = {peer["id"] for peer in node.peers() if peer["state"] == "alive"}
            assert alive == ids - {node.node_id}, (node.node_id, alive, dropped())
        time.sleep(0.3)
    after = dropped()
    assert after == before, "heartbeats dropped between nodes within the bound: before %s, after %s" % (
        before, after)


def _assert_versions_near_real_time(history, healthy, prefix: str, slack: float) -> None:
    """
    Writes of fresh keys through the healthy nodes get versions within ``slack`` seconds of real time: their
    hybrid logical clocks did not adopt the skewed clock.
    """
    s = session()
    worst = 0.0
    for i in range(10):
        node = healthy[i % len(healthy)]
        real = time.time()
        op = perform(history, s, node.url, node.node_id, "clock", "put", "%s-%02d" % (prefix, i), "probe-%d" % i)
        assert op.acknowledged, (op.status, op.detail)
        drift = clock_nemesis.version_wall(op.version) - real
        worst = max(worst, abs(drift))
        assert abs(drift) < slack, "%s stamped %s, %.1fs from real time" % (node.node_id, op.version, drift)
    sys.stdout.write("  healthy nodes' versions within %.2fs of real time\n" % (worst,))


def _assert_refuses_as_skewed(skewed, expected: float) -> None:
    """
    With the default bound, the skewed node is unready (503 clock-skew), says so in /health, and logged it.
    """
    def unready():
        response = skewed.session.get(skewed.url + "/health/ready", timeout=2)
        return response.status_code == 503 and response.json().get("status") == "clock-skew"
    wait_until(unready, 20, "%s's /health/ready to answer 503 clock-skew" % (SKEWED,), skewed.log_tail,
               interval=0.3)
    # A node whose clock stepped back is unready at once (its versions lead its clock), a few heartbeats before
    # the median of its peers' offsets moves: ci75 read /health in between.
    measured = []

    def skew_measured():
        health = skewed.health()
        measured[:] = [health]
        return health["state"] == "clock-skew" and abs(health["clock_skew_s"] - expected) < 1.5
    wait_until(skew_measured, 10, "%s's /health to show its clock %+.0fs off" % (SKEWED, expected),
               lambda: "%s\n%s" % (measured, skewed.log_tail()), interval=0.3)
    # The node's log reaches its file a little later than its answers reach us.
    wait_until(lambda: clock_nemesis.logged(skewed, "kvresponder:discovery:clock-skewed"), 5,
               "%s to log clock-skewed" % (SKEWED,), skewed.log_tail)


@pytest.mark.parametrize("spec, offset", [("+30s", 30.0), ("-30s", -30.0), ("+365d", clock_nemesis.ONE_YEAR)],
                         ids=["ahead-30s", "behind-30s", "ahead-1y"])
def test_a_skewed_node_is_refused_and_loses_no_later_acknowledged_write(net, spec, offset):
    """
    If one node of three runs with its clock off by 30 s either way or by a year (default
    MAX_CLOCK_OFFSET), then it turns unready and refuses writes, the healthy nodes show its offset and keep
    their versions on real time, and no write acknowledged after a write through it is lost.
    """
    _require_libfaketime()
    healthy, skewed = _start_with_one_skewed(net, clock_nemesis.faketime_env(spec))
    _assert_clock_is_faked(skewed, offset)
    _assert_offset_shown(healthy, offset)
    _assert_refuses_as_skewed(skewed, offset)
    history = History()
    label = "clock %s" % (spec,)
    pairs = _write_pairs(history, skewed, healthy, "ck%s" % (spec.strip("+-"),), CLOCK_KEYS)
    refused = [early for early, _ in pairs if not early.acknowledged]
    # Every write through the skewed node is refused (it was measured before they came), each as clock_skew.
    assert len(refused) == len(pairs), [(op.status, op.detail[:100]) for op, _ in pairs if op.acknowledged][:3]
    assert all(op.status == 503 and "clock_skew" in op.detail for op in refused), \
        [(op.status, op.detail[:100]) for op in refused[:3]]
    _assert_later_writes_win(history, pairs, healthy + [skewed], label, may_refuse=[skewed])
    _assert_versions_near_real_time(history, healthy, "ckprobe", slack=3.0)
    _assert_offset_shown(healthy, offset)


def test_writes_accepted_through_a_node_15s_ahead_within_a_20s_bound_still_lose_to_later_ones(net):
    """
    If MAX_CLOCK_OFFSET is 20 s (the most it may be) and one node runs 15 s ahead, then it takes writes (stamped 15 s in the
    future), yet each later write through a healthy node wins, stamped above it; and a 3 s TTL written
    through it is gone from the healthy nodes after 6 s.
    """
    _require_libfaketime()
    healthy, skewed = _start_with_one_skewed(net, clock_nemesis.faketime_env("+15s"),
                                             env={"MAX_CLOCK_OFFSET": "20"})
    _assert_clock_is_faked(skewed, 15.0)
    skewed.wait_ready()
    net.wait_formed(healthy + [skewed])
    _assert_offset_shown(healthy, 15.0)
    _assert_membership_holds(healthy + [skewed])
    history = History()
    pairs = _write_pairs(history, skewed, healthy, "ck20", CLOCK_KEYS)
    early_acked = [early for early, _ in pairs if early.acknowledged]
    assert len(early_acked) == len(pairs), [(op.status, op.detail[:100]) for op, _ in pairs
                                            if not op.acknowledged][:3]
    # Not vacuous: the first writes carry versions 15 s in the future, which the later ones had to beat.
    ahead = [clock_nemesis.version_wall(op.version) - op.end - (time.time() - time.monotonic())
             for op in early_acked]
    assert min(ahead) > 12, sorted(ahead)[:3]
    for early, late in pairs:
        assert clock_nemesis.version_key(late.version) > clock_nemesis.version_key(early.version), \
            (early.key, early.version, late.version)
    _assert_later_writes_win(history, pairs, healthy + [skewed], "clock +15s, bound 20s")
    # Within the bound the healthy clocks may follow the skewed one, but never beyond it.
    _assert_versions_near_real_time(history, healthy, "ck20probe", slack=20.0 + 3.0)

    s = session()
    ttl_keys = ["ck20ttl-%02d" % (i,) for i in range(10)]
    for key in ttl_keys:
        response = s.put(skewed.url + "/kv/" + key, json={"value": key, "ttl": 3}, timeout=5)
        assert response.status_code == 201, response.text
    acknowledged = time.monotonic()
    for node in healthy:
        present = [key for key in ttl_keys if s.get(node.url + "/kv/" + key, timeout=5).status_code == 200]
        assert present == ttl_keys, (node.node_id, "the TTL keys must be readable before they expire")
    time.sleep(max(0.0, acknowledged + 6.0 - time.monotonic()))
    for node in healthy:
        alive = [key for key in ttl_keys if s.get(node.url + "/kv/" + key, timeout=5).status_code != 404]
        assert alive == [], "%s still returns %d of 10 keys with a 3 s TTL 6 s after writing them" % (
            node.node_id, len(alive))


def test_a_clock_stepped_back_while_running_takes_no_write_loses_no_later_one_and_recovers(net, tmp_path):
    """
    If node 3's clock steps back 10 s while it runs, then it takes no write from that moment, before anyone can
    tell: its versions now run 10 s ahead of its clock (they never go back), and stamped from them a write would
    carry the time it ran to. The writes through the healthy nodes go on, later ones winning; it turns unready once
    its offset is measured, and it recovers by itself when its clock steps forward again.
    """
    _require_libfaketime()
    timestamps = str(tmp_path / "faketime-node3")
    clock_nemesis.step(timestamps, "+0")
    healthy, skewed = _start_with_one_skewed(net, clock_nemesis.faketime_env(timestamp_file=timestamps))
    skewed.wait_ready()
    nodes = healthy + [skewed]
    net.wait_formed(nodes)
    _assert_clock_is_faked(skewed, 0.0)
    history = History()
    preload(history, healthy[0].url, healthy[0].node_id, "ckstpre", 50)

    clock_nemesis.step(timestamps, "-10s")
    # libfaketime reads the file again once its cached value is a second or two old.
    wait_until(lambda: abs(clock_nemesis.clock_offset(skewed) + 10.0) < 1.5, 5, "node3's clock to step back")
    _assert_clock_is_faked(skewed, -10.0)
    # Right after the step: the node has not been measured yet (and libfaketime steps its monotonic clock too,
    # which an NTP step does not, so its timers wait), but its versions are ahead of its clock.
    before = _write_pairs(history, healthy[0], [skewed], "ckstA", 30)
    after = _write_pairs(history, skewed, healthy, "ckstB", 30)
    through_stepped = [late for _, late in before] + [early for early, _ in after]
    refused = [op for op in through_stepped if op.status == 503 and "clock_skew" in op.detail]
    assert len(refused) == len(through_stepped), [(op.status, op.detail[:120]) for op in through_stepped
                                                  if op not in refused][:3]
    assert any("versions are" in op.detail for op in refused), refused[0].detail
    assert all(op.acknowledged for op, _ in before) and all(op.acknowledged for _, op in after)
    _assert_offset_shown(healthy, -10.0)
    _assert_refuses_as_skewed(skewed, -10.0)

    clock_nemesis.step(timestamps, "+0")
    skewed.wait_ready(timeout=30)
    assert skewed.health()["state"] != "clock-skew"
    wait_until(lambda: clock_nemesis.logged(skewed, "kvresponder:discovery:clock-recovered"), 5,
               "%s to log clock-recovered" % (SKEWED,), skewed.log_tail)
    _assert_offset_shown(healthy, 0.0)
    net.wait_formed(nodes)
    finals = read_through(nodes, [op.key for pair in before for op in pair])
    assert real_time_order_violations(history, finals) == []
    _assert_later_writes_win(history, after, nodes, "clock step -10s")
    finish(history, nodes, "clock step -10s")


# -- a clock set right while its node runs (an NTP step of the wall clock only) -------------------------------


def _wall_only(timestamps: str) -> dict:
    """
    libfaketime on the wall clock only, as an NTP step moves it (by default it fakes the monotonic clock too,
    which no real step does).
    """
    return dict(clock_nemesis.faketime_env(timestamp_file=timestamps), FAKETIME_DONT_FAKE_MONOTONIC="1")


def _formed_with_a_steppable_wall_clock(net, tmp_path):
    """
    Nodes 1 and 2, and node 3 under libfaketime on its wall clock only, from a file :func:`_step_wall_clock` moves;
    once all three are ready and formed: ``(the file, the healthy nodes, node 3)``.
    """
    _require_libfaketime()
    timestamps = str(tmp_path / "faketime-node3")
    clock_nemesis.step(timestamps, "+0")
    healthy, stepped = _start_with_one_skewed(net, _wall_only(timestamps))
    stepped.wait_ready()
    net.wait_formed(healthy + [stepped])
    return timestamps, healthy, stepped


def _step_wall_clock(timestamps: str, node, seconds: int) -> None:
    """
    Set ``node``'s wall clock ``seconds`` off the host's, and wait until its answers show it.
    """
    clock_nemesis.step(timestamps, "%+ds" % (seconds,) if seconds else "+0")
    wait_until(lambda: abs(clock_nemesis.clock_offset(node) - seconds) < 1.5, 5,
               "%s's clock to be %+d s off" % (node.node_id, seconds))


def _alive_ids(node) -> set:
    return {peer["id"] for peer in node.peers() if peer["state"] == "alive"}


def test_a_node_whose_clock_ran_ahead_is_taken_back_at_once_when_its_clock_is_set_right(net, tmp_path):
    """
    If node 3 runs 120 s ahead (the others refuse its heartbeats as clock_ahead), and its wall clock is then set
    right while it runs, then within 10 s every healthy node has it back as an alive peer, not 120 s later: a
    refused heartbeat's time is no floor for the replay check.
    """
    _require_libfaketime()
    timestamps = str(tmp_path / "faketime-node3")
    clock_nemesis.step(timestamps, "+120s")
    healthy, skewed = _start_with_one_skewed(net, _wall_only(timestamps))
    wait_until(lambda: abs(clock_nemesis.clock_offset(skewed) - 120.0) < 1.5, 10, "node3's clock to be ahead")
    time.sleep(2.0)
    assert all(SKEWED not in _alive_ids(node) for node in healthy)
    clock_nemesis.step(timestamps, "+0")
    wait_until(lambda: abs(clock_nemesis.clock_offset(skewed)) < 1.5, 10, "node3's clock to be set right")
    wait_until(lambda: all(SKEWED in _alive_ids(node) for node in healthy), 10,
               "the healthy nodes to take node3 back", lambda: "\n".join(
                   "%s: alive %s, replayed %s" % (node.node_id, sorted(_alive_ids(node)), metric_sum(
                       node.metrics(), "kv_discovery_messages_total", result="replayed")) for node in healthy))


def test_a_node_whose_wall_clock_steps_back_stays_in_its_peers_rings(net, tmp_path):
    """
    If node 3's wall clock steps back 20 s while it runs (within the 30 s replay window), then it keeps sending
    heartbeats and the healthy nodes keep taking them in: it may turn clock-skewed, but it never drops out of
    their peers. Its timers run on the monotonic clock, and its heartbeats are told from replays by their
    sequence numbers, not their times.
    """
    timestamps, healthy, skewed = _formed_with_a_steppable_wall_clock(net, tmp_path)
    _step_wall_clock(timestamps, skewed, -20)
    stepped = time.monotonic()
    while time.monotonic() - stepped < 8.0:
        missing = [node.node_id for node in healthy if SKEWED not in _alive_ids(node)]
        assert missing == [], "%s dropped node3 %.1f s after its clock stepped back" % (
            missing, time.monotonic() - stepped)
        time.sleep(0.3)


def test_a_node_whose_clock_ran_ahead_and_was_set_right_stamps_no_write_ahead_until_its_clock_catches_up(
        net, tmp_path):
    """
    If node 3's wall clock runs 10 s ahead just long enough for it to take writes, and is then set right, then its
    versions stay ahead of its clock (they never go back): it refuses writes, 503 ``clock_skew`` naming that lead,
    and is unready, though no node measures its clock as off; it still serves reads; and once its clock has
    reached its versions it is ready again and stamps writes from its clock.
    """
    timestamps, healthy, stepped = _formed_with_a_steppable_wall_clock(net, tmp_path)
    _step_wall_clock(timestamps, stepped, 10)
    s = session()
    taken = [key for key in ("ahead-%d" % i for i in range(20))
             if s.put(stepped.url + "/kv/" + key, json={"value": key}, timeout=5).status_code == 201]
    assert taken, "node 3 took no write before it was seen skewed:\n%s" % (stepped.log_tail(),)
    _step_wall_clock(timestamps, stepped, 0)
    answers = []

    def refused_for_its_versions():
        # First refused for its clock, until its peers' fresh heartbeats outnumber those from before.
        answers.append(s.put(stepped.url + "/kv/later", json={"value": 1}, timeout=5))
        return answers[-1].status_code == 503 and "versions are" in answers[-1].json()["message"]
    wait_until(refused_for_its_versions, 5, "node3 to refuse writes for its versions' lead",
               lambda: answers[-1].text if answers else "")
    assert all(answer.status_code == 503 and answer.json()["error"] == "clock_skew" for answer in answers)
    assert s.get(stepped.url + "/kv/" + taken[0], timeout=5).status_code == 200
    assert stepped.health()["state"] == "clock-skew"
    wait_until(lambda: clock_nemesis.logged(stepped, "kvresponder:discovery:versions-ahead"), 5,
               "node3 to log versions-ahead", stepped.log_tail)
    stepped.wait_ready(timeout=20)
    written = s.put(stepped.url + "/kv/later", json={"value": 2}, timeout=5)
    assert written.status_code == 201, written.text
    assert int(written.json()["version"].split(".")[0]) <= (time.time() + 1.0) * 1000, written.text
    for node in healthy:
        assert abs(clock_nemesis.peer_offset(node, SKEWED) or 0.0) < 1.0


# -- a joining node's writes ----------------------------------------------------------------------------------


def _fill_for_slow_hand_offs(s, node, prefix: str, count: int = 60000) -> None:
    """
    Write ``count`` small keys through ``node``, in bulk: enough that the hand-offs of a join take seconds.
    """
    for start in range(0, count, 1000):
        items = [{"key": "%s%d" % (prefix, i), "value": "x" * 100} for i in range(start, start + 1000)]
        assert s.post(node.url + "/bulk", json={"put": items}, timeout=60).status_code == 200


def test_later_writes_through_one_of_two_nodes_joining_at_once_win_over_earlier_ones_stamped_ahead(net):
    """
    If node 3's clock runs 15 s ahead (within a 20 s MAX_CLOCK_OFFSET), keys are written through it, and nodes 4
    and 5 then join together (an autoscaler's step) and node 4, while it is still joining, takes later writes of
    the keys whose two owners their joins replaced (and which node 4's peers' ring with node 5 in it gives to
    neither of the earlier owners either), then once both are ready every node answers each later write node 4
    acknowledged (it may refuse some 503 in its first moments, before it has heard its peers).
    """
    from concurrent.futures import ThreadPoolExecutor

    from kvresponder.ring import HashRing

    _require_libfaketime()
    healthy, skewed = _start_with_one_skewed(net, clock_nemesis.faketime_env("+15s"), env={"MAX_CLOCK_OFFSET": "20"})
    skewed.wait_ready()
    net.wait_formed(healthy + [skewed])
    before = HashRing(["node1", "node2", "node3"])
    after = HashRing(["node1", "node2", "node3", "node4", "node5"])
    # The ring node 4 would take for its peers' were it to leave node 5 in: its owners must not help either.
    with_other_joiner = HashRing(["node1", "node2", "node3", "node5"])
    keys = [key for key in ("jw-%d" % i for i in range(6000))
            if not set(before.preference_list(key, 2)) & (set(after.preference_list(key, 2))
                                                          | set(with_other_joiner.preference_list(key, 2)))][:60]
    assert len(keys) == 60
    s = session()
    # Node 4 serves before its peers have handed it the keys: the later writes must find the earlier ones where
    # they still are.
    _fill_for_slow_hand_offs(s, healthy[0], "jw-fill-")
    for key in keys:
        assert s.put(skewed.url + "/kv/" + key, json={"value": "earlier"}, timeout=5).status_code == 201
    env = {"MAX_CLOCK_OFFSET": "20", "CLUSTER_SECRET": healthy[0].env["CLUSTER_SECRET"]}

    def answers(node):
        try:
            return node.session.get(node.url + "/health/live", timeout=0.2).status_code == 200
        except Exception:
            return False
    # Node 5 first, so that node 4 hears it from its start, while node 5 still waits for its share: its request
    # for node 1's share is held until node 4 has taken the writes, for a fast interpreter hands 60k keys over
    # before node 4 is up. Its packets to node 1's HTTP port that carry data are dropped: the connection is made
    # (a connect that timed out would fail the request at once) and the request waits, retransmitted, for its
    # own timeout; heartbeats pass.
    hold = ["OUTPUT", "-p", "tcp", "-d", healthy[0].address, "--dport", str(HTTP_PORT),
            "-m", "length", "--length", "120:65535", "-j", "DROP"]

    def write(key):
        with session() as own:
            state = own.get(joiner.url + "/health", timeout=5).json()["state"]
            return state, own.put(joiner.url + "/kv/" + key, json={"value": "later"}, timeout=5).status_code
    net.host(5).run(["iptables", "-w", "-A"] + hold)
    try:
        other = net.start(5, wait=False, env=env)
        wait_until(lambda: answers(other), 20, "node5 to answer", interval=0.02)
        joiner = net.start(4, wait=False, env=env)
        wait_until(lambda: answers(joiner), 20, "node4 to answer", interval=0.02)
        assert other.health()["state"] == "joining"
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(write, keys))
        assert other.health()["state"] == "joining"  # the hold held throughout
    finally:
        # Not left for the module's later tests, which use these hosts, if anything above failed.
        net.host(5).run(["iptables", "-w", "-D"] + hold)
    assert all(code in (200, 201, 503) for _, code in outcomes), outcomes
    acknowledged = [key for key, (_, code) in zip(keys, outcomes) if code in (200, 201)]
    # Most are taken while it joins; how many depends on how soon it hears its peers and loads its share (the
    # in-memory test in test_cluster_memory.py holds the joining case alone, deterministically).
    assert acknowledged, outcomes
    joiner.wait_ready()
    other.wait_ready()
    time.sleep(3.0)
    wrong = {node.node_id: [key for key in acknowledged
                            if s.get(node.url + "/kv/" + key, timeout=5).json().get("value") != "later"]
             for node in healthy + [skewed, joiner, other]}
    assert wrong == dict.fromkeys(wrong, []), wrong


def test_an_overwrite_with_a_ttl_during_a_join_that_replaced_both_owners_leaves_the_key_absent(net):
    """
    If keys held by nodes 2 and 3 hold a value, node 4 joins and takes both owners' places for them (with node 1),
    and they are overwritten with a 1 s TTL through node 1 as soon as it counts node 4, before the previous
    owners have handed them over (their hand-offs to node 4 are held until its copies have expired and been
    reclaimed: its packets from nodes 2 and 3 that carry data to its HTTP port are dropped), then once the
    hand-offs are done,
    every node answers 404 for each of them: no older value comes back (all clocks right).
    """
    from concurrent.futures import ThreadPoolExecutor

    from kvresponder.ring import HashRing

    nodes = start_cluster(net, [1, 2, 3])
    before = HashRing(["node1", "node2", "node3"])
    after = HashRing(["node1", "node2", "node3", "node4"])
    keys = [key for key in ("tj-%d" % i for i in range(20000))
            if set(before.preference_list(key, 2)) == {"node2", "node3"}
            and not {"node2", "node3"} & set(after.preference_list(key, 2))][:100]
    assert len(keys) == 100
    s = session()
    _fill_for_slow_hand_offs(s, nodes[1], "tj-fill-")
    for key in keys:
        assert s.put(nodes[1].url + "/kv/" + key, json={"value": "older"}, timeout=5).status_code == 201
    holds = [["INPUT", "-p", "tcp", "-s", node.address, "--dport", str(HTTP_PORT),
              "-m", "length", "--length", "120:65535", "-j", "DROP"] for node in nodes[1:]]

    def overwrite(key):
        with session() as own:
            return own.put(nodes[0].url + "/kv/" + key, json={"value": "short", "ttl": 1}, timeout=5).status_code
    held = []
    try:
        for hold in holds:
            net.host(4).run(["iptables", "-w", "-A"] + hold)
            held.append(hold)
        joiner = net.start(4, wait=False)
        wait_until(lambda: nodes[0].metric("kv_ring_members") == 4, 20, "node1 to count node4", interval=0.005)
        with ThreadPoolExecutor(max_workers=8) as pool:
            codes = list(pool.map(overwrite, keys))
        # Held until the TTL has run out and the sweep has reclaimed the new owners' copies (a second later): a
        # hand-off that arrived before would be refused as older than the write they hold.
        time.sleep(3.0)
    finally:
        # Not left for the module's later tests, which use host 4, if anything above failed.
        for hold in held:
            net.host(4).run(["iptables", "-w", "-D"] + hold)
    assert set(codes) <= {200, 201}, codes
    joiner.wait_ready()
    time.sleep(6.0)
    back = {node.node_id: [key for key in keys if s.get(node.url + "/kv/" + key, timeout=5).status_code != 404]
            for node in nodes + [joiner]}
    assert back == dict.fromkeys(back, []), back


# -- flapping partitions, and a kill, a join and a SIGTERM together -----------------------------------------


def test_a_flapping_partition_under_load_loses_no_acknowledged_write(net):
    """
    If node 3's network is cut and restored again and again (2.5 s cut, 1.5 s up, five times: each cut longer
    than PEER_TIMEOUT, so every node declares the other side dead and takes it back each time) under a load
    through every node, then once healed the cluster converges and no acknowledged write is lost.
    """
    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "flpre", 100)
    majority, isolated = nodes[:2], nodes[2]
    load = Load(history, Targets(nodes), "fl", workers=4, keys_per_worker=25, max_seconds=40,
                timeout=2.5).start()
    try:
        time.sleep(1.0)
        for _ in range(5):
            net.partition([isolated], majority)
            time.sleep(2.5)
            net.heal()
            time.sleep(1.5)
        net.wait_formed(nodes, timeout=15)
        time.sleep(1.5)
    finally:
        load.stop()
    finish(history, nodes, "flapping partition", load)


def test_a_join_right_after_a_kill_and_then_a_sigterm_under_load_loses_no_acknowledged_write(net):
    """
    If node 3 is killed (SIGKILL), node 4 joins at once while the ring settles, and node 1 is then SIGTERMed
    while node 4's share is still moving, all under a load through the live nodes, then the survivors converge
    and no acknowledged write is lost.
    """
    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "jkpre", 200)
    targets = Targets(nodes)
    load = Load(history, targets, "jk", workers=4, keys_per_worker=25, max_seconds=30,
                timeout=2.5).start()
    try:
        time.sleep(1.0)
        targets.remove(nodes[2])
        time.sleep(0.2)
        nodes[2].kill()
        joiner = net.start(4, wait=False)
        time.sleep(0.3)
        targets.add(joiner)
        time.sleep(0.5)
        targets.remove(nodes[0])
        time.sleep(0.2)
        assert nodes[0].terminate(timeout=30) in (0, -15), nodes[0].log_tail()
        joiner.wait_ready()
        survivors = [nodes[1], joiner]
        net.wait_formed(survivors, timeout=15)
        time.sleep(2.0)
    finally:
        load.stop()
    finish(history, survivors, "kill, join, sigterm", load)
