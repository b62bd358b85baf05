"""Cluster ratio with replicas (n2, n3) started with extra env (argv[2:] as K=V), alternated with a single node."""
import os, sys, socket, statistics, time
HERE = os.path.dirname(os.path.abspath(__file__)); REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(REPO, "bench")); sys.path.insert(0, REPO)
import benchlib as b
from cluster_ratio import pin, measure
python = b.interpreter_path(sys.argv[1])
extra = dict(kv.split("=", 1) for kv in sys.argv[2:])
env = b.with_secret({"REPLICATION_FACTOR": "2"})
disc = b.free_port(socket.SOCK_DGRAM)
decoy = b.start_node(python, "decoy"); decoy.wait_ready()
single = b.start_node(python, "s1", env={"REPLICATION_FACTOR": "2"}); single.wait_ready()
b.bulk_load(single.base, b.HIT_KEYS)
n1 = b.start_node(python, "n1", disc, env); n1.wait_ready()
b.bulk_load(n1.base, b.HIT_KEYS, batch=1000, workers=2)
cl = [n1] + [b.start_node(python, n, disc, dict(env, **extra)) for n in ("n2", "n3")]
for p in cl: p.wait_ready()
b.wait_formed(cl); b.wait_keys(cl, b.HIT_KEYS * 2, 120)
pin([single, n1], cl[1:])
measure(single, None, cl, 15, 32, 1); measure(n1, cl, [single], 15, 32, 1)
ratios = []
s = measure(single, None, cl, 10, 32, 1)
for r in range(4):
    time.sleep(5); c = measure(n1, cl, [single], 10, 32, 1)
    time.sleep(5); s2 = measure(single, None, cl, 10, 32, 1)
    ratios.append(round(c["rps"] / ((s["rps"] + s2["rps"]) / 2), 3)); s = s2
    print(ratios[-1], c["rps"], c["cpu_us_per_request_per_node"], s["cpu_us_per_request"], flush=True)
print("median", statistics.median(ratios), extra)
