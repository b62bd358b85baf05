"""Syscalls a request on a single node and on a cluster coordinator (perf tracepoints), PyPy, pinned as cluster_ratio."""
import os, subprocess, sys, time, json
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
import cluster_ratio as cr
python = b.interpreter_path(sys.argv[2] if len(sys.argv) > 2 else "pypy")
mode = sys.argv[1]
EV = ["raw_syscalls:sys_enter", "syscalls:sys_enter_sendto", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_epoll_wait",
      "syscalls:sys_enter_write", "syscalls:sys_enter_read", "syscalls:sys_enter_sendmsg", "syscalls:sys_enter_writev", "syscalls:sys_enter_epoll_ctl", "task-clock", "context-switches"]
def reqs(n):
    return n.metric("kv_http_requests_total")
nodes = []
aff = os.sched_getaffinity(0)
try:
    if mode == "single":
        n = b.start_node(python, "s1", env={"REPLICATION_FACTOR": "2"}); nodes=[n]; n.wait_ready()
        b.bulk_load(n.base, b.HIT_KEYS)
        target = n; cr.pin([n], [])
    else:
        nodes = b.start_loaded_cluster(python, 3, b.HIT_KEYS, {"REPLICATION_FACTOR": "2"})
        target = nodes[0]; cr.pin([target], nodes[1:])
    b.Wrk("http://127.0.0.1:%d" % target.port, "put", 15, connections=32).result()
    w = b.Wrk("http://127.0.0.1:%d" % target.port, "put", 9, connections=32)
    time.sleep(2)
    r0 = reqs(target)
    out = "/tmp/sc/%s.perf" % mode
    p = subprocess.run(["perf", "stat", "-x,", "-o", out, "-e", ",".join(EV), "-p", str(target.pid), "--", "sleep", "5"])
    r1 = reqs(target)
    r = w.result()
    n = r1 - r0 - 1
    print(mode, "rps", r["rps"], "requests in window", n)
    for line in open(out):
        parts = line.strip().split(",")
        if len(parts) > 3 and parts[0].replace(".", "").isdigit():
            print("  %-35s %10s  per request %.3f" % (parts[2], parts[0], float(parts[0]) / n))
finally:
    for n in nodes: n.stop()
    os.sched_setaffinity(0, aff)
