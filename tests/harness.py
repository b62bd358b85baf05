"""
Real ``twistd -n kvresponder`` processes on loopback, for end-to-end tests.

Each node gets a free HTTP port; a test's nodes share one free discovery port (several processes on one host
share it, as in production). Processes are stopped by their PID, never by name.
"""

import ctypes
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

import requests

#: Linux's fcntl to set a pipe's capacity (PyPy's fcntl module does not name it).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: Runs twistd with the interpreter given (CPython or PyPy), whatever its scripts directory.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _PRCTL = None


def die_with_parent() -> None:
    """
    A ``preexec_fn``: in the child, before exec, ask for SIGKILL when the thread that started it dies, so that
    no node (or tool) a test started outlives a test run that was killed, SIGKILL included, which runs no cleanup.
    Start children with it from the main thread only: a worker thread's end would kill them. (``prctl`` is
    resolved before the fork: the child only makes the system call.)
    """
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


def node_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("KV_", "TENANT", "PORT", "DISCOVERY_", "ADVERTISE_", "POD_IP", "NODE_ID",
                                  "REPLICATION_", "MAX_", "LOG_", "JAEGER", "OTEL_", "CLUSTER_SECRET",
                                  "ADMIN_TOKEN", "HEARTBEAT", "PEER_", "DRAIN_", "INSECURE_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def read_log_messages(path: str) -> List[dict]:
    """
    The JSON log lines of a node's log file (other lines, such as a harness's markers, are skipped).
    """
    messages = []
    with open(path, "rb") as log:
        for line in log:
            try:
                messages.append(json.loads(line))
            except ValueError:
                pass
    return messages


class NodeProcess:
    """
    One node. ``url`` is its ``/<tenant>`` base URL.
    """

    def __init__(self, tenant: str, node_id: str, discovery_port: int, log_dir: str,
                 env: Optional[Dict[str, str]] = None, args: Optional[List[str]] = None,
                 port: Optional[int] = None, python: str = sys.executable, stdout=None) -> None:
        self.tenant = tenant
        self.node_id = node_id
        self.port = port or free_port()
        self.discovery_port = discovery_port
        self.log_path = os.path.join(log_dir, "%s.log" % (node_id,))
        self.env = node_env(env)
        self.args = args or []
        self.python = python
        #: Where its stdout goes (``subprocess.PIPE``, for one); by default, with stderr, to ``log_path``.
        self.stdout = stdout
        self.process: Optional[subprocess.Popen] = None
        self.url = "http://127.0.0.1:%d/%s" % (self.port, tenant)

    def start(self) -> "NodeProcess":
        command = [self.python, "-c", TWISTD, "-n", "--pidfile=", "kvresponder",
                   "--tenant", self.tenant, "--port", str(self.port), "--node-id", self.node_id,
                   "--discovery-port", str(self.discovery_port)] + self.args
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._log if self.stdout is None else self.stdout,
                                        stderr=self._log, env=self.env, cwd=REPO, preexec_fn=die_with_parent)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("%s exited with %s:\n%s" % (self.node_id, self.process.returncode,
                                                                 self.log_tail()))
            try:
                if requests.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise AssertionError("%s not ready after %ss:\n%s" % (self.node_id, timeout, self.log_tail()))

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return b"\n".join(log.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def log_messages(self) -> List[dict]:
        return read_log_messages(self.log_path)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """
        SIGTERM, as Kubernetes sends it; wait for the drain and the exit.
        """
        if not self.alive:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """
        SIGKILL: no drain, no leaving message.
        """
        if self.alive:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self._log.close()

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=5).text
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(name)
        return total

    def put(self, key: str, value, ttl=None, timeout: float = 10.0) -> requests.Response:
        body = {"value": value}
        if ttl is not None:
            body["ttl"] = ttl
        return requests.put(self.url + "/kv/" + requests.utils.quote(key, safe=""), json=body, timeout=timeout)

    def get(self, key: str, timeout: float = 10.0) -> requests.Response:
        return requests.get(self.url + "/kv/" + requests.utils.quote(key, safe=""), timeout=timeout)


class Cluster:
    """
    A set of nodes of one tenant on one discovery port; stops every node it started.
    """

    def __init__(self, tenant: str, log_dir: str, env: Optional[Dict[str, str]] = None,
                 discovery_port: Optional[int] = None) -> None:
        self.tenant = tenant
        self.log_dir = log_dir
        # A secret of its own: a node without one serves alone (set CLUSTER_SECRET to "" to start such nodes).
        self.env = {"HEARTBEAT_INTERVAL": "0.5", "ANTI_ENTROPY_INTERVAL": "5", "DRAIN_TIMEOUT": "15",
                    "CLUSTER_SECRET": "test-cluster-" + secrets.token_hex(12)}
        self.env.update(env or {})
        self.discovery_port = discovery_port or free_udp_port()
        self.nodes: List[NodeProcess] = []

    def add(self, node_id: Optional[str] = None, wait: bool = True, **kwargs) -> NodeProcess:
        env = dict(self.env)
        env.update(kwargs.pop("env", None) or {})
        node = NodeProcess(self.tenant, node_id or "n%d" % (len(self.nodes) + 1,), self.discovery_port,
                           self.log_dir, env=env, **kwargs).start()
        self.nodes.append(node)
        if wait:
            node.wait_ready()
        return node

    @property
    def alive(self) -> List[NodeProcess]:
        return [node for node in self.nodes if node.alive]

    def wait_for(self, predicate, timeout: float = 20.0, message: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (requests.RequestException, KeyError) as error:
                last = error
            time.sleep(0.1)
        raise AssertionError("timed out waiting for %s (%s)\n%s" % (
            message, last, "\n".join(node.log_tail(8) for node in self.nodes)))

    def wait_formed(self, timeout: float = 20.0) -> None:
        expected = len(self.alive)
        self.wait_for(lambda: all(node.metric("kv_ring_members") == expected for node in self.alive),
                      timeout, "every node to see %d ring members" % (expected,))

    def total_keys(self) -> float:
        return sum(node.metric("kv_store_keys") for node in self.alive)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.kill()


def run_curl(line: str, base: str) -> requests.Response:
    """
    Send the request a documented ``curl`` command line sends, to ``base`` (``http://host:port``) in place of
    the command's own scheme, host and port: so that a test can run the commands a page or the chart's notes
    give, as written. It knows the options the docs use (``-s``, ``-X``, ``-H``, ``-d``/``--data``, ``-o``,
    ``-w``), and sends what curl sends for them: ``-d`` without a ``Content-Type`` header is a form post.

    :raises ValueError: for any other option, so that a page cannot drift into commands this cannot check.
    """
    import shlex
    from urllib.parse import urlsplit

    words = shlex.split(line)
    if not words or words[0] != "curl":
        raise ValueError("not a curl command: %r" % (line,))
    method, headers, data, url = None, {}, None, None
    index = 1
    while index < len(words):
        word = words[index]
        if word == "-s":
            pass
        elif word in ("-X", "-H", "-d", "--data", "-o", "-w"):
            index += 1
            value = words[index]
            if word == "-X":
                method = value
            elif word == "-H":
                name, _, header = value.partition(":")
                headers[name.strip()] = header.strip()
            elif word in ("-d", "--data"):
                data = value.encode("utf-8")
        elif word.startswith("-"):
            raise ValueError("an option run_curl does not know: %r in %r" % (word, line))
        else:
            url = word
        index += 1
    if url is None:
        raise ValueError("no URL in %r" % (line,))
    if data is not None:
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    parts = urlsplit(url)
    target = base + parts.path + ("?" + parts.query if parts.query else "")
    return requests.request(method or ("POST" if data is not None else "GET"), target, data=data, headers=headers,
                            timeout=10)


def check_verify_commands(commands: List[str], tenant: str, log_dir: str) -> None:
    """
    Run the commands a page gives to verify a tenant (``curl`` lines: its health, a PUT of ``greeting`` and the
    GET back, its peers, another tenant's prefix) as written, against a real node of ``tenant`` alone, and check
    each does what such a page says: 200, 201, the value back, no peers, 404.
    """
    expected_kinds = {"health", "put", "get", "peers", "other tenant"}
    node = NodeProcess(tenant, "n1", free_udp_port(), log_dir, env={"CLUSTER_SECRET": ""}).start()
    try:
        node.wait_ready()
        seen = set()
        for command in commands:
            answer = run_curl(command, "http://127.0.0.1:%d" % (node.port,))
            if "/%s/" % (tenant,) not in command:
                kind, ok = "other tenant", answer.status_code == 404
            elif " PUT " in command:
                kind, ok = "put", answer.status_code == 201
            elif command.rstrip().endswith("/kv/greeting"):
                kind, ok = "get", answer.status_code == 200 and answer.json()["value"] == "hello"
            elif command.rstrip().endswith("/peers"):
                kind, ok = "peers", answer.status_code == 200 and answer.json() == []
            else:
                kind, ok = "health", answer.status_code == 200
            assert ok, (command, answer.status_code, answer.text[:300])
            seen.add(kind)
        assert seen == expected_kinds, (seen, commands)
    finally:
        node.kill()


def rss_bytes(pid: int) -> int:
    """
    The resident memory of process ``pid``, in bytes.
    """
    with open("/proc/%d/status" % (pid,)) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")

