"""
Run 20: bench/cluster_ratio.py with the cluster's two replicas (n2, n3) at the log level in $QUIET (unset: as
shipped), the coordinator and the single node at info. From the repository:

    QUIET=warning python3 bench/results/run20/quiet_replicas.py --interpreter pypy --rounds 3 --out FILE
"""
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
import cluster_ratio
orig = b.start_node
def start_node(python, name="n1", discovery_port=None, env=None):
    env = dict(env or {})
    if name in ("n2", "n3") and os.environ.get("QUIET"):
        env["LOG_LEVEL"] = os.environ["QUIET"]
    return orig(python, name, discovery_port, env)
b.start_node = start_node
cluster_ratio.main()
