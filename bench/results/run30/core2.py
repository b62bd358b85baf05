import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
import cluster_ratio as cr
python = b.interpreter_path("pypy")
def cpus():
    out = {}
    for line in open("/proc/stat"):
        if line.startswith("cpu") and line[3].isdigit():
            f = line.split(); v = list(map(int, f[1:]))
            out[f[0]] = (sum(v), v[3] + v[4])
    return out
single = b.start_node(python, "s1", env={"REPLICATION_FACTOR": "2"})
try:
    single.wait_ready(); b.bulk_load(single.base, b.HIT_KEYS)
    cluster = b.start_loaded_cluster(python, 3, b.HIT_KEYS, {"REPLICATION_FACTOR": "2"})
    cr.pin([single, cluster[0]], cluster[1:])
    cr.measure(single, None, cluster, 15, 32, 1)
    cr.measure(cluster[0], cluster, [single], 15, 32, 1)
    for name, node, watched in [("single", single, None), ("cluster", cluster[0], cluster)] * 2:
        time.sleep(5)
        a = cpus()
        r = cr.measure(node, watched, [], 10, 32, 1)
        z = cpus()
        busy = {c: round(1 - (z[c][1] - a[c][1]) / (z[c][0] - a[c][0]), 3) for c in a}
        print(name, r["rps"], r["cpu_us_per_request_per_node"], busy, flush=True)
finally:
    b.stop_all()
