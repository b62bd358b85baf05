"""
DNS seeds on a network that drops multicast: three real nodes in their own namespaces, with every multicast
datagram dropped by iptables, find each other through the A records of one name (as a headless Service
gives them), and replicate.

``ip netns exec`` bind-mounts ``/etc/netns/<namespace>/hosts`` over ``/etc/hosts``, so each namespace
resolves the seed name to every node's address through the system resolver, as cluster DNS would.
"""

import os
import shutil
import time

import pytest

from .netns import network_for_test, session, wait_until

pytestmark = pytest.mark.netns

SEEDS = "kv-seeds.test"


@pytest.fixture
def network():
    written = []
    try:
        for net in network_for_test("the DNS seed test", "kvdns-"):
            yield net, written
    finally:
        for path in written:
            shutil.rmtree(path, ignore_errors=True)


def test_dns_seeds_form_the_cluster_when_multicast_is_dropped(network):
    net, written = network
    hosts = [net.host(index) for index in (31, 32, 33)]
    records = "".join("%s %s\n" % (host.address, SEEDS) for host in hosts)
    for host in hosts:
        directory = os.path.join("/etc/netns", host.ns)
        os.makedirs(directory, exist_ok=True)
        written.append(directory)
        with open(os.path.join(directory, "hosts"), "w") as hosts_file:
            hosts_file.write("127.0.0.1 localhost\n" + records)
        for chain, direction in (("INPUT", "-d"), ("OUTPUT", "-d")):
            host.run(["iptables", "-A", chain, direction, "224.0.0.0/4", "-j", "DROP"])
    env = {"DISCOVERY_MODE": "both", "DISCOVERY_DNS": SEEDS}
    nodes = [net.node(host.index, "dns%d" % (host.index,), env=env).start() for host in hosts]
    for node in nodes:
        node.wait_ready()
    wait_until(lambda: all(len(node.peers()) == 2 for node in nodes), 20, "every node to see two peers")
    assert all(node.metric("kv_ring_members") == 3 for node in nodes)

    client = session()
    for i in range(30):
        assert client.put(nodes[0].url + "/kv/k%d" % (i,), json={"value": i}, timeout=10).status_code == 201
    wait_until(lambda: sum(node.metric("kv_store_keys") for node in nodes) == 60, 20, "two copies of each key")
    for i in range(30):
        assert client.get(nodes[2].url + "/kv/k%d" % (i,), timeout=10).json()["value"] == i
    accepted = [node.metric("kv_discovery_messages_total", result="accepted") for node in nodes]
    assert all(count > 0 for count in accepted)


def _hosts_file(written, host, listed) -> None:
    directory = os.path.join("/etc/netns", host.ns)
    os.makedirs(directory, exist_ok=True)
    if directory not in written:
        written.append(directory)
    with open(os.path.join(directory, "hosts"), "w") as hosts_file:
        hosts_file.write("127.0.0.1 localhost\n" + "".join("%s %s\n" % (other.address, SEEDS) for other in listed))


@pytest.mark.parametrize("mode", ["both", "dns"])
def test_a_new_node_whose_dns_record_lags_joins_every_ring_and_stays(network, mode):
    """
    If a node starts where multicast is dropped and its peers' DNS does not list it yet (a new pod, before its
    record is published and looked up), then its peers answer it and go on heartbeating it at the address it
    sent from: it joins a ring of four and stays there, and reads of keys the cluster holds find them through it.
    Before, in ``both`` mode its peers answered only to the group: it served alone in a ring of one, answering 404
    for every key and acknowledging writes with one copy; in ``dns`` mode it joined, then timed its peers out.
    """
    net, written = network
    old = [net.host(index) for index in (41, 42, 43)]
    new = net.host(44)
    for host in old:
        _hosts_file(written, host, old)  # not the new node: its record lags
        for chain in ("INPUT", "OUTPUT"):
            host.run(["iptables", "-A", chain, "-d", "224.0.0.0/4", "-j", "DROP"])
    _hosts_file(written, new, old + [new])
    for chain in ("INPUT", "OUTPUT"):
        new.run(["iptables", "-A", chain, "-d", "224.0.0.0/4", "-j", "DROP"])
    env = {"DISCOVERY_MODE": mode, "DISCOVERY_DNS": SEEDS}
    nodes = [net.node(host.index, "lag%d" % (host.index,), env=env).start() for host in old]
    for node in nodes:
        node.wait_ready()
    wait_until(lambda: all(node.metric("kv_ring_members") == 3 for node in nodes), 20, "a ring of three")
    client = session()
    for i in range(20):
        assert client.put(nodes[0].url + "/kv/k%d" % (i,), json={"value": i}, timeout=10).status_code == 201
    joining = net.node(new.index, "lag44", env=env).start()
    joining.wait_ready(30)
    everyone = nodes + [joining]
    wait_until(lambda: all(node.metric("kv_ring_members") == 4 for node in everyone), 20, "every ring to hold four")
    # Longer than PEER_TIMEOUT (three heartbeats): the peers keep heartbeating it, so it times none of them out.
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        assert joining.metric("kv_ring_members") == 4, joining.log_tail()
        time.sleep(0.25)
    wait_until(lambda: all(client.get(joining.url + "/kv/k%d" % (i,), timeout=10).status_code == 200
                           for i in range(20)), 20, "every key read through the new node")


def test_a_seed_lookup_runs_on_a_daemon_thread_of_its_own_not_the_reactors_pool():
    """
    If a DNS seed lookup hangs (a failing resolver retries for tens of seconds), then it holds no thread of the
    reactor's pool, which the reactor joins as it stops (a node SIGTERMed meanwhile stayed up past its pod's grace
    period), but a daemon thread that does not keep the process alive; its answer still reaches the reactor's
    thread, and a failed lookup arrives as a failure.
    """
    import socket
    import threading
    from unittest import mock

    from kvresponder.discovery import resolve_all

    release = threading.Event()
    delivered = []

    class Reactor:
        def getThreadPool(self):
            raise AssertionError("the lookup went to the reactor's thread pool")

        def callFromThread(self, function, *args):
            delivered.append(threading.current_thread().name)
            function(*args)

    def hanging(name, *args):
        release.wait(10)
        if name == "bad":
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("10.0.0.7", 0)),
                (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("10.0.0.5", 0))]

    with mock.patch("socket.getaddrinfo", hanging):
        answers, failures = [], []
        resolve_all(Reactor(), "kv-headless").addCallback(answers.append)
        resolve_all(Reactor(), "bad").addErrback(failures.append)
        lookups = [thread for thread in threading.enumerate() if thread.name == "kvresponder-dns-seeds"]
        assert len(lookups) == 2 and all(thread.daemon for thread in lookups)
        release.set()
        for thread in lookups:
            thread.join(5)
    assert answers == [["10.0.0.5", "10.0.0.7"]]
    assert len(failures) == 1 and failures[0].check(socket.gaierror)
