"""
Copies a batch on the coordinator, for A (a git revision) and B (this work tree): two pinned clusters, PUT
windows through each, and the coordinator's count of `apply` peer calls (one a batch) against the writes.

    python3 bench/results/run34/batchsize.py HEAD
"""
import os
import re
import sys
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
from ab import variant_lib, remove_worktree, _env
from cluster_ratio import measure, pin

def counts(node):
    text = urllib.request.urlopen(node.base + "/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'kv_peer_request_duration_seconds_count\{.*op="([^"]+)".*\} ([0-9.e+]+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out

python = b.interpreter_path("pypy")
liba, wt = variant_lib(sys.argv[1])
try:
    decoy = b.start_node(python, "decoy"); decoy.wait_ready()
    clusters = [("A", liba.start_loaded_cluster(python, 3, b.HIT_KEYS, _env([]))),
                ("B", b.start_loaded_cluster(python, 3, b.HIT_KEYS, _env([])))]
    pin([n[0] for _, n in clusters], [m for _, n in clusters for m in n[1:]])
    for _, nodes in clusters:
        measure(nodes[0], None, [], 15, 32, 1)
    for r in range(2):
        for label, nodes in clusters:
            before = counts(nodes[0])
            res = measure(nodes[0], None, [], 8, 32, 1)
            after = counts(nodes[0])
            req = res["rps"] * 8
            diff = {k: round(after[k] - before.get(k, 0)) for k in after if after[k] - before.get(k, 0) > 0}
            print(label, res["rps"], res["cpu_us_per_request"], diff,
                  {k: round(req / v, 2) for k, v in diff.items()}, flush=True)
finally:
    b.stop_all()
    if wt: remove_worktree(wt)
