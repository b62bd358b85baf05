"""
A small private network of Linux network namespaces, one real ``twistd -n kvresponder`` node in each.

Layout (every name carries a random per-run tag, so that cleanup deletes only what this run created)::

    root namespace                hub namespace "kvhub-<tag>"           node namespaces "kvns-<tag>-<i>"
    kvr<tag> 10.231.X.1/24 ====== kvp<tag> -+- bridge kvb<tag> -+- kvh<tag><i> ==== kvn<tag><i> 10.231.X.(10+i)
                                            |                   |   (lo up, 224.0.0.0/4 dev kvn<tag><i>)
                                            +-- ...             +-- attacker namespace, etc.

The bridge lives in its own hub namespace, so that bridged traffic never crosses the host's iptables FORWARD
chain (br_netfilter) and nothing but one veth end with a private address is added to the root namespace:
that is how the test process reaches the nodes. The root namespace's interfaces, routes and iptables are
never touched; iptables rules (partitions) are only ever added inside the node namespaces.

Nodes are stopped by their PID only (``ip netns exec`` execs the command, so the PID is twistd's).
"""

import atexit
import fcntl
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional

import requests

from .harness import REPO, TWISTD, die_with_parent, node_env, read_log_messages

TENANT = "chaos"
HTTP_PORT = 3000
DISCOVERY_PORT = 9999

#: The settings the brief fixes for the chaos nodes.
NODE_ENV = {
    "HEARTBEAT_INTERVAL": "0.5",
    "ANTI_ENTROPY_INTERVAL": "3",
    "DRAIN_TIMEOUT": "15",
    "PEER_REQUEST_TIMEOUT": "1",
    "REPLICATION_FACTOR": "2",
    "DISCOVERY_MODE": "multicast",
}

_LOCK = "/tmp/kvchaos-subnet.lock"


class NetnsUnavailable(Exception):
    """
    This host cannot build the network (not root, no ``ip``, no namespaces): the tests skip (or fail in CI).
    """


def _run(command: List[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(command), result.returncode,
                                                   result.stderr.decode("utf-8", "replace").strip()))
    return result


def session() -> requests.Session:
    """
    A requests session that ignores proxy variables: every address here is a private namespace address.
    """
    s = requests.Session()
    s.trust_env = False
    return s


def wait_until(predicate: Callable[[], bool], timeout: float, message: str,
               describe: Optional[Callable[[], str]] = None, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            if predicate():
                return
        except (requests.RequestException, KeyError, ValueError) as error:
            last = error
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError("timed out after %ss waiting for %s (last error: %s)%s" % (
        timeout, message, last, ("\n" + describe()) if describe else ""))


def parse_metrics(text: str) -> Dict[str, float]:
    """
    Prometheus text to ``{'name{label="v",...}': value}`` (the series line as written, minus the value).
    """
    series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            series[name] = float(value)
        except ValueError:
            continue
    return series


def metric_sum(series: Dict[str, float], name: str, **labels: str) -> float:
    """
    The sum of every series of ``name`` whose labels include ``labels``.
    """
    total = 0.0
    wanted = ['%s="%s"' % item for item in labels.items()]
    for line, value in series.items():
        if line == name or line.startswith(name + "{"):
            if all(label in line for label in wanted):
                total += value
    return total


class Host:
    """
    One namespace on the bridge: its name, its veth pair and its address.
    """

    def __init__(self, network: "Network", index: int) -> None:
        self.index = index
        self.ns = "kvns-%s-%d" % (network.tag, index)
        self.veth_hub = "kvh%s%d" % (network.tag, index)
        self.veth = "kvn%s%d" % (network.tag, index)
        self.address = "%s.%d" % (network.prefix, 10 + index)
        self.created = False

    def exec_args(self, command: List[str]) -> List[str]:
        return ["ip", "netns", "exec", self.ns] + command

    def run(self, command: List[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
        return _run(self.exec_args(command), check=check, timeout=timeout)


class ChaosNode:
    """
    One ``twistd -n kvresponder`` inside its namespace, reached at ``http://<address>:3000/chaos``.
    """

    def __init__(self, network: "Network", host: Host, node_id: str, env: Dict[str, str]) -> None:
        self.network = network
        self.host = host
        self.node_id = node_id
        self.address = host.address
        self.url = "http://%s:%d/%s" % (host.address, HTTP_PORT, TENANT)
        self.log_path = os.path.join(network.log_dir, "%s.log" % (node_id,))
        self.env = env
        #: The work tree whose code it runs (the network's; a test may point it at another version's).
        self.repo = network.repo
        self.process: Optional[subprocess.Popen] = None
        self._log = None
        self.session = session()
        self.starts = 0

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> "ChaosNode":
        assert not self.alive, "%s is already running" % (self.node_id,)
        command = self.host.exec_args([
            self.network.python, "-c", TWISTD, "-n", "--pidfile=", "kvresponder",
            "--tenant", TENANT, "--port", str(HTTP_PORT), "--node-id", self.node_id])
        self._log = open(self.log_path, "ab")
        self._log.write(b"----- start %d of %s -----\n" % (self.starts + 1, self.node_id.encode()))
        self._log.flush()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.repo, preexec_fn=die_with_parent)
        self.starts += 1
        self.session = session()
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def run_code_of(self, tree: str) -> None:
        """
        From its next start, run the code of work tree ``tree`` (``python -c`` puts the working directory first
        on ``sys.path``, so it is the tree's own, as is ``PYTHONPATH``).
        """
        assert not self.alive
        old = self.repo
        self.repo = tree
        paths = [tree if path == old else path for path in self.env["PYTHONPATH"].split(os.pathsep)]
        self.env["PYTHONPATH"] = os.pathsep.join(paths)

    def kill(self) -> None:
        """
        SIGKILL by PID: no drain, no leaving heartbeat.
        """
        if self.alive:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._close_log()

    def terminate(self, timeout: float = 30.0) -> int:
        """
        SIGTERM by PID and wait for the drain and the exit.
        """
        if not self.alive:
            return self.process.returncode if self.process else 0
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready():
            if self.process.poll() is not None:
                raise AssertionError("%s exited with %s:\n%s" % (self.node_id, self.process.returncode,
                                                                 self.log_tail()))
            return self.session.get(self.url + "/health/ready", timeout=1).status_code == 200
        wait_until(ready, timeout, "%s to be ready" % (self.node_id,), self.log_tail, interval=0.05)

    # -- observation ----------------------------------------------------------------------------------

    def metrics(self) -> Dict[str, float]:
        return parse_metrics(self.session.get(self.url + "/metrics", timeout=5).text)

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    def peers(self) -> List[dict]:
        return self.session.get(self.url + "/peers", timeout=5).json()

    def health(self) -> dict:
        return self.session.get(self.url + "/health", timeout=5).json()

    def log_tail(self, lines: int = 25, width: int = 400) -> str:
        try:
            with open(self.log_path, "rb") as log:
                tail = log.read().splitlines()[-lines:]
        except OSError:
            return ""
        return "== %s (%s) ==\n%s" % (self.node_id, self.log_path, "\n".join(
            line.decode("utf-8", "replace")[:width] for line in tail))

    def log_messages(self) -> List[dict]:
        return read_log_messages(self.log_path)


class Network:
    """
    The hub, the bridge, and namespaces added on demand. Use as a context manager, or call :meth:`close` in
    a ``finally``: it stops every node this object started and deletes every object it created, even after
    a failure halfway through :meth:`open`.
    """

    def __init__(self, log_dir: str, python: str = sys.executable, extra_env: Optional[Dict[str, str]] = None,
                 tag: Optional[str] = None, repo: str = REPO) -> None:
        self.log_dir = log_dir
        self.python = python
        #: The checkout the nodes run (its kvresponder package and twisted plugin).
        self.repo = repo
        self.extra_env = dict(extra_env or {})
        self.tag = tag or secrets.token_hex(3)
        self.secret_suffix = secrets.token_hex(8)
        self.hub = "kvhub-%s" % (self.tag,)
        self.bridge = "kvb%s" % (self.tag,)
        self.veth_root = "kvr%s" % (self.tag,)
        self.veth_hub = "kvp%s" % (self.tag,)
        self.prefix: Optional[str] = None
        self.gateway: Optional[str] = None
        self.hosts: Dict[int, Host] = {}
        self.nodes: Dict[str, ChaosNode] = {}
        self._created: List[str] = []   # "netns:<name>" / "link:<name>", in creation order
        self._partitioned: List[Host] = []

    # -- building -------------------------------------------------------------------------------------

    @staticmethod
    def check_available() -> None:
        """
        :raises NetnsUnavailable: naming what is missing.
        """
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (running as uid %d)" % (os.geteuid(),))
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable("%s is not installed" % (tool,))

    def __enter__(self) -> "Network":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "Network":
        self.check_available()
        # A backstop for an interrupted run; close() is idempotent.
        atexit.register(self.close)
        with open(_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                octet = self._free_octet()
                self.prefix = "10.231.%d" % (octet,)
                self.gateway = self.prefix + ".1"
                try:
                    self._ip(["netns", "add", self.hub], "netns:" + self.hub)
                except RuntimeError as error:
                    raise NetnsUnavailable("cannot create a network namespace: %s" % (error,))
                self._ip(["-n", self.hub, "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0"])
                self._ip(["link", "add", self.veth_root, "type", "veth", "peer", "name", self.veth_hub,
                          "netns", self.hub], "link:" + self.veth_root)
                self._disable_ipv6_root(self.veth_root)
                self._ip(["addr", "add", self.gateway + "/24", "dev", self.veth_root])
                self._ip(["-n", self.hub, "link", "set", self.veth_hub, "master", self.bridge, "up"])
                self._ip(["-n", self.hub, "link", "set", self.bridge, "up"])
                self._ip(["-n", self.hub, "link", "set", "lo", "up"])
                self._ip(["link", "set", self.veth_root, "up"])
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return self

    def _free_octet(self) -> int:
        """
        A random X such that 10.231.X.0/24 overlaps no address or route of this host (default routes aside).
        """
        networks = []
        for line in _run(["ip", "-o", "-4", "addr", "show"]).stdout.decode().splitlines():
            match = re.search(r"inet (\S+)", line)
            if match:
                networks.append(ipaddress.IPv4Interface(match.group(1)).network)
        for line in _run(["ip", "-4", "route", "show", "table", "all"]).stdout.decode().splitlines():
            words = line.split()
            if words[0] in ("broadcast", "local", "unicast", "multicast", "blackhole", "unreachable"):
                words = words[1:]
            if not words or words[0] == "default":
                continue
            try:
                networks.append(ipaddress.IPv4Network(words[0], strict=False))
            except ValueError:
                continue
        choices = [octet for octet in range(100, 250)
                   if not any(ipaddress.IPv4Network("10.231.%d.0/24" % (octet,)).overlaps(net) for net in networks)]
        if not choices:
            raise NetnsUnavailable("no free 10.231.X.0/24 subnet on this host")
        return random.choice(choices)

    def _ip(self, args: List[str], record: Optional[str] = None) -> None:
        _run(["ip"] + args)
        if record:
            self._created.append(record)

    @staticmethod
    def _disable_ipv6_root(interface: str) -> None:
        # Our own interface only: keeps router solicitations and MLD reports off the bridge.
        path = "/proc/sys/net/ipv6/conf/%s/disable_ipv6" % (interface,)
        if os.path.exists(path):
            with open(path, "w") as handle:
                handle.write("1")

    def host(self, index: int) -> Host:
        """
        The namespace with address 10.231.X.(10+index), created on first use.
        """
        if index in self.hosts:
            return self.hosts[index]
        assert 0 < index < 240
        host = Host(self, index)
        self.hosts[index] = host
        self._ip(["netns", "add", host.ns], "netns:" + host.ns)
        host.created = True
        self._ip(["-n", self.hub, "link", "add", host.veth_hub, "type", "veth", "peer", "name", host.veth,
                  "netns", host.ns])
        self._ip(["-n", self.hub, "link", "set", host.veth_hub, "master", self.bridge, "up"])
        for command in (["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                        ["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]):
            host.run(command, check=False)
        self._ip(["-n", host.ns, "link", "set", "lo", "up"])
        self._ip(["-n", host.ns, "addr", "add", host.address + "/24", "dev", host.veth])
        self._ip(["-n", host.ns, "link", "set", host.veth, "up"])
        self._ip(["-n", host.ns, "route", "add", "224.0.0.0/4", "dev", host.veth])
        return host

    # -- nodes ----------------------------------------------------------------------------------------

    def node(self, index: int, node_id: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> ChaosNode:
        """
        A node (not yet started) in namespace ``index``. Reusing a node id reuses its object: a restart at
        the same address.
        """
        node_id = node_id or "node%d" % (index,)
        existing = self.nodes.get(node_id)
        if existing is not None:
            assert not existing.alive
            return existing
        host = self.host(index)
        merged = dict(NODE_ENV)
        # The network's own secret: a node without one serves alone. extra_env or env may replace it.
        merged["CLUSTER_SECRET"] = "chaos-" + self.tag + "-" + self.secret_suffix
        merged.update(self.extra_env)
        merged.update(env or {})
        merged["ADVERTISE_ADDRESS"] = host.address
        merged["DISCOVERY_INTERFACE"] = host.address
        merged["DISCOVERY_PORT"] = str(DISCOVERY_PORT)
        env = node_env(merged)
        if self.repo != REPO:
            env["PYTHONPATH"] = self.repo + os.pathsep + env["PYTHONPATH"]
        node = ChaosNode(self, host, node_id, env)
        self.nodes[node_id] = node
        return node

    def start(self, index: int, node_id: Optional[str] = None, wait: bool = True, **kwargs) -> ChaosNode:
        node = self.node(index, node_id, **kwargs).start()
        if wait:
            node.wait_ready()
        return node

    @property
    def alive(self) -> List[ChaosNode]:
        return [node for node in self.nodes.values() if node.alive]

    def describe(self) -> str:
        return "\n".join(node.log_tail(6, 300) for node in self.nodes.values() if node.process is not None)

    def wait_formed(self, nodes: Optional[Iterable[ChaosNode]] = None, timeout: float = 20.0) -> None:
        """
        Wait until each of ``nodes`` (default: every running node) has exactly the others as live peers
        and a ring of that size: proof that multicast crosses the bridge.
        """
        members = list(nodes if nodes is not None else self.alive)
        ids = {node.node_id for node in members}

        def formed():
            for node in members:
                peers = {peer["id"] for peer in node.peers() if peer["state"] == "alive"}
                if peers != ids - {node.node_id} or node.metric("kv_ring_members") != len(ids):
                    return False
            return True
        wait_until(formed, timeout, "a ring of %s" % (sorted(ids),), self.describe)

    def total(self, name: str, nodes: Optional[Iterable[ChaosNode]] = None, **labels: str) -> float:
        return sum(node.metric(name, **labels) for node in (nodes if nodes is not None else self.alive))

    def stop_all(self) -> None:
        """
        SIGKILL every running node (by PID) and forget them; the namespaces stay for the next scenario.
        """
        for node in list(self.nodes.values()):
            node.kill()
        self.nodes.clear()
        self.heal()

    # -- faults ---------------------------------------------------------------------------------------

    def partition(self, side_a: Iterable[ChaosNode], side_b: Iterable[ChaosNode]) -> None:
        """
        Drop every packet between the two sides, in both directions, with iptables rules inside each
        node's namespace (INPUT by source, OUTPUT by destination). The test process still reaches every
        node.
        """
        side_a, side_b = list(side_a), list(side_b)
        for here, there in [(a, b) for a in side_a for b in side_b] + [(b, a) for a in side_a for b in side_b]:
            host = here.host
            host.run(["iptables", "-w", "-A", "INPUT", "-s", there.address, "-j", "DROP"])
            host.run(["iptables", "-w", "-A", "OUTPUT", "-d", there.address, "-j", "DROP"])
            if host not in self._partitioned:
                self._partitioned.append(host)

    def heal(self) -> None:
        for host in self._partitioned:
            host.run(["iptables", "-w", "-F", "INPUT"], check=False)
            host.run(["iptables", "-w", "-F", "OUTPUT"], check=False)
        self._partitioned = []

    # -- teardown -------------------------------------------------------------------------------------

    def close(self) -> None:
        """
        Stop the nodes this object started (by PID), then delete exactly the namespaces and links it
        created. Never raises; leftovers are reported on stderr.
        """
        for node in list(self.nodes.values()):
            try:
                node.kill()
            except Exception as error:  # pragma: no cover - best effort
                sys.stderr.write("netns: could not kill %s: %s\n" % (node.node_id, error))
        self.nodes.clear()
        self._partitioned = []
        for record in reversed(self._created):
            kind, name = record.split(":", 1)
            if kind == "netns":
                result = _run(["ip", "netns", "del", name], check=False)
            else:
                result = _run(["ip", "link", "del", name], check=False)
            if result.returncode != 0 and b"No such" not in result.stderr and b"Cannot find" not in result.stderr:
                sys.stderr.write("netns: could not delete %s: %s\n" % (record, result.stderr.decode().strip()))
        self._created = []
        self.hosts.clear()

    def leftovers(self) -> List[str]:
        """
        Names of this run's objects still present (should be empty after :meth:`close`).
        """
        found = []
        namespaces = _run(["ip", "netns", "list"], check=False).stdout.decode()
        links = _run(["ip", "-o", "link", "show"], check=False).stdout.decode()
        for line in namespaces.splitlines() + links.splitlines():
            if self.tag in line:
                found.append(line.strip())
        return found


def network_for_test(what: str, log_prefix: str, **settings):
    """
    A :class:`Network` for one test, as a generator for a pytest fixture: yields the open network, then closes it
    and fails the test if anything it created is left behind. Without root, ``ip`` or ``iptables``, or where
    namespaces cannot be built, the test skips (fails under CI, which installs them all).

    :param what: the tests, for the skip's reason ("the DNS seed test").
    """
    import pytest

    def unavailable(reason: str) -> None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("%s builds network namespaces and needs root" % (what,))
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            unavailable("%s needs %s" % (what, tool))
    log_dir = tempfile.mkdtemp(prefix=log_prefix)
    net = Network(log_dir, **settings)
    try:
        try:
            net.open()
        except (NetnsUnavailable, RuntimeError) as error:
            unavailable("cannot build network namespaces here: %s" % (error,))
        yield net
    finally:
        net.close()
        shutil.rmtree(log_dir, ignore_errors=True)
        assert net.leftovers() == [], "namespaces or links left behind"
