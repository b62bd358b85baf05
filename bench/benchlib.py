"""
Shared machinery of the benchmark scenarios in bench/: starting nodes (twistd under CPython or PyPy) and the
Node.js reference, loading data, driving wrk, reading RSS, writing results.

Everything runs on 127.0.0.1 only. Every process started here is stopped by its PID when the scenario ends
(also on Ctrl-C or an error); nothing is stopped by name. Node logs go to $TMPDIR/kv-bench-logs/ and are deleted
when the node stops, unless KV_BENCH_KEEP_LOGS is set.
"""

import argparse
import atexit
import http.client
import json
import os
import platform
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
LUA = os.path.join(BENCH, "lua")
RESULTS = os.path.join(BENCH, "results")
TENANT = "bench"
VALUE_SIZE = 100          # bytes of each stored value (its JSON text)
HIT_KEYS = 10000          # keys preloaded for GET hits and the mixes

#: Runs twistd with the interpreter given (CPython or PyPy), whatever its scripts directory (as tests/harness.py).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: PyPy for Python 3.11: the host-side wrapper that `bash .ci/setup-pypy.sh` prints (it runs the venv inside a
#: Debian 13 root, with the node's own pid, so signals and /proc/<pid>/stat reach the node).
DEFAULT_PYPY = os.environ.get("KV_PYPY_PYTHON", "/var/cache/kv-pypy311/python")
DEFAULT_CPYTHON = os.environ.get("KV_CPYTHON_PYTHON", sys.executable)

_started: List["Process"] = []


def interpreter_path(name: str) -> str:
    if name == "cpython":
        return DEFAULT_CPYTHON
    if name == "pypy":
        if not os.access(DEFAULT_PYPY, os.X_OK):
            sys.exit("no PyPy 3.11 at %s: run `bash .ci/setup-pypy.sh` first (or set KV_PYPY_PYTHON to what it prints)"
                     % (DEFAULT_PYPY,))
        return DEFAULT_PYPY
    sys.exit("unknown interpreter %r (pypy or cpython)" % (name,))


def interpreter_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.version.replace(chr(10), ' '))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("KV_", "TENANT", "PORT", "DISCOVERY_", "ADVERTISE_", "POD_IP", "NODE_ID",
                                  "REPLICATION_", "MAX_", "LOG_", "JAEGER", "OTEL_", "CLUSTER_SECRET",
                                  "ADMIN_TOKEN", "HEARTBEAT", "PEER_", "DRAIN_", "PYTHONPATH"))}
    # Benchmark the work tree's code, whatever is installed.
    env["PYTHONPATH"] = REPO
    # As the image sets them (see the Dockerfile); CPython ignores them. A value in the environment wins.
    for name, value in IMAGE_PYPY_GC.items():
        env.setdefault(name, value)
    env.update(extra or {})
    return env


def _image_env(name: str) -> str:
    """
    The value the Dockerfile's ``ENV`` gives ``name``, so that a node here runs as it does in the image.
    """
    with open(os.path.join(REPO, "Dockerfile")) as dockerfile:
        for line in dockerfile:
            words = line.replace("\\", " ").split()
            for word in words:
                if word.startswith(name + "="):
                    return word.split("=", 1)[1]
    raise RuntimeError("the Dockerfile sets no %s" % (name,))


IMAGE_PYPY_GC = {name: _image_env(name) for name in ("PYPY_GC_INCREMENT_STEP", "PYPY_GC_NURSERY")}


def log_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), "kv-bench-logs")
    os.makedirs(path, exist_ok=True)
    return path


# --- processes -------------------------------------------------------------------------------------------

class Process:
    """A server process we started; stopped by PID only."""

    def __init__(self, name: str, command: List[str], env: Dict[str, str], port: int, base: str) -> None:
        self.name = name
        self.port = port
        self.base = base  # http://127.0.0.1:port/<tenant>
        self.log_path = os.path.join(log_dir(), "%s-%d.log" % (name, port))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.pid = self.process.pid
        _started.append(self)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.alive:
                raise RuntimeError("%s exited with %s:\n%s" % (self.name, self.process.returncode, self.log_tail()))
            if http_status(self.base + "/health/ready") == 200:
                return time.monotonic() - start
            time.sleep(0.05)
        raise RuntimeError("%s not ready after %ss:\n%s" % (self.name, timeout, self.log_tail()))

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return b"\n".join(log.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def status_kb(self, field: str) -> int:
        """A /proc/<pid>/status field in kB (VmRSS, VmHWM)."""
        with open("/proc/%d/status" % (self.pid,)) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far (/proc/<pid>/stat)."""
        with open("/proc/%d/stat" % (self.pid,)) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        return self.status_kb("VmRSS") * 1024

    def peak_rss(self) -> int:
        return self.status_kb("VmHWM") * 1024

    def metric(self, name: str) -> float:
        text = http_get(self.base + "/metrics").decode("utf-8")
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(name)
        return total

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except (subprocess.TimeoutExpired, KeyboardInterrupt, SystemExit):
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()
        if self in _started:
            _started.remove(self)
        # The Eliot logs of a loaded node run to gigabytes: keep them only on request.
        if not os.environ.get("KV_BENCH_KEEP_LOGS"):
            for path in (self.log_path, getattr(self, "eliot_log", None)):
                if path and os.path.exists(path):
                    os.remove(path)


def start_node(python: str, name: str = "n1", discovery_port: Optional[int] = None,
               env: Optional[Dict[str, str]] = None) -> Process:
    port = free_port()
    settings = {"HEARTBEAT_INTERVAL": "0.5", "DRAIN_TIMEOUT": "5", "LOG_FILE": os.path.join(
        log_dir(), "%s-%d.eliot.log" % (name, port))}
    # A single node too gets a secret, as the chart gives every pod: that is the configuration to measure (on
    # PyPy, a node without one, serving alone, measured about half as fast on GETs, cause not found; commit 39ccf71).
    settings.update(with_secret(env))
    command = [python, "-c", TWISTD, "-n", "--pidfile=", "kvresponder", "--tenant", TENANT, "--port", str(port),
               "--node-id", name, "--discovery-port", str(discovery_port or free_port(socket.SOCK_DGRAM))]
    process = Process(name, command, node_env(settings), port, "http://127.0.0.1:%d/%s" % (port, TENANT))
    process.discovery_port = int(command[-1])
    process.eliot_log = settings.get("LOG_FILE")
    return process


def start_node_reference() -> Process:
    node = shutil.which("node") or "/usr/bin/node"
    port = free_port()
    return Process("node-ref", [node, os.path.join(BENCH, "node_reference.js"), str(port), TENANT], os.environ.copy(),
                   port, "http://127.0.0.1:%d/%s" % (port, TENANT))


def with_secret(env: Optional[Dict[str, str]]) -> Dict[str, str]:
    """``env`` with a cluster secret of its own (as the chart gives a release): a node without one serves alone."""
    env = dict(env or {})
    env.setdefault("CLUSTER_SECRET", "bench-" + secrets.token_hex(16))
    return env


def start_cluster(python: str, count: int, env: Optional[Dict[str, str]] = None) -> List[Process]:
    env = with_secret(env)
    discovery = free_port(socket.SOCK_DGRAM)
    nodes = [start_node(python, "n%d" % (i + 1,), discovery, env) for i in range(count)]
    for node in nodes:
        node.wait_ready()
    wait_formed(nodes)
    return nodes


def start_loaded_cluster(python: str, count: int, keys: int, env: Optional[Dict[str, str]] = None,
                         replicas: int = 2, timeout: float = 180.0) -> List[Process]:
    """
    A cluster of ``count`` nodes holding ``keys`` keys (``key_name``, VALUE_SIZE bytes each), loaded fast: into
    the first node alone (local writes), then the others join and take their copies. Loading through a formed
    cluster is slower (bench/results/HISTORY.md, "Method").
    """
    env = with_secret(env)
    discovery = free_port(socket.SOCK_DGRAM)
    nodes = [start_node(python, "n1", discovery, env)]
    nodes[0].wait_ready()
    if keys:
        bulk_load(nodes[0].base, keys, batch=1000, workers=2)
    for i in range(1, count):
        nodes.append(start_node(python, "n%d" % (i + 1,), discovery, env))
    for node in nodes:
        node.wait_ready(timeout)
    wait_formed(nodes, timeout)
    if keys:
        wait_keys(nodes, keys * min(replicas, count), timeout)
    return nodes


def wait_formed(nodes: List[Process], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(node.metric("kv_ring_members") == len(nodes) for node in nodes):
                return
        except (OSError, KeyError):
            pass
        time.sleep(0.1)
    raise RuntimeError("cluster of %d did not form" % (len(nodes),))


def stop_all() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish stopping what we started
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for process in list(_started):
        try:
            process.stop()
        except Exception as error:  # keep stopping the others
            print("bench: stopping %s (pid %d): %s" % (process.name, process.pid, error), file=sys.stderr)


atexit.register(stop_all)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# --- HTTP ------------------------------------------------------------------------------------------------

def http_status(url: str, timeout: float = 2.0) -> Optional[int]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def key_name(i: int) -> str:
    return "k%d" % (i,)


def value_text(size: int = VALUE_SIZE) -> str:
    """A value whose stored JSON is ``size`` bytes."""
    return "v" * (size - 2)


def bulk_load(base: str, count: int, batch: int = 1000, workers: int = 4, start: int = 0,
              value_size: int = VALUE_SIZE, name=key_name, retries: int = 5, value: Optional[str] = None) -> float:
    """
    PUT keys ``name(start) .. name(start + count - 1)`` through POST /bulk; returns the seconds taken. The value
    is ``value`` if given, else ``value_text(value_size)``.
    Writes answered 503 (too few replicas in time) are sent again, up to ``retries`` times, and counted in
    ``bulk_load.retried``; anything else that fails raises.
    """
    host, port = base.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + base.split("//", 1)[1].split("/", 1)[1] + "/bulk"
    if value is None:
        value = value_text(value_size)
    batches = [[name(i) for i in range(i, min(i + batch, start + count))] for i in range(start, start + count, batch)]
    local = threading.local()
    retried = [0]

    def send(keys):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        for attempt in range(retries + 1):
            body = json.dumps({"put": [{"key": key, "value": value} for key in keys]}).encode()
            local.conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = local.conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError("bulk load: %d %s" % (response.status, data[:300]))
            items = json.loads(data)["put"]
            failed = [item for item in items if item["status"] not in (200, 201)]
            if not failed:
                return
            if any(item["status"] != 503 for item in failed) or attempt == retries:
                raise RuntimeError("bulk load: %d writes failed, e.g. %s" % (len(failed), failed[0]))
            retried[0] += len(failed)
            keys = [item["key"] for item in failed]
            time.sleep(0.2)

    began = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(send, batches))
    bulk_load.retried = retried[0]
    if retried[0]:
        print("bench: bulk load: %d writes answered 503 and were sent again" % (retried[0],), file=sys.stderr)
    return time.monotonic() - began


bulk_load.retried = 0


def wait_keys(nodes: List[Process], total: int, timeout: float = 300.0) -> float:
    """Wait until the nodes hold ``total`` entries between them (copies counted); returns the seconds."""
    began = time.monotonic()
    last = None
    while time.monotonic() - began < timeout:
        try:
            last = sum(node.metric("kv_store_keys") for node in nodes)
            if last >= total:
                return time.monotonic() - began
        except (OSError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError("nodes hold %s entries, expected %d" % (last, total))


# --- wrk -------------------------------------------------------------------------------------------------

class Wrk:
    """One wrk run (started in the background; ``result()`` waits and parses its BENCH_JSON line)."""

    def __init__(self, url: str, mode: str, duration: float, connections: int = 32, threads: int = 1,
                 script: str = "kv.lua", keys: int = HIT_KEYS, value_size: int = VALUE_SIZE, get_pct: int = 90,
                 batch: int = 100, delay_ms: float = 0.0, timeout: str = "5s", value: Optional[str] = None) -> None:
        self.mode = mode
        self.command = ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % max(1, round(duration)),
                        "--timeout", timeout, "--latency", "-s", os.path.join(LUA, script), url, "--",
                        TENANT, mode, str(keys), str(value_size), str(get_pct), str(batch), repr(delay_ms)]
        if value is not None:
            # The stored string itself, for the scripts that take one (references.lua).
            self.command.append(value)
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> dict:
        out, err = self.process.communicate()
        for line in out.splitlines():
            if line.startswith("BENCH_JSON "):
                raw = json.loads(line[len("BENCH_JSON "):])
                break
        else:
            raise RuntimeError("wrk gave no result (%s):\n%s\n%s" % (" ".join(self.command), out, err))
        seconds = raw["duration_us"] / 1e6
        errors = raw["errors"]
        socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
        # kv_counted/kv_paced count bad statuses themselves (404 is fine there); kv.lua takes wrk's count of
        # statuses >= 400.
        status_errors = raw["unexpected_status"] if raw["unexpected_status"] >= 0 else errors["status"]
        return {
            "requests": raw["requests"],
            "seconds": round(seconds, 3),
            "rps": round(raw["requests"] / seconds, 1),
            "p50_ms": raw["p50_us"] / 1000.0,
            "p90_ms": raw["p90_us"] / 1000.0,
            "p99_ms": raw["p99_us"] / 1000.0,
            "p999_ms": raw["p999_us"] / 1000.0,
            "max_ms": raw["latency_max_us"] / 1000.0,
            "errors": socket_errors + status_errors,
            "error_detail": dict(errors, unexpected_status=raw["unexpected_status"]),
            "wrk": " ".join(self.command),
        }


def run_wrk(url: str, mode: str, duration: float, **kwargs) -> dict:
    return Wrk(url, mode, duration, **kwargs).result()


def combine(results: List[dict]) -> dict:
    """Concurrent wrk runs as one: rates and errors add up; latency percentiles are the worst of the runs."""
    return {
        "requests": sum(r["requests"] for r in results),
        "seconds": max(r["seconds"] for r in results),
        "rps": round(sum(r["rps"] for r in results), 1),
        "p50_ms": max(r["p50_ms"] for r in results),
        "p90_ms": max(r["p90_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "p999_ms": max(r["p999_ms"] for r in results),
        "max_ms": max(r["max_ms"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "per_node": results,
    }


# --- CLI and results -------------------------------------------------------------------------------------

def parser(description: str, duration: float = 10.0, warmup: float = 5.0) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--interpreter", choices=["cpython", "pypy"], default="cpython",
                   help="runs the nodes under CPython (this python) or PyPy 3.11 (what .ci/setup-pypy.sh prints)")
    p.add_argument("--duration", type=float, default=duration, help="seconds of measured load (default %(default)s)")
    p.add_argument("--warmup", type=float, default=warmup, help="seconds of unmeasured load first (default %(default)s)")
    p.add_argument("--connections", "-c", type=int, default=32, help="wrk connections (default %(default)s)")
    p.add_argument("--threads", "-t", type=int, default=1, help="wrk threads (default %(default)s)")
    p.add_argument("--out", help="result file (default bench/results/<scenario>.<interpreter>.json)")
    return p


def machine() -> dict:
    info = {"nproc": os.cpu_count(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            info["memory_kb"] = int(meminfo.readline().split()[1])
    except OSError:
        pass
    return info


def finish(scenario: str, args, python: str, data: dict) -> dict:
    result = {
        "scenario": scenario,
        "interpreter": args.interpreter,
        "interpreter_version": interpreter_version(python),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "threads": args.threads,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        # Other work on the machine skews the numbers: the 1-minute load average as the run ended.
        "loadavg_end": loadavg(),
        "git_head": git_head(),
    }
    result.update(data)
    os.makedirs(RESULTS, exist_ok=True)
    path = args.out or os.path.join(RESULTS, "%s.%s.json" % (scenario, args.interpreter))
    with open(path, "w") as out:
        json.dump(result, out, indent=2, sort_keys=True)
        out.write("\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    print("bench: wrote %s" % (os.path.relpath(path),), file=sys.stderr)
    return result


def git_head() -> Optional[str]:
    """The commit the work tree was at (uncommitted changes, if any, are not recorded)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def loadavg() -> Optional[float]:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def ratio(ours: float, theirs: float) -> Optional[float]:
    return round(ours / theirs, 3) if theirs else None
