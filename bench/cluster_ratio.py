"""
The 3-node RF=2 PUT through one node against a single node's PUT, measured in alternation.

Both stay up side by side (each with the same 10k keys preloaded, each discovering only its own kind: they
listen for heartbeats on different ports), and the load moves between them: single, cluster, single, cluster,
..., single, ``--duration`` seconds each. Each round's ratio is the cluster's rate over the mean of the single
node's rates just before and just after it, so that what the VM's speed does over minutes (the same code moved
by up to a third between runs of cluster_put.py and put.py a minute apart) cancels out; the result is the
median of the rounds' ratios. The idle side only sends heartbeats (and, for the cluster, an anti-entropy pass
now and then) while the other is measured.

It also gives each round's CPU ratio: the single node's CPU per request over the coordinator's (the node the
cluster's load goes through), which is the bound the ratio meets when the coordinator's core is the bottleneck.
"""

import statistics

import benchlib as b

NODES = 3
SINGLE_WARMUP = 5.0
CLUSTER_WARMUP = 15.0  # as cluster.py: three nodes that each JIT-compile on PyPy need it


def _measure(node, cluster, seconds: float, connections: int, threads: int) -> dict:
    """PUT load through ``node`` for ``seconds``; the CPU per request of ``node`` and of each of ``cluster``."""
    watched = cluster or [node]
    before = [member.cpu_seconds() for member in watched]
    result = b.Wrk("http://127.0.0.1:%d" % (node.port,), "put", seconds, connections=connections,
                   threads=threads).result()
    requests = max(result["requests"], 1)
    cpu = [round((member.cpu_seconds() - start) * 1e6 / requests, 1) for member, start in zip(watched, before)]
    return {"rps": result["rps"], "p99_ms": result["p99_ms"], "errors": result["errors"],
            "cpu_us_per_request": cpu[0], "cpu_us_per_request_per_node": cpu}


def main() -> dict:
    p = b.parser("3 nodes RF=2 PUT through one node against a single node's PUT, in alternation.", warmup=None)
    p.add_argument("--rounds", type=int, default=5, help="cluster windows, each between two single-node ones "
                                                          "(default %(default)s)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    python = b.interpreter_path(args.interpreter)
    single = b.start_node(python, "s1", env={"REPLICATION_FACTOR": "2"})
    cluster = []
    try:
        single.wait_ready()
        b.bulk_load(single.base, b.HIT_KEYS)
        cluster = b.start_loaded_cluster(python, NODES, b.HIT_KEYS, {"REPLICATION_FACTOR": "2"})
        coordinator = cluster[0]
        options = (args.connections, args.threads)
        warm_single = SINGLE_WARMUP if args.warmup is None else args.warmup
        warm_cluster = CLUSTER_WARMUP if args.warmup is None else args.warmup
        if warm_single > 0:
            _measure(single, None, warm_single, *options)
        if warm_cluster > 0:
            _measure(coordinator, cluster, warm_cluster, *options)
        singles = [_measure(single, None, args.duration, *options)]
        rounds = []
        for _ in range(args.rounds):
            clustered = _measure(coordinator, cluster, args.duration, *options)
            singles.append(_measure(single, None, args.duration, *options))
            around = (singles[-2], singles[-1])
            rounds.append({
                "cluster": clustered,
                "single_before": around[0],
                "single_after": around[1],
                "ratio": round(clustered["rps"] / statistics.mean(s["rps"] for s in around), 3),
                "cpu_ratio": round(statistics.mean(s["cpu_us_per_request"] for s in around)
                                   / clustered["cpu_us_per_request"], 3),
            })
        keys = [node.metric("kv_store_keys") for node in cluster]
    finally:
        for node in [single] + cluster:
            node.stop()
    ratios = [r["ratio"] for r in rounds]
    result = {
        "rounds": rounds,
        "ratios": ratios,
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio_median": round(statistics.median(r["cpu_ratio"] for r in rounds), 3),
        "errors": sum(r["cluster"]["errors"] for r in rounds) + sum(s["errors"] for s in singles),
        "keys_per_node": keys,
        # For run_all's table: the cluster's median window.
        "rps": statistics.median(r["cluster"]["rps"] for r in rounds),
        "single_rps": statistics.median(s["rps"] for s in singles),
    }
    return b.finish("cluster_ratio", args, python, {
        "description": "3 nodes RF=2 PUT through one node / single-node PUT, alternating windows",
        "nodes": NODES, "replication_factor": 2, "results": {"kvresponder": result}})


if __name__ == "__main__":
    main()
