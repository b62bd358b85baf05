"""
The 3-node RF=2 PUT through one node against a single node's PUT, measured in alternation.

Both stay up side by side (each with the same 10k keys preloaded, each discovering only its own kind: they
listen for heartbeats on different ports), and the load moves between them: single, cluster, single, cluster,
..., single, ``--duration`` seconds each. Each round's ratio is the cluster's rate over the mean of the single
node's rates just before and just after it, so that what the VM's speed does over minutes (the same code moved
by up to a third between runs of cluster_put.py and put.py a minute apart) cancels out; the result is the
median of the rounds' ratios.

The idle side is not quite idle: a node left alone for 2 s after a burst of writes reclaims memory (a major
collection on PyPy), and the cluster runs an anti-entropy pass every 30 s. So each window waits ``--gap``
seconds after the last, long enough for the side that just went idle to reclaim before the other is measured,
and each window records the idle side's CPU (``idle_cpu_us_per_request``: its CPU time over the window,
divided by the measured side's requests), so that what was left of the interference shows.

It also gives each round's CPU ratio: the single node's CPU per request over the coordinator's (the node the
cluster's load goes through), which is the bound the ratio meets when the coordinator's core is the bottleneck.

By default the measured node gets a core of its own (``--pin``): the single node and the coordinator (every
thread of each) are pinned to the first CPU this process may use, and everything else (the two other nodes of the
cluster, and wrk, through this process's own affinity) to the others. On this 2-core machine, left to the
scheduler, the coordinator shares the two cores with the two replicas and wrk, so it gets less than a core, and
the rate ratio falls below the CPU ratio that its CPU per write allows (bench/results/HISTORY.md, run 9), by
however much the scheduler happened to take. A single node shares them with wrk alone. A pod of a real cluster has its
own cores, as the pinned coordinator does; the replicas share a core with wrk, which if anything slows their
answers. ``--no-pin`` measures as before (and as every other scenario does).

A decoy node starts first and stays idle. On this VM, the first node a run starts used 4-7 % more CPU a
request than identical ones started after it, in every run that measured them in alternation: six of three
single nodes, four of two clusters and one of four (bench/results/HISTORY.md, run 17). With an idle node started
before them, the first measured node was no slower. Without the decoy, that node would be the single node, and the ratio would
come out that much too high.
"""

import argparse
import os
import statistics
import time

import benchlib as b

NODES = 3
# As single.py and cluster.py: on PyPy the request path can still be compiling after 5 s.
SINGLE_WARMUP = 15.0
CLUSTER_WARMUP = 15.0
GAP = 5.0  # longer than the idle reclaim's 2 s


def measure(node, cluster, idle, seconds: float, connections: int, threads: int) -> dict:
    """
    PUT load through ``node`` for ``seconds``; the CPU per request of ``node``, of each of ``cluster``, and of
    the ``idle`` nodes together.
    """
    watched = cluster or [node]
    before = [member.cpu_seconds() for member in watched]
    idle_before = sum(member.cpu_seconds() for member in idle)
    result = b.Wrk("http://127.0.0.1:%d" % (node.port,), "put", seconds, connections=connections,
                   threads=threads).result()
    requests = max(result["requests"], 1)
    cpu = [round((member.cpu_seconds() - start) * 1e6 / requests, 1) for member, start in zip(watched, before)]
    idle_cpu = sum(member.cpu_seconds() for member in idle) - idle_before
    return {"rps": result["rps"], "p99_ms": result["p99_ms"], "errors": result["errors"],
            "cpu_us_per_request": cpu[0], "cpu_us_per_request_per_node": cpu,
            "idle_cpu_us_per_request": round(idle_cpu * 1e6 / requests, 1)}


def pin(measured, others) -> "dict | None":
    """
    Pin the ``measured`` processes to one CPU and the ``others``, and this process (so the wrk it starts), to the
    rest. ``None`` where that is not possible (fewer than two CPUs, or no affinity calls).
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    alone, rest = {cpus[0]}, set(cpus[1:])
    for process in measured:
        _pin_threads(process.pid, alone)
    for process in others:
        _pin_threads(process.pid, rest)
    os.sched_setaffinity(0, rest)
    return {"measured_cpus": sorted(alone), "other_cpus": sorted(rest)}


def _pin_threads(pid: int, cpus) -> None:
    """
    Pin every thread of ``pid`` (a twistd's reactor thread and any of its thread pool's), not only its first.
    """
    try:
        threads = [int(tid) for tid in os.listdir("/proc/%d/task" % (pid,))]
    except OSError:
        threads = [pid]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # a thread that has ended since


def main() -> dict:
    p = b.parser("3 nodes RF=2 PUT through one node against a single node's PUT, in alternation.", warmup=None)
    p.add_argument("--rounds", type=int, default=5, help="cluster windows, each between two single-node ones "
                                                          "(default %(default)s)")
    p.add_argument("--gap", type=float, default=GAP, help="seconds of no load before each window "
                                                          "(default %(default)s)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="give the single node and the coordinator a CPU of their own, and the other nodes and wrk "
                        "the rest (default: on)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    python = b.interpreter_path(args.interpreter)
    decoy = b.start_node(python, "decoy")
    decoy.wait_ready()
    single = b.start_node(python, "s1", env={"REPLICATION_FACTOR": "2"})
    cluster = []
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pinning = None
    try:
        single.wait_ready()
        b.bulk_load(single.base, b.HIT_KEYS)
        cluster = b.start_loaded_cluster(python, NODES, b.HIT_KEYS, {"REPLICATION_FACTOR": "2"})
        coordinator = cluster[0]
        if args.pin:
            pinning = pin([single, coordinator], cluster[1:])
        options = (args.connections, args.threads)
        warm_single = SINGLE_WARMUP if args.warmup is None else args.warmup
        warm_cluster = CLUSTER_WARMUP if args.warmup is None else args.warmup

        def alone(measured):
            time.sleep(args.gap)
            return measured

        if warm_single > 0:
            measure(single, None, cluster, warm_single, *options)
        if warm_cluster > 0:
            measure(coordinator, cluster, [single], warm_cluster, *options)
        singles = [measure(single, None, alone(cluster), args.duration, *options)]
        rounds = []
        for _ in range(args.rounds):
            clustered = measure(coordinator, cluster, alone([single]), args.duration, *options)
            singles.append(measure(single, None, alone(cluster), args.duration, *options))
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
        for node in [single] + cluster + [decoy]:
            node.stop()
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
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
        "nodes": NODES, "replication_factor": 2, "warmup_single_s": warm_single, "warmup_cluster_s": warm_cluster,
        "gap_s": args.gap, "pinning": pinning, "results": {"kvresponder": result}})


if __name__ == "__main__":
    main()
