"""
One KV Responder node against two references, in one invocation: the Node.js reference (bench/node_reference.js)
and webdis in front of redis-server (Debian's `webdis` and `redis-server`, C all the way). Each is loaded with the
same 1000 keys of "hello world", warmed up and then measured by the same wrk command, one after the other, and
our rate is given as ratios to both.

    python3 bench/references.py [--interpreter cpython|pypy] [--mode get|put] [--duration 10] [--warmup 15]
                                [--node-env LOG_LEVEL=warning ...]

GETs go to /<tenant>/kv/k<N> on KV Responder and Node.js, and to webdis's /GET/k<N>; PUTs (``--mode put``) to
the same kv path with {"value": "hello world"}, and to webdis's /SET/k<N> with the raw value as the body.

redis-server and webdis start on free loopback ports, each from its own config file in a temporary directory
(redis without persistence), and are stopped by their PIDs at the end, as every other process here. A redis
that the system runs is never used.
"""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import benchlib as b

KEYS = 1000
VALUE = "hello world"
SCRIPT = "references.lua"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        sys.exit("references: %s is not installed (apt-get install redis-server webdis)" % (tool,))
    return path


def _version(command) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _wait_port(process: b.Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive:
            raise RuntimeError("%s exited with %s:\n%s" % (process.name, process.process.returncode,
                                                           process.log_tail()))
        try:
            with socket.create_connection(("127.0.0.1", process.port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s not listening after %ss:\n%s" % (process.name, timeout, process.log_tail()))


def _resp(*words: str) -> bytes:
    """One Redis command in RESP, the protocol redis-server speaks."""
    parts = [b"*%d\r\n" % (len(words),)]
    for word in words:
        data = word.encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def webdis_load(webdis: "Webdis", count: int, value: str) -> None:
    """Loads redis, then checks through webdis that the first and last keys read back (a miss is a 200 there)."""
    redis_load(webdis.redis.port, count, value)
    for i in (0, count - 1):
        answer = json.loads(b.http_get("%s/GET/%s" % (webdis.webdis.base, b.key_name(i))))
        if answer != {"GET": value}:
            raise RuntimeError("webdis: GET %s answered %r" % (b.key_name(i), answer))


def redis_load(port: int, count: int, value: str) -> None:
    """SET k0 .. k<count-1> to ``value``, pipelined on one connection; every answer must be +OK."""
    expected = b"+OK\r\n" * count
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"".join(_resp("SET", b.key_name(i), value) for i in range(count)))
        received = b""
        while len(received) < len(expected):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    if received != expected:
        raise RuntimeError("redis load: unexpected answers %r" % (received[:200],))


class Webdis:
    """
    redis-server and webdis in front of it, on free loopback ports, configured in their own directory; measured as
    one server: the CPU and the RSS of both processes.
    """

    def __init__(self, threads: int) -> None:
        self.directory = tempfile.mkdtemp(prefix="kv-bench-webdis-")
        atexit.register(shutil.rmtree, self.directory, True)  # also when a run fails half-way
        redis_port, http_port = b.free_port(), b.free_port()
        redis_conf = os.path.join(self.directory, "redis.conf")
        with open(redis_conf, "w") as conf:
            conf.write("bind 127.0.0.1\nport %d\nsave \"\"\nappendonly no\ndaemonize no\ndir %s\n"
                       "logfile \"\"\n" % (redis_port, self.directory))
        self.config = {
            "redis_host": "127.0.0.1", "redis_port": redis_port, "redis_auth": None,
            "http_host": "127.0.0.1", "http_port": http_port, "threads": threads,
            "daemonize": False, "database": 0, "verbosity": 1,
            "logfile": os.path.join(self.directory, "webdis.log"),
        }
        webdis_conf = os.path.join(self.directory, "webdis.json")
        with open(webdis_conf, "w") as conf:
            json.dump(self.config, conf, indent=2)
        # --save '' --appendonly no on the command line as well: no snapshot or log may slow the run.
        self.redis = b.Process("redis", [_require("redis-server"), redis_conf, "--save", "", "--appendonly", "no"],
                               os.environ.copy(), redis_port, "redis://127.0.0.1:%d" % (redis_port,))
        _wait_port(self.redis)
        self.webdis = b.Process("webdis", [_require("webdis"), webdis_conf], os.environ.copy(), http_port,
                                "http://127.0.0.1:%d" % (http_port,))
        self.port = http_port

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.webdis.alive:
                raise RuntimeError("webdis exited:\n%s" % (self.webdis.log_tail(),))
            if b.http_status(self.webdis.base + "/PING") == 200:
                return
            time.sleep(0.05)
        raise RuntimeError("webdis not ready after %ss:\n%s" % (timeout, self.webdis.log_tail()))

    def cpu_seconds(self) -> float:
        return self.redis.cpu_seconds() + self.webdis.cpu_seconds()

    def peak_rss(self) -> int:
        return self.redis.peak_rss() + self.webdis.peak_rss()

    def rss(self) -> int:
        return self.redis.rss() + self.webdis.rss()

    def stop(self) -> None:
        try:
            self.webdis.stop()
            self.redis.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def measure(target, mode: str, args, load) -> dict:
    target.wait_ready()
    load()
    url = "http://127.0.0.1:%d" % (target.port,)
    options = dict(connections=args.connections, threads=args.threads, script=SCRIPT, keys=KEYS, value=VALUE)
    if args.warmup > 0:
        b.run_wrk(url, mode, args.warmup, **options)
    cpu_before = target.cpu_seconds()
    result = b.run_wrk(url, mode, args.duration, **options)
    # The server's CPU time per request (webdis: webdis and redis-server together).
    result["cpu_us_per_request"] = round((target.cpu_seconds() - cpu_before) * 1e6 / max(result["requests"], 1), 1)
    result["peak_rss_bytes"] = target.peak_rss()
    result["rss_bytes"] = target.rss()
    target.stop()
    return result


def main() -> dict:
    p = b.parser("One node against the Node.js reference and webdis with redis-server: %d keys of %r."
                 % (KEYS, VALUE), warmup=15.0)
    p.add_argument("--mode", choices=["get", "put"], default="get", help="GETs or PUTs (default %(default)s)")
    p.add_argument("--webdis-threads", type=int, default=2,
                   help="webdis's worker threads (default %(default)s, as Debian's /etc/webdis/webdis.json)")
    p.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for our node, such as LOG_LEVEL=warning (repeatable); it also names the result "
                        "file: references[_put]-NAME=VALUE.<interpreter>.json")
    args = p.parse_args()
    node_env = dict(setting.split("=", 1) for setting in args.node_env if "=" in setting)
    if len(node_env) != len(args.node_env):
        p.error("--node-env takes NAME=VALUE")
    python = b.interpreter_path(args.interpreter)
    _require("redis-server"), _require("webdis")

    node = b.start_node(python, env=node_env)
    results = {"kvresponder": measure(node, args.mode, args,
                                      lambda: b.bulk_load(node.base, KEYS, value=VALUE, workers=1))}
    reference = b.start_node_reference()
    results["node"] = measure(reference, args.mode, args,
                              lambda: b.bulk_load(reference.base, KEYS, value=VALUE, workers=1))
    webdis = Webdis(args.webdis_threads)
    config = dict(webdis.config, logfile="(in a temporary directory)")
    results["webdis"] = measure(webdis, "webdis_" + args.mode, args,
                                lambda: webdis_load(webdis, KEYS, VALUE))

    ours = results["kvresponder"]
    data = {
        "description": "%s of %d keys of %r: one KV Responder node, the Node.js reference, webdis + redis-server"
                       % (args.mode.upper(), KEYS, VALUE),
        "mode": args.mode,
        "keys": KEYS,
        "value": VALUE,
        "results": results,
        "ratio_to_node": {"rps": b.ratio(ours["rps"], results["node"]["rps"]),
                          "p99": b.ratio(ours["p99_ms"], results["node"]["p99_ms"])},
        "ratio_to_webdis": {"rps": b.ratio(ours["rps"], results["webdis"]["rps"]),
                            "p99": b.ratio(ours["p99_ms"], results["webdis"]["p99_ms"])},
        "node_env": node_env,
        "webdis_config": config,
        "versions": {
            "redis-server": _version(["redis-server", "--version"]),
            "webdis": _version(["dpkg-query", "-W", "-f", "${Version}", "webdis"]),
            "node": _version([shutil.which("node") or "/usr/bin/node", "--version"]),
        },
    }
    scenario = "".join(["references" if args.mode == "get" else "references_put"]
                       + ["-%s=%s" % item for item in sorted(node_env.items())])
    result = b.finish(scenario, args, python, data)
    print("references: %s, req/s: KV Responder (%s) %.0f, Node.js %.0f, webdis %.0f; KV/Node %.2fx, KV/webdis %.2fx"
          % (args.mode.upper(), args.interpreter, ours["rps"], results["node"]["rps"], results["webdis"]["rps"],
             data["ratio_to_node"]["rps"], data["ratio_to_webdis"]["rps"]), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
