"""
The loopback harness itself: what it promises the tests that use it.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from .harness import REPO, free_port

pytestmark = pytest.mark.e2e

#: A test run in miniature: starts one node through the harness, says its pid, and waits to be killed.
_RUN = """
import socket, sys, time
from tests.harness import NodeProcess, free_port
node = NodeProcess("t1", "n1", free_port(socket.SOCK_DGRAM), sys.argv[1], port=int(sys.argv[2])).start()
node.wait_ready()
print(node.process.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % (pid,)) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_node_dies_with_a_test_run_killed_without_cleanup(tmp_path):
    """
    A SIGKILLed test run runs no ``finally`` and no ``atexit``: its nodes die with it all the same, rather than
    hold their ports and the discovery group for the runs after it.
    """
    run = subprocess.Popen([sys.executable, "-c", _RUN, str(tmp_path), str(free_port())], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node_pid = None
    try:
        line = run.stdout.readline()
        assert line.strip().isdigit(), line + run.stdout.read() if run.poll() is not None else line
        node_pid = int(line)
        assert _alive(node_pid)
        run.send_signal(signal.SIGKILL)
        run.wait(10)
        deadline = time.monotonic() + 10
        while _alive(node_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(node_pid), "the node outlived its killed test run"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        if node_pid is not None and _alive(node_pid):
            os.kill(node_pid, signal.SIGKILL)
