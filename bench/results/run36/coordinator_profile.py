"""
vmprof the single node or the cluster coordinator under PUT load (PyPy), pinned as cluster_ratio:
``python3 coordinator_profile.py single|cluster`` writes /tmp/kvprof-<mode>.prof; read it with
``/var/cache/kv-pypy311/python ../run33/readprof.py /tmp/kvprof-<mode>.prof 40``.
"""
import os
import socket
import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
import cluster_ratio as cr
import profile_parts as pp
python = b.interpreter_path("pypy")
mode = sys.argv[1]
prof = "/tmp/kvprof-%s.prof" % mode
aff = os.sched_getaffinity(0)
orig = b.TWISTD
nodes = []
env = b.with_secret({"REPLICATION_FACTOR": "2"})
try:
    b.TWISTD = pp.PROFILED_TWISTD
    e1 = dict(env, KV_PROFILE_OUT=prof)
    disc = b.free_port(socket.SOCK_DGRAM)
    n1 = b.start_node(python, "n1", disc, e1); nodes.append(n1)
    b.TWISTD = orig
    n1.wait_ready()
    b.bulk_load(n1.base, b.HIT_KEYS, batch=1000, workers=2)
    if mode == "cluster":
        for i in (2, 3):
            nodes.append(b.start_node(python, "n%d" % i, disc, env))
        for n in nodes: n.wait_ready(180)
        b.wait_formed(nodes, 180)
        b.wait_keys(nodes, b.HIT_KEYS * 2, 180)
    cr.pin([n1], nodes[1:])
    b.Wrk("http://127.0.0.1:%d" % n1.port, "put", 15, connections=32).result()
    r = b.Wrk("http://127.0.0.1:%d" % n1.port, "put", 10, connections=32).result()
    print(mode, "rps", r["rps"])
finally:
    b.TWISTD = orig
    for n in nodes: n.stop()
    os.sched_setaffinity(0, aff)
