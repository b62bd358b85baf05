"""
The cluster scenarios: three KV Responder nodes (RF=2, discovery on loopback), 10k keys preloaded.

The keys go into the first node before the others start (they take their copies as they join): loading
through the formed cluster is slow, one peer request per replicated write.

- cluster_put: PUTs through one node (each write is stored on its two owners before the reply).
- cluster_put_spread: the same PUTs spread over all nodes (each node coordinates a third of them), as a
  Kubernetes Service spreads clients over the pods.
- cluster_mix_one: the 90/10 GET/PUT mix through one node.
- cluster_mix_spread: the same mix spread over all nodes. wrk talks to one host, so this runs one wrk per node
  at once (each with ceil(C/3) connections, C in all) and adds their rates; latencies are the worst node's.
"""

import math
import sys

import benchlib as b

SCENARIOS = {
    "cluster_put": ("put", False, "3 nodes RF=2: PUT through one node"),
    "cluster_put_spread": ("put", True, "3 nodes RF=2: PUT spread over all nodes"),
    "cluster_mix_one": ("mix", False, "3 nodes RF=2: 90/10 GET/PUT through one node"),
    "cluster_mix_spread": ("mix", True, "3 nodes RF=2: 90/10 GET/PUT spread over all nodes"),
}
NODES = 3
CLUSTER_WARMUP = 15.0


def main(scenario: str) -> dict:
    mode, spread, what = SCENARIOS[scenario]
    # Three nodes that each JIT-compile (on PyPy) share two cores with wrk: after 5 s they are still
    # compiling, and the rate climbs by a third between 5 and 15 s of load. 15 s measures them warm.
    args = b.parser("%s." % (what,), warmup=CLUSTER_WARMUP).parse_args()
    python = b.interpreter_path(args.interpreter)
    began = b.time.monotonic()
    nodes = b.start_loaded_cluster(python, NODES, b.HIT_KEYS, {"REPLICATION_FACTOR": "2"})
    result_load_s = b.time.monotonic() - began
    targets = nodes if spread else nodes[:1]
    connections = math.ceil(args.connections / len(targets))
    options = dict(connections=connections, threads=args.threads)

    def load(seconds):
        runs = [b.Wrk("http://127.0.0.1:%d" % (node.port,), mode, seconds, **options) for node in targets]
        return [run.result() for run in runs]

    if args.warmup > 0:
        load(args.warmup)
    cpu_before = [node.cpu_seconds() for node in nodes]
    runs = load(args.duration)
    cpu = [node.cpu_seconds() - before for node, before in zip(nodes, cpu_before)]
    result = b.combine(runs) if spread else runs[0]
    # CPU time each node spent per client request: where the cost of a replicated request lands.
    result["cpu_us_per_request_per_node"] = [round(seconds * 1e6 / max(result["requests"], 1), 1)
                                             for seconds in cpu]
    result["preload_s"] = round(result_load_s, 2)
    result["peak_rss_bytes"] = max(node.peak_rss() for node in nodes)
    result["peak_rss_bytes_per_node"] = [node.peak_rss() for node in nodes]
    result["keys_per_node"] = [node.metric("kv_store_keys") for node in nodes]
    result["replication_failures"] = sum(_replication_failures(node) for node in nodes)
    for node in nodes:
        node.stop()
    return b.finish(scenario, args, python, {"description": what, "nodes": NODES, "replication_factor": 2,
                                             "connections_per_wrk": connections,
                                             "results": {"kvresponder": result}})


def _replication_failures(node) -> float:
    text = b.http_get(node.base + "/metrics").decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kv_replication_operations_total{") and 'result="failure"' in line)


if __name__ == "__main__":
    main(sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in SCENARIOS else sys.exit("usage: cluster.py SCENARIO"))
