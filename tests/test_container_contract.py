"""
The container's runtime contract, proved without Docker: the installed service runs under bubblewrap with a
read-only root filesystem, as uid 65534, with only /tmp writable and its cluster secret a read-only file (as
the chart mounts it), serves PUT and GET, and shuts down cleanly on SIGTERM.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from .conftest import require_tool
from .harness import REPO, TWISTD, free_port, free_udp_port

pytestmark = pytest.mark.e2e


def test_the_installed_service_runs_read_only_as_nobody(log_dir):
    bwrap = require_tool("bwrap")
    if os.geteuid() != 0:
        pytest.skip("bubblewrap needs root here to map uid 65534")
    installed = subprocess.run([sys.executable, "-c", "import kvresponder.settings as s; print(s.__file__)"],
                               cwd="/tmp", capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
    with open(installed.stdout.strip(), "rb") as ours, open(os.path.join(REPO, "kvresponder", "settings.py"),
                                                            "rb") as tree:
        assert ours.read() == tree.read(), ("the installed kvresponder is not this tree's: "
                                            "python3 -m pip install . first (as CI does)")
    port, discovery = free_port(), free_udp_port()
    log_path = os.path.join(log_dir, "bwrap.log")
    secret_path = os.path.join(log_dir, "cluster-secret")
    with open(secret_path, "w") as secret_file:
        secret_file.write("sandbox-secret-0123456789\n")
    os.chmod(secret_path, 0o444)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
           "TENANT": "sandboxed", "PORT": str(port), "DISCOVERY_PORT": str(discovery),
           "CLUSTER_SECRET_FILE": "/tmp/secrets/cluster-secret"}
    info_read, info_write = os.pipe()
    command = [bwrap, "--info-fd", str(info_write), "--ro-bind", "/", "/", "--tmpfs", "/tmp",
               "--ro-bind", secret_path, "/tmp/secrets/cluster-secret", "--dev", "/dev", "--proc", "/proc",
               "--unshare-user", "--uid", "65534", "--gid", "65534", "--die-with-parent", "--chdir", "/tmp",
               "--", sys.executable, "-c", TWISTD, "-n", "--pidfile=", "kvresponder"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/tmp",
                                   pass_fds=(info_write,))
    os.close(info_write)
    # bubblewrap does not forward signals: SIGTERM goes to the service itself, as Kubernetes would send it.
    with os.fdopen(info_read) as info:
        service_pid = json.loads(info.read())["child-pid"]
    url = "http://127.0.0.1:%d/sandboxed" % (port,)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, open(log_path).read()[-3000:]
            try:
                if requests.get(url + "/health/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "not ready under bubblewrap"
            time.sleep(0.1)
        assert requests.put(url + "/kv/k", json={"value": {"ok": True}}, timeout=5).status_code == 201
        assert requests.get(url + "/kv/k", timeout=5).json()["value"] == {"ok": True}
        diag = requests.get(url + "/diag", timeout=5).json()
        assert diag["process"]["uid"] == 65534
        assert diag["config"]["cluster_secret"] == "<set>"
        assert diag["config"]["cluster_secret_file"] == "/tmp/secrets/cluster-secret"
        os.kill(service_pid, signal.SIGTERM)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    messages = [json.loads(line) for line in open(log_path, "rb") if line.startswith(b"{")]
    types = {m.get("message_type") or m.get("action_type") for m in messages}
    assert "kvresponder:service:stopping" in types
    assert "eliot:traceback" not in types
    assert not any("Traceback" in m.get("message", "") for m in messages)
