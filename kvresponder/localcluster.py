"""
``kvresponder-local-cluster``: a real cluster of one tenant on this machine's loopback, for trying the service
without Kubernetes.

It starts N ``twistd -n --pidfile= kvresponder`` processes (the same entrypoint as the container), each on its
own HTTP port on 127.0.0.1 and all on one UDP discovery port, so that they find each other by multicast on the
loopback interface exactly as pods do on a node. It waits until every node reports ready, prints the URLs and a
few commands to try, and stays in the foreground. Ctrl-C (or SIGTERM) sends SIGTERM to each node by its PID,
waits while the nodes drain, and exits. Nothing listens on, or sends to, any address but loopback.

Admin writes are allowed without a token (``--insecure-admin``): acceptable only because every port is bound
to 127.0.0.1. The nodes sign their heartbeats and peer calls with a cluster secret generated for the run, unless
``CLUSTER_SECRET`` is set (a node without one serves alone).
"""

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional

from .settings import SettingsError, load_settings

LOOPBACK = "127.0.0.1"
HEARTBEAT_INTERVAL = "1"
#: ``twistd`` run by this very interpreter. (``python -m twisted`` is ``twist``, which has no ``-n``, and
#: ``twisted.scripts.twistd`` has no ``__main__`` guard.)
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
#: Seconds to wait for every node to report ready.
READY_TIMEOUT = 60.0
#: Seconds a stopping node may take beyond its drain (DRAIN_TIMEOUT, 20 s by default): the drain's guard, the wait
#: for the requests it took, and its own shutdown.
STOP_MARGIN = 15.0
DEFAULT_DRAIN_TIMEOUT = 20.0


def stop_timeout(environ=os.environ) -> float:
    """
    Seconds to wait for a stopping node before SIGKILL: its drain, as the environment the nodes inherit sets it,
    and the margin. A fixed wait killed nodes mid-drain under a longer DRAIN_TIMEOUT.
    """
    try:
        drain = float(environ.get("DRAIN_TIMEOUT") or DEFAULT_DRAIN_TIMEOUT)
    except ValueError:
        drain = DEFAULT_DRAIN_TIMEOUT  # the node refuses it and exits at once
    return max(drain, 0.0) + STOP_MARGIN
#: Settings the launcher fixes on the command line; the same variables in the caller's environment would
#: only be overridden, except LOG_FILE, which would send the logs away from --log-dir.
_DROPPED_ENVIRONMENT = ("LOG_FILE",)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kvresponder-local-cluster",
        description="Run a KV Responder cluster of one tenant on loopback (127.0.0.1), in the foreground. "
                    "Ctrl-C stops every node; each one drains first. Admin writes need no token "
                    "(--insecure-admin), which is safe only because nothing listens beyond loopback. The nodes "
                    "share a cluster secret generated for the run, unless CLUSTER_SECRET is set.")
    parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    parser.add_argument("--tenant", default="demo", help="tenant served, the URL prefix (default: demo)")
    parser.add_argument("--base-port", type=int, default=3000,
                        help="HTTP port of node-1; node-K listens on base+K-1 (default: 3000)")
    parser.add_argument("--discovery-port", type=int, default=9999,
                        help="UDP discovery port shared by the nodes (default: 9999)")
    parser.add_argument("--log-dir", default="kvresponder-logs",
                        help="directory of the nodes' Eliot logs, node-K.log, rewritten on each run "
                             "(default: ./kvresponder-logs)")
    parser.add_argument("--replicas", type=int, default=2, help="copies kept of each key (default: 2)")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 64:
        parser.error("--nodes must be between 1 and 64")
    if not 1 <= args.base_port or args.base_port + args.nodes - 1 > 65535:
        parser.error("--base-port: ports %d..%d are not all valid" % (args.base_port,
                                                                      args.base_port + args.nodes - 1))
    # The nodes apply the same checks; running them here reports a bad value once, before anything starts.
    try:
        load_settings({"tenant": args.tenant, "port": str(args.base_port),
                       "discovery-port": str(args.discovery_port), "replicas": str(args.replicas),
                       "node-id": "node-1"}, {})
    except SettingsError as error:
        parser.error(str(error))
    return args


def node_command(args: argparse.Namespace, index: int, python: str = sys.executable) -> List[str]:
    """
    The command line of node ``index`` (1-based).
    """
    return [
        python, "-c", TWISTD, "-n", "--pidfile=", "kvresponder",
        "--tenant", args.tenant,
        "--node-id", "node-%d" % (index,),
        "--port", str(args.base_port + index - 1),
        # Loopback whatever LISTEN_ADDRESS the caller's environment has: admin writes need no token here.
        "--listen-address", LOOPBACK,
        "--advertise-address", LOOPBACK,
        "--discovery-mode", "multicast",
        "--discovery-interface", LOOPBACK,
        "--discovery-port", str(args.discovery_port),
        "--heartbeat-interval", HEARTBEAT_INTERVAL,
        "--replicas", str(args.replicas),
        "--insecure-admin",
    ]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return "ended by %s" % (signal.Signals(-returncode).name,)
        except ValueError:
            return "ended by signal %d" % (-returncode,)
    return "exited with status %d" % (returncode,)


def _udp_port_in_use(port: int) -> bool:
    """
    Whether another process holds UDP ``port`` so that the nodes cannot share it (bound without SO_REUSEADDR, as
    the nodes bind it with): each would exit at once.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Twisted binds its listeners: connections of a cluster just stopped, left in TIME_WAIT, do not
        # keep the nodes from listening again, so they must not fail the check either.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """
    In the child, before exec: on Linux, ask the kernel for SIGTERM if the launcher dies without stopping
    its nodes (SIGKILL), so that no node outlives it unseen.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class Node:
    def __init__(self, index: int, args: argparse.Namespace, log_dir: str) -> None:
        self.index = index
        self.name = "node-%d" % (index,)
        self.port = args.base_port + index - 1
        self.url = "http://%s:%d/%s" % (LOOPBACK, self.port, args.tenant)
        self.log_path = os.path.join(log_dir, "%s.log" % (self.name,))
        self.command = node_command(args, index)
        self.process: Optional[subprocess.Popen] = None
        self.reported_exit = False

    def start(self, env: dict) -> None:
        with open(self.log_path, "wb") as log:
            # A session of its own: the terminal's Ctrl-C reaches the launcher only, which then stops the
            # nodes in order, by PID.
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def signal(self, signum: int) -> None:
        if self.alive:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return b"\n".join(log.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""


class LocalCluster:
    """
    The nodes, and their lifecycle: start, wait for readiness, watch, stop by PID.
    """

    def __init__(self, args: argparse.Namespace, out=None) -> None:
        self.args = args
        self.out = out or sys.stdout
        self.log_dir = os.path.abspath(args.log_dir)
        self.nodes = [Node(index, args, self.log_dir) for index in range(1, args.nodes + 1)]
        self.stop_requests = 0

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def request_stop(self, signum, frame) -> None:
        self.stop_requests += 1
        if self.stop_requests > 1:
            # A second Ctrl-C: do not wait for the drain.
            for node in self.nodes:
                node.signal(signal.SIGKILL)

    def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        env = {key: value for key, value in os.environ.items() if key not in _DROPPED_ENVIRONMENT}
        generated = not env.get("CLUSTER_SECRET")
        if generated:
            # A node without a secret serves alone; the nodes of one run share a fresh one.
            env["CLUSTER_SECRET"] = secrets.token_urlsafe(32)
        self.say("kvresponder-local-cluster: %d node(s) of tenant %r on %s, discovery on UDP port %d "
                 "(multicast on loopback)" % (len(self.nodes), self.args.tenant, LOOPBACK,
                                              self.args.discovery_port))
        self.say("  logs: %s" % (os.path.join(self.log_dir, "node-*.log"),))
        self.say("  cluster secret: %s" % ("generated for this run" if generated else "CLUSTER_SECRET, as given",))
        for node in self.nodes:
            node.start(env)
            self.say("  %s  pid %d  %s/" % (node.name, node.pid, node.url))

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        waiting = list(self.nodes)
        while waiting:
            if self.stop_requests:
                return False
            for node in list(waiting):
                if not node.alive:
                    self.say("%s %s before it was ready; its log ends with:\n%s"
                             % (node.name, describe_exit(node.process.returncode), node.log_tail()))
                    node.reported_exit = True
                    return False
                if node.ready():
                    self.say("  %s ready" % (node.name,))
                    waiting.remove(node)
            if waiting and time.monotonic() > deadline:
                self.say("not ready after %ds: %s (see %s)" % (
                    timeout, ", ".join(node.name for node in waiting), self.log_dir))
                return False
            if waiting:
                time.sleep(0.1)
        return True

    def print_usage(self) -> None:
        first, other = self.nodes[0], self.nodes[-1]
        victim = self.nodes[1] if len(self.nodes) > 1 else first
        self.say()
        self.say("All %d node(s) are ready. Try:" % (len(self.nodes),))
        self.say("  curl %s/peers" % (first.url,))
        self.say("  curl -X PUT %s/kv/greeting -H 'Content-Type: application/json' -d '{\"value\": \"hello\"}'"
                 % (first.url,))
        self.say("  curl %s/kv/greeting" % (other.url,))
        self.say("  curl '%s/kv?prefix=gr&limit=10'" % (first.url,))
        self.say("  curl -s %s/metrics | grep kv_store_keys" % (first.url,))
        self.say("  kill -9 %d    # %s dies without draining; the others re-replicate its keys"
                 % (victim.pid, victim.name))
        self.say("  eliot-tree %s" % (os.path.join(self.log_dir, "*.log"),))
        self.say()
        self.say("Admin writes need no token here (--insecure-admin): safe only because every port is on "
                 "127.0.0.1.")
        self.say("Ctrl-C stops every node (each hands its data off first); Ctrl-C twice kills them at once.")

    def watch(self) -> bool:
        """
        Stay in the foreground until asked to stop or until every node has exited.

        :return: ``False`` if every node exited on its own.
        """
        while not self.stop_requests:
            for node in self.nodes:
                if not node.alive and not node.reported_exit:
                    node.reported_exit = True
                    self.say("%s (pid %d) %s" % (node.name, node.pid, describe_exit(node.process.returncode)))
            if not any(node.alive for node in self.nodes):
                self.say("every node has exited")
                return False
            time.sleep(0.2)
        return True

    def stop(self, timeout: Optional[float] = None) -> bool:
        """
        SIGTERM each running node by its PID, as Kubernetes does, and wait while they drain; SIGKILL what
        is still running after ``timeout`` seconds.

        :param timeout: by default :func:`stop_timeout`'s.
        :return: whether every node stopped on its own.
        """
        if timeout is None:
            timeout = stop_timeout()
        running = [node for node in self.nodes if node.alive]
        if running:
            self.say("stopping %s (SIGTERM; each node drains, at most %ds)..."
                     % (", ".join("%s pid %d" % (node.name, node.pid) for node in running), timeout))
        for node in running:
            node.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        clean = True
        for node in running:
            try:
                node.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                clean = False
                self.say("%s (pid %d) did not stop in time: SIGKILL" % (node.name, node.pid))
                node.signal(signal.SIGKILL)
                node.process.wait()
        for node in running:
            returncode = node.process.returncode
            # twistd ends by the signal it stopped for once it has drained: that is the stop asked for.
            outcome = "stopped" if returncode in (0, -signal.SIGTERM) else describe_exit(returncode)
            self.say("  %s (pid %d) %s" % (node.name, node.pid, outcome))
        return clean and self.stop_requests < 2


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    busy = [port for port in range(args.base_port, args.base_port + args.nodes) if _port_in_use(port)]
    if busy:
        sys.stderr.write("kvresponder-local-cluster: error: port(s) %s on %s are in use; choose another "
                         "--base-port\n" % (", ".join(map(str, busy)), LOOPBACK))
        return 2
    if _udp_port_in_use(args.discovery_port):
        sys.stderr.write("kvresponder-local-cluster: error: UDP port %d (discovery) is in use; choose another "
                         "--discovery-port\n" % (args.discovery_port,))
        return 2
    cluster = LocalCluster(args)
    previous = {signum: signal.signal(signum, cluster.request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    ok = False
    try:
        cluster.start()
        if cluster.wait_ready():
            cluster.print_usage()
            ok = cluster.watch()
        else:
            ok = cluster.stop_requests > 0
    finally:
        clean = cluster.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(main())
