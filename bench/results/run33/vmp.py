"""
Pinned as cluster_ratio pins: a 3-node cluster (or, with ``single``, one node), PUT load through n1, one node under
vmprof (argv[1]: ``coord`` n1, ``replica`` n2, ``single``) for 20 s of load only (SIGUSR1/SIGUSR2), after 15 s of
warm-up. Read the profile with readprof.py, on PyPy (vmprof installed in its venv).
"""
import os, sys, socket, time
HERE = os.path.dirname(os.path.abspath(__file__)); REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(REPO, "bench")); sys.path.insert(0, REPO)
import benchlib as b
from cluster_ratio import pin
PROFILED_TWISTD = ("import os, sys, signal, vmprof; out = open(os.environ['KV_PROFILE_OUT'], 'w+b'); "
 "signal.signal(signal.SIGUSR1, lambda *a: vmprof.enable(out.fileno(), period=0.0005)); "
 "signal.signal(signal.SIGUSR2, lambda *a: (vmprof.disable(), out.close())); "
 "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()")
import signal
which = sys.argv[1]
python = b.interpreter_path("pypy")
profile = "/tmp/run33-%s.prof" % which
env = b.with_secret({"REPLICATION_FACTOR": "2"})
disc = b.free_port(socket.SOCK_DGRAM)
decoy = b.start_node(python, "decoy"); decoy.wait_ready()
orig = b.TWISTD
nodes = []
for i, name in enumerate(["n1"] if which == "single" else ["n1", "n2", "n3"]):
    prof = (which in ("coord", "single") and name == "n1") or (which == "replica" and name == "n2")
    b.TWISTD = PROFILED_TWISTD if prof else orig
    e = dict(env, KV_PROFILE_OUT=profile) if prof else env
    p = b.start_node(python, name, disc, e)
    p.wait_ready()
    if i == 0:
        b.bulk_load(p.base, b.HIT_KEYS, batch=1000, workers=2)
    nodes.append(p)
b.TWISTD = orig
b.wait_formed(nodes); b.wait_keys(nodes, b.HIT_KEYS * min(2, len(nodes)), 120)
pin([nodes[0]], nodes[1:])
b.run_wrk("http://127.0.0.1:%d" % nodes[0].port, "put", 15)
prof = nodes[1] if which == "replica" else nodes[0]
time.sleep(2)
w = b.Wrk("http://127.0.0.1:%d" % nodes[0].port, "put", 25)
time.sleep(2); prof.process.send_signal(signal.SIGUSR1); time.sleep(20); prof.process.send_signal(signal.SIGUSR2)
r = w.result(); time.sleep(1)
print("rps", r["rps"])
for p in nodes: p.stop()
decoy.stop()
