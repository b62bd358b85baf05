import os
import sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
from cluster_ratio import measure, pin
import settling
python = b.interpreter_path(sys.argv[1] if len(sys.argv) > 1 else "pypy")
env = b.with_secret({"REPLICATION_FACTOR": "2"})
nodes = b.start_loaded_cluster(python, 3, b.HIT_KEYS, env)
formed = time.monotonic()
try:
    c = nodes[0]
    pin([c], nodes[1:])
    measure(c, None, [], 15, 32, 1)
    time.sleep(max(0.0, formed + 32 - time.monotonic()))
    for name in ("n4", "n5", "n6"):
        j = b.start_node(python, name, nodes[0].discovery_port, env)
        nodes.append(j)
        j.wait_ready(60)
        b.wait_formed(nodes)
        rows = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 34:
            w = measure(c, None, [], 2, 32, 1)
            rows.append("%.0f/%.0f%s" % (w["rps"] / 1000, w["cpu_us_per_request"], "s" if settling._settling(c) else ""))
        print(name, " ".join(rows), flush=True)
finally:
    b.stop_all()
