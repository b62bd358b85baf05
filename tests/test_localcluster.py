"""
``kvresponder-local-cluster`` end to end: the launcher starts real nodes that find each other, and stops them
all, by PID, when it is told to stop.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from kvresponder import localcluster
from kvresponder.localcluster import LocalCluster, describe_exit, node_command, parse_args

from .harness import REPO, free_port, free_udp_port, node_env

NODE_LINE = re.compile(r"^\s+(node-\d+)\s+pid (\d+)\s+(http://\S+?)/?$")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _consecutive_free_ports(count: int) -> int:
    for _ in range(100):
        base = free_port()
        if base + count - 1 <= 65535 and all(_port_free(base + i) for i in range(1, count)):
            return base
    raise AssertionError("no %d consecutive free ports" % (count,))


def _http(method: str, url: str, body=None):
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _wait(predicate, timeout: float, what: str, output) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("timed out waiting for %s; launcher output:\n%s" % (what, "".join(output)))


def _gone(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % (pid,)) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def test_if_no_option_is_given_then_three_demo_nodes_keep_two_copies_on_ports_3000_to_3002():
    """
    If no option is given, then three nodes of tenant "demo" listen on ports 3000-3002 and share discovery
    port 9999, keeping two copies of each key, with logs in ./kvresponder-logs.
    """
    args = parse_args([])
    assert vars(args) == {"nodes": 3, "tenant": "demo", "base_port": 3000, "discovery_port": 9999,
                          "log_dir": "kvresponder-logs", "replicas": 2}


def test_a_nodes_command_runs_twistd_in_the_foreground_on_its_own_port_on_loopback():
    """
    If node 2 is built, then it is twistd in the foreground with no pidfile, on the second port, loopback
    only, with 1 s heartbeats and admin writes open.
    """
    command = node_command(parse_args(["--tenant", "t1", "--base-port", "4000", "--replicas", "3"]), 2,
                           python="python3")
    assert command[:2] == ["python3", "-c"]
    rest = command[3:]
    assert rest[:3] == ["-n", "--pidfile=", "kvresponder"]
    pairs = dict(zip(rest[3:], rest[4:]))
    assert pairs["--tenant"] == "t1"
    assert pairs["--node-id"] == "node-2"
    assert pairs["--port"] == "4001"
    assert pairs["--advertise-address"] == "127.0.0.1"
    assert pairs["--discovery-interface"] == "127.0.0.1"
    assert pairs["--discovery-port"] == "9999"
    assert pairs["--heartbeat-interval"] == "1"
    assert pairs["--replicas"] == "3"
    assert "--insecure-admin" in rest


@pytest.mark.parametrize("given", [None, "", "an-operators-own-secret-123"])
def test_the_nodes_share_a_cluster_secret_generated_for_the_run_unless_one_is_given(given, monkeypatch,
                                                                                  tmp_path):
    """
    If CLUSTER_SECRET is not set (or empty), then every node of a run gets the same random secret, a new one
    each run, at least 32 characters; if it is set, the nodes get it as given.
    """
    if given is None:
        monkeypatch.delenv("CLUSTER_SECRET", raising=False)
    else:
        monkeypatch.setenv("CLUSTER_SECRET", given)
    secrets_seen = []
    for _ in range(2):
        envs = []
        monkeypatch.setattr(localcluster.Node, "start", lambda self, env: envs.append(env))
        monkeypatch.setattr(localcluster.Node, "pid", 1)
        out = open(os.devnull, "w")
        LocalCluster(parse_args(["--nodes", "3", "--log-dir", str(tmp_path)]), out=out).start()
        out.close()
        assert len({env["CLUSTER_SECRET"] for env in envs}) == 1
        secrets_seen.append(envs[0]["CLUSTER_SECRET"])
    if given:
        assert secrets_seen == [given, given]
    else:
        assert secrets_seen[0] != secrets_seen[1] and all(len(secret) >= 32 for secret in secrets_seen)


def test_bad_tenant_is_refused(capsys):
    """
    If the tenant is not a DNS label, then the launcher exits with a message before starting anything.
    """
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tenant", "Not_A_Label"])
    assert exit_info.value.code == 2
    assert "--tenant" in capsys.readouterr().err


def test_describe_exit():
    """
    If a node ended by a signal, then the launcher names the signal.
    """
    assert describe_exit(-signal.SIGTERM) == "ended by SIGTERM"
    assert describe_exit(0) == "exited with status 0"


@pytest.mark.e2e
def test_two_node_cluster_starts_replicates_and_stops(log_dir):
    """
    If the launcher starts two nodes, then they become ready and see each other, a key written through one
    is read through the other, and after SIGTERM to the launcher every node it started has exited and its
    port is closed within 30 s.
    """
    tenant = "lctest"
    base = _consecutive_free_ports(2)
    command = [sys.executable, "-m", "kvresponder.localcluster", "--nodes", "2", "--tenant", tenant,
               "--base-port", str(base), "--discovery-port", str(free_udp_port()), "--log-dir", log_dir]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=node_env(),
                                cwd=REPO, text=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(iter(launcher.stdout.readline, "")), daemon=True)
    reader.start()
    nodes = {}
    try:
        _wait(lambda: any("All 2 node(s) are ready" in line for line in output) or launcher.poll() is not None,
              60, "the launcher to report both nodes ready", output)
        assert launcher.poll() is None, "".join(output)
        for line in output:
            match = NODE_LINE.match(line.rstrip("\n"))
            if match:
                nodes[match.group(1)] = (int(match.group(2)), match.group(3))
        assert sorted(nodes) == ["node-1", "node-2"], "".join(output)
        (_, url1), (_, url2) = nodes["node-1"], nodes["node-2"]
        assert url1 == "http://127.0.0.1:%d/%s" % (base, tenant)
        assert url2 == "http://127.0.0.1:%d/%s" % (base + 1, tenant)

        def see_each_other():
            return ([peer["id"] for peer in _http("GET", url1 + "/peers")[1]] == ["node-2"]
                    and [peer["id"] for peer in _http("GET", url2 + "/peers")[1]] == ["node-1"])
        _wait(see_each_other, 20, "the nodes to see each other", output)
        # They cluster because they share the secret the launcher generated: an unsigned call is refused.
        assert _http("GET", url1 + "/diag")[1]["cluster"] == "authenticated"
        assert _http("POST", url1 + "/_internal/get", {"key": "a"})[0] == 401
        assert any("cluster secret: generated for this run" in line for line in output), "".join(output)

        status, body = _http("PUT", url1 + "/kv/users%2F42", {"value": {"name": "Ada"}})
        assert status == 201, body
        status, body = _http("GET", url2 + "/kv/users%2F42")
        assert (status, body["key"], body["value"]) == (200, "users/42", {"name": "Ada"})

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0, "".join(output)
        reader.join(5)
        for name, (pid, _) in nodes.items():
            assert _gone(pid), "%s (pid %d) is still running" % (name, pid)
            # A node that drained and ended by the SIGTERM it was sent stopped as asked: no alarming "ended by".
            assert "  %s (pid %d) stopped\n" % (name, pid) in output, "".join(output)
        for port in (base, base + 1):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert os.path.exists(os.path.join(log_dir, "node-1.log"))
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid, _ in nodes.values():
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def _listener():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server


def test_a_port_left_in_time_wait_by_a_cluster_just_stopped_is_free_again():
    """
    If the nodes of a cluster just stopped closed their connections first (leaving them in TIME_WAIT), then the
    launcher starts a cluster on the same ports again, as the nodes' own listeners would bind them.
    """
    server = _listener()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server's side closes first: its end of the connection waits in TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    assert not localcluster._port_in_use(port)


def test_a_port_something_listens_on_is_in_use():
    """If a process listens on a port, then the launcher's check still finds it taken."""
    server = _listener()
    try:
        assert localcluster._port_in_use(server.getsockname()[1])
    finally:
        server.close()


def test_a_discovery_port_held_without_sharing_refuses_the_launch_with_one_line_and_a_shared_one_does_not(
        capsys, monkeypatch):
    """
    If another process holds the UDP discovery port without SO_REUSEADDR, then the launcher stops at once with one
    line naming the port (each node would exit at once); a port held as the nodes hold it (shared, another
    local cluster's) is no reason to stop.
    """
    monkeypatch.setattr(localcluster, "_port_in_use", lambda port: False)  # the HTTP ports: not what is tested
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("0.0.0.0", 0))
    port = holder.getsockname()[1]
    try:
        assert localcluster.main(["--discovery-port", str(port)]) == 2
    finally:
        holder.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "UDP port %d" % (port,) in lines[0] and "--discovery-port" in lines[0]
    shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    shared.bind(("0.0.0.0", 0))
    try:
        assert not localcluster._udp_port_in_use(shared.getsockname()[1])
    finally:
        shared.close()


def test_the_launcher_waits_for_a_stopping_node_as_long_as_its_drain_may_take():
    """
    If DRAIN_TIMEOUT is set in the environment the nodes inherit, then the launcher waits that long and its margin
    before it SIGKILLs a stopping node (a fixed 35 s killed nodes mid-drain under a longer drain); by default, the
    node's 20 s and the margin.
    """
    assert localcluster.stop_timeout({}) == 20.0 + localcluster.STOP_MARGIN
    assert localcluster.stop_timeout({"DRAIN_TIMEOUT": "60"}) == 60.0 + localcluster.STOP_MARGIN
    assert localcluster.stop_timeout({"DRAIN_TIMEOUT": "soon"}) == 20.0 + localcluster.STOP_MARGIN
