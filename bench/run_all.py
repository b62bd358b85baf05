"""
Runs every scenario on both interpreters, writes bench/results/<scenario>.<interpreter>.json and
bench/results/summary.json, and prints a table (and, with --plot, draws docs/performance.png).

    python3 bench/run_all.py [--duration 10] [--interpreters cpython,pypy] [--scenarios get_hit,put,...]
                             [--memory-keys 1000000] [--rebalance-keys 100000] [--soak 120] [--plot]

Each scenario runs as its own process (python3 bench/<scenario>.py ...), one after the other.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import benchlib as b

SINGLE = ["get_hit", "get_miss", "put", "mix", "bulk_get", "bulk_put"]
CLUSTER = ["cluster_put", "cluster_put_spread", "cluster_mix_one", "cluster_mix_spread", "cluster_ratio"]
OTHER = ["latency", "memory", "rebalance", "references"]
ALL = SINGLE + CLUSTER + OTHER


def run(scenario: str, interpreter: str, args) -> dict:
    command = [sys.executable, os.path.join(b.BENCH, scenario + ".py"), "--interpreter", interpreter]
    if args.warmup is not None:
        command += ["--warmup", str(args.warmup)]
    if scenario == "soak":
        command += ["--duration", str(args.soak)]
    else:
        command += ["--duration", str(args.duration)]
    if scenario == "memory":
        command += ["--keys", str(args.memory_keys)]
    if scenario == "rebalance":
        command += ["--keys", str(args.rebalance_keys)]
    print("run_all: %s" % (" ".join(command[1:]),), file=sys.stderr, flush=True)
    began = time.monotonic()
    completed = subprocess.run(command, stdout=subprocess.DEVNULL, cwd=b.REPO)
    path = os.path.join(b.RESULTS, "%s.%s.json" % (scenario, interpreter))
    if not os.path.exists(path) or os.path.getmtime(path) < time.time() - (time.monotonic() - began) - 1:
        return {"scenario": scenario, "interpreter": interpreter, "failed": completed.returncode}
    with open(path) as f:
        result = json.load(f)
    if completed.returncode:
        result["exit_code"] = completed.returncode
    return result


def mb(n):
    return "%.0f" % (n / 2 ** 20) if n else "-"


def table(results) -> str:
    rows = ["%-19s %-7s %9s %8s %8s %8s %7s %8s %9s %7s" % (
        "scenario", "interp", "req/s", "p50 ms", "p99 ms", "p99.9", "errors", "RSS MB", "node r/s", "x node")]
    for r in results:
        if "results" not in r:
            rows.append("%-19s %-7s FAILED (exit %s)" % (r["scenario"], r["interpreter"], r.get("failed")))
            continue
        ours = r["results"]["kvresponder"]
        node = r["results"].get("node")
        if r["scenario"] == "memory":
            rows.append("%-19s %-7s %d keys: %.0f B RSS/key, %.0f B overhead/key beyond %d B payload%s" % (
                r["scenario"], r["interpreter"], ours["keys"], ours["rss_per_key_bytes"],
                ours["overhead_per_key_bytes"], ours["payload_bytes_per_key"],
                " (node: %.0f B overhead)" % (node["overhead_per_key_bytes"],) if node else ""))
            continue
        if r["scenario"] == "cluster_ratio":
            rows.append("%-19s %-7s 3-node RF=2 PUT / single PUT, alternating: median %.3f (%.3f-%.3f), CPU %.3f"
                        % (r["scenario"], r["interpreter"], ours["ratio_median"], ours["ratio_min"],
                           ours["ratio_max"], ours["cpu_ratio_median"]))
            continue
        if r["scenario"] == "rebalance":
            rows.append("%-19s %-7s %d keys: joiner ready %.1f s, settled %.1f s with %d keys (share ~%d)" % (
                r["scenario"], r["interpreter"], ours["keys"], ours["ready_s"], ours["settled_s"],
                ours["joiner_keys"], ours["joiner_expected_share"]))
            continue
        rows.append("%-19s %-7s %9.0f %8.2f %8.2f %8.2f %7d %8s %9s %7s" % (
            r["scenario"], r["interpreter"], ours["rps"], ours["p50_ms"], ours["p99_ms"], ours["p999_ms"],
            ours["errors"], mb(ours.get("peak_rss_bytes")), "%.0f" % node["rps"] if node else "-",
            "%.2f" % r["ratio_to_node"]["rps"] if node else "-"))
        if r["scenario"] == "latency":
            rows.append("%-19s %-7s  (paced to %.0f of saturating %.0f req/s; -c4: %.0f req/s p99 %.2f ms)" % (
                "", "", ours["target_rps"], ours["saturated"]["rps"], ours["c4"]["rps"], ours["c4"]["p99_ms"]))
        if r["scenario"] == "references":
            webdis = r["results"]["webdis"]
            rows.append("%-19s %-7s  (1000 keys of \"hello world\"; webdis + redis-server %.0f req/s, x webdis %.2f)" % (
                "", "", webdis["rps"], r["ratio_to_webdis"]["rps"]))
        if r["scenario"] == "soak":
            rows.append("%-19s %-7s  soak %s %s" % ("", "", r["verdict"], "; ".join(r["failures"])))
    return "\n".join(rows)


def markdown(results) -> str:
    """The throughput table of the results, in Markdown."""
    by = {(r["scenario"], r["interpreter"]): r for r in results if "results" in r}
    rows = ["| scenario | interpreter | req/s | p50 ms | p99 ms | p99.9 ms | errors | peak RSS MiB | Node.js req/s "
            "| Node.js p99 ms | req/s vs Node |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for scenario in SINGLE + CLUSTER + ["latency", "soak"]:
        for interpreter in ("cpython", "pypy"):
            r = by.get((scenario, interpreter))
            if not r or scenario == "cluster_ratio":
                continue
            ours, node = r["results"]["kvresponder"], r["results"].get("node")
            rows.append("| %s | %s | %.0f%s | %.2f | %.2f | %.2f | %d | %s | %s | %s | %s |" % (
                scenario, interpreter, ours["rps"],
                " (%.0f ops/s)" % (ours["ops_per_s"],) if "ops_per_s" in ours else "",
                ours["p50_ms"], ours["p99_ms"], ours["p999_ms"], ours["errors"], mb(ours.get("peak_rss_bytes")),
                "%.0f" % node["rps"] if node else "", "%.2f" % node["p99_ms"] if node else "",
                "%.2f×" % r["ratio_to_node"]["rps"] if node else ""))
    return "\n".join(rows)


def _stored(scenarios, interpreters) -> list:
    """The result files of ``scenarios`` on ``interpreters`` that exist, in that order."""
    found = []
    for scenario in scenarios:
        for interpreter in interpreters:
            path = os.path.join(b.RESULTS, "%s.%s.json" % (scenario, interpreter))
            if os.path.exists(path):
                with open(path) as f:
                    found.append(json.load(f))
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of unmeasured load first (default: each scenario's own, 15 s for most)")
    p.add_argument("--interpreters", default="cpython,pypy")
    p.add_argument("--scenarios", default=",".join(ALL), help="comma-separated (soak is added by --soak)")
    p.add_argument("--memory-keys", type=int, default=1000000)
    p.add_argument("--rebalance-keys", type=int, default=100000)
    p.add_argument("--soak", type=float, default=0, help="also run the soak for this many seconds")
    p.add_argument("--plot", action="store_true", help="draw docs/performance.png afterwards")
    p.add_argument("--table-only", action="store_true", help="print the table of the existing results")
    p.add_argument("--markdown", action="store_true", help="with --table-only: a Markdown table")
    args = p.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    if args.soak:
        scenarios.append("soak")
    interpreters = args.interpreters.split(",")
    results = []
    for scenario in scenarios:
        for interpreter in interpreters:
            if args.table_only:
                results.extend(_stored([scenario], [interpreter]))
                continue
            results.append(run(scenario, interpreter, args))
    # The summary reflects every result file as it is now: this run's, and the scenarios run before it or on
    # their own (a run of a few scenarios used to leave only those in it).
    summary = {"machine": b.machine(), "results": _stored(ALL + ["soak"], ["cpython", "pypy"])}
    with open(os.path.join(b.RESULTS, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    print(markdown(results) if args.markdown else table(results))
    if args.plot:
        subprocess.run([sys.executable, os.path.join(b.BENCH, "plot.py")], check=False)
    return 1 if any("results" not in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
