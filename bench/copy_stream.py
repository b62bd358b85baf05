"""
Is the copy stream worth it? Two 3-node RF=2 clusters side by side, the same but for ``REPLICATION_STREAM``
(``true``: the copies of client writes go to each peer over one upgraded connection; ``false``: as
``/_internal/apply`` requests over treq's pooled HTTP connections), measured in alternation with PUTs through one
node of each: stream, requests, stream, requests, ... (``--rounds`` of each). Each round's ratio is the stream
cluster's rate over the mean of the request cluster's rates just before and after it, so that the VM's drift
cancels out; the result is the median of the rounds' ratios.

As in cluster_ratio.py, each coordinator gets the first CPU (``--pin``, the default), and the replicas and wrk
the others: a pod has cores of its own.
"""

import argparse
import os
import statistics
import time

import benchlib as b
from cluster_ratio import measure, pin

NODES = 3
WARMUP = 15.0
GAP = 5.0


def main() -> dict:
    p = b.parser("3-node RF=2 PUT with the copy stream against plain treq requests, in alternation.", warmup=WARMUP)
    p.add_argument("--rounds", type=int, default=5, help="stream windows, each between two request windows "
                                                          "(default %(default)s)")
    p.add_argument("--gap", type=float, default=GAP, help="seconds of no load before each window")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="give each coordinator the first CPU, and the other nodes and wrk the rest")
    args = p.parse_args()
    python = b.interpreter_path(args.interpreter)
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    streamed, requested = [], []
    pinning = None
    try:
        streamed = b.start_loaded_cluster(python, NODES, b.HIT_KEYS, {"REPLICATION_STREAM": "true"})
        requested = b.start_loaded_cluster(python, NODES, b.HIT_KEYS, {"REPLICATION_STREAM": "false"})
        if args.pin:
            pinning = pin([streamed[0], requested[0]], streamed[1:] + requested[1:])
        options = (args.connections, args.threads)

        def after_gap(nodes):
            time.sleep(args.gap)
            return nodes

        if args.warmup > 0:
            measure(streamed[0], streamed, requested, args.warmup, *options)
            measure(requested[0], requested, streamed, args.warmup, *options)
        requests = [measure(requested[0], requested, after_gap(streamed), args.duration, *options)]
        rounds = []
        for _ in range(args.rounds):
            stream = measure(streamed[0], streamed, after_gap(requested), args.duration, *options)
            requests.append(measure(requested[0], requested, after_gap(streamed), args.duration, *options))
            around = (requests[-2], requests[-1])
            rounds.append({"stream": stream, "requests_before": around[0], "requests_after": around[1],
                           "ratio": round(stream["rps"] / statistics.mean(r["rps"] for r in around), 3)})
        streams_opened = streamed[0].metric("kv_copy_streams_outgoing")
        streams_unused = requested[0].metric("kv_copy_streams_outgoing")
    finally:
        for node in streamed + requested:
            node.stop()
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    ratios = [r["ratio"] for r in rounds]
    result = {
        "rounds": rounds,
        "ratios": ratios,
        "ratio_median": round(statistics.median(ratios), 3),
        "stream_rps": statistics.median(r["stream"]["rps"] for r in rounds),
        "requests_rps": statistics.median(r["rps"] for r in requests),
        "rps": statistics.median(r["stream"]["rps"] for r in rounds),
        "errors": sum(r["stream"]["errors"] for r in rounds) + sum(r["errors"] for r in requests),
        "copy_streams_open": {"stream": streams_opened, "requests": streams_unused},
    }
    return b.finish("copy_stream", args, python, {
        "description": "3 nodes RF=2 PUT through one node: copy stream / treq requests, alternating windows",
        "nodes": NODES, "replication_factor": 2, "gap_s": args.gap, "pinning": pinning,
        "results": {"kvresponder": result}})


if __name__ == "__main__":
    main()
