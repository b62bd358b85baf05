"""
The write rate through one node of a 3-node RF=2 cluster across a fourth node's join: while the ring settles, a
write that the join moved also asks the key's previous owners for their version (docs/ARCHITECTURE.md, "When the
ring settles"), which costs a round trip to them.

A loaded cluster (10k keys) is warmed up with PUT load through n1 and left until its ring has settled (30 s after
it formed, the most a ring settles for). Then n4 starts, and from the moment n1's ring counts it, PUT load goes
through n1 in consecutive windows of ``--window`` seconds for ``--span`` seconds. Each window records the rate,
n1's CPU a request, the peer ``get`` calls n1 made (the previous owners asked), and whether n1's ring was still
settling at its end (``/diag``; ``None`` from code older than that field).

With ``--base REV``, the same is run first on that revision's code (from a worktree), then on this work tree's,
in one invocation:

    python3 bench/settling.py --interpreter pypy --base HEAD~1
"""

import json
import time

import benchlib as b
from ab import remove_worktree, resolve, variant_lib
from cluster_ratio import measure, pin

NODES = 3
#: The most a ring settles for (kvresponder.node.SETTLE_SECONDS), and a margin.
SETTLED_AFTER = 32.0


def _settling(node):
    rebalance = json.loads(b.http_get(node.base + "/diag")).get("rebalance", {})
    return rebalance.get("settling")


def _peer_gets(node) -> float:
    text = b.http_get(node.base + "/metrics").decode("utf-8")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kv_peer_request_duration_seconds_count{") and 'op="get"' in line)


def timeline(lib, python: str, args) -> dict:
    """
    One cluster of ``lib``'s code across a join: the windows after it, and when the ring settled.
    """
    # One secret for the cluster and the node that joins it.
    env = lib.with_secret({"REPLICATION_FACTOR": "2"})
    nodes = lib.start_loaded_cluster(python, NODES, b.HIT_KEYS, env)
    formed = time.monotonic()
    try:
        coordinator = nodes[0]
        pinning = pin([coordinator], nodes[1:])
        options = (args.connections, args.threads)
        measure(coordinator, None, [], args.warmup, *options)
        time.sleep(max(0.0, formed + SETTLED_AFTER - time.monotonic()))
        joiner = lib.start_node(python, "n4", nodes[0].discovery_port, env)
        nodes.append(joiner)
        joiner.wait_ready(60)
        lib.wait_formed(nodes)
        joined = time.monotonic()
        windows = []
        while time.monotonic() - joined < args.span:
            gets = _peer_gets(coordinator)
            window = measure(coordinator, None, [], args.window, *options)
            windows.append({"t_s": round(time.monotonic() - joined, 1), "rps": window["rps"],
                            "coordinator_us": window["cpu_us_per_request"], "errors": window["errors"],
                            "peer_gets": int(_peer_gets(coordinator) - gets), "settling": _settling(coordinator)})
        settled = [w["t_s"] for w in windows if w["settling"] is False]
        return {"windows": windows, "pinning": pinning,
                "settled_after_s": settled[0] if settled else None,
                "rps_first_10s": round(sum(w["rps"] for w in windows if w["t_s"] <= 10) /
                                       max(1, len([w for w in windows if w["t_s"] <= 10])), 1),
                "rps_last_10s": round(sum(w["rps"] for w in windows if w["t_s"] > args.span - 10) /
                                      max(1, len([w for w in windows if w["t_s"] > args.span - 10])), 1)}
    finally:
        lib.stop_all()


def main() -> dict:
    p = b.parser("PUT rate through one node of three across a fourth node's join.", warmup=15.0)
    p.add_argument("--base", help="run this git revision's code first, then this work tree's")
    p.add_argument("--window", type=float, default=2.0, help="seconds of each window (default %(default)s)")
    p.add_argument("--span", type=float, default=40.0, help="seconds of windows after the join (default %(default)s)")
    args = p.parse_args()
    base = None if args.base is None else resolve(args.base)
    if args.base is not None and base is None:
        p.error("--base: no commit %r in %s" % (args.base, b.REPO))
    python = b.interpreter_path(args.interpreter)
    results = {}
    worktree = None
    try:
        if base is not None:
            lib, worktree = variant_lib(base)
            results["base"] = dict(timeline(lib, python, args), code=base)
        results["kvresponder"] = dict(timeline(b, python, args), code=b.git_head())
    finally:
        b.stop_all()
        if worktree is not None:
            remove_worktree(worktree)
    return b.finish("settling", args, python, {
        "description": "3 nodes RF=2, PUT through n1 in windows after n4 joins",
        "nodes": NODES + 1, "replication_factor": 2, "window_s": args.window, "span_s": args.span,
        "results": results})


if __name__ == "__main__":
    main()
