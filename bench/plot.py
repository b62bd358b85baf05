"""
Draws throughput and p99 latency per scenario and interpreter (and the Node.js reference where measured)
from bench/results/*.json into docs/performance.png. Needs matplotlib (pip install matplotlib).
"""

import glob
import json
import os
import sys

import benchlib as b

ORDER = ["get_hit", "get_miss", "put", "mix", "bulk_get", "bulk_put", "cluster_put", "cluster_put_spread",
         "cluster_mix_one", "cluster_mix_spread", "latency", "soak"]


def load():
    data = {}
    for path in glob.glob(os.path.join(b.RESULTS, "*.*.json")):
        with open(path) as f:
            r = json.load(f)
        if "results" not in r or r.get("scenario") not in ORDER:
            continue
        data[(r["scenario"], r["interpreter"])] = r
    return data


def main(out: str = os.path.join(b.REPO, "docs", "performance.png")) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load()
    scenarios = [s for s in ORDER if any((s, i) in data for i in ("cpython", "pypy"))]
    series = [("CPython", "cpython", "kvresponder", "#4477aa"), ("PyPy", "pypy", "kvresponder", "#ee6677"),
              ("Node.js reference", "cpython", "node", "#228833")]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 8), sharex=True)
    width = 0.27
    for k, (label, interp, target, colour) in enumerate(series):
        xs, rps, p99 = [], [], []
        for i, s in enumerate(scenarios):
            r = data.get((s, interp), {}).get("results", {}).get(target)
            if r:
                xs.append(i + (k - 1) * width)
                rps.append(r["rps"])
                p99.append(r["p99_ms"])
        top.bar(xs, rps, width, label=label, color=colour)
        bottom.bar(xs, p99, width, label=label, color=colour)
    top.set_ylabel("requests/s, log (bulk: requests of 100 ops)")
    top.set_yscale("log")
    top.set_title("KV Responder throughput and p99 latency (wrk -t1 -c32; latency: paced at 50% of saturation)")
    top.legend()
    bottom.set_ylabel("p99 latency, ms (log)")
    bottom.set_yscale("log")
    bottom.axhline(5, color="grey", linestyle="--", linewidth=0.8)
    bottom.text(len(scenarios) - 0.5, 5.3, "5 ms", color="grey", ha="right")
    bottom.set_xticks(range(len(scenarios)))
    bottom.set_xticklabels(scenarios, rotation=25, ha="right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=90)
    print("plot: wrote %s" % (os.path.relpath(out),), file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
