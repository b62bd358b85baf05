"""
Soak (issue 6 §5): a 3-node RF=2 cluster with a small MAX_MEMORY under mixed load for a bounded time.

1. fill: 5-second rounds of PUT-only load (4 KiB values, one wrk per node) until every node has evicted, so
   that the store is at its budget from the start of the soak; bounded by --fill-timeout;
2. soak: one wrk per node at once (50% GET / 50% PUT of 4 KiB values over 1M keys) for --duration seconds;
   every --interval seconds each node's RSS, kv_store_bytes and kv_store_max_bytes are sampled.

PASS when: RSS is flat (each node's mean RSS over the last third is within --rss-tolerance of its mean over
the middle third), kv_store_bytes <= kv_store_max_bytes at every sample, no error responses (anything but
200/201/404; a 404 is a key evicted or never written) and no socket errors, and every node is still up.
Writes bench/results/soak.<interpreter>.json; prints PASS or FAIL; exits 1 on FAIL.
"""

import math
import sys
import time

import benchlib as b

NODES = 3
VALUE = 4096
KEYSPACE = 1000000


def metrics(node) -> dict:
    text = b.http_get(node.base + "/metrics").decode()
    wanted = ("kv_store_bytes", "kv_store_max_bytes", "kv_store_keys", "kv_evictions_total")
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def main() -> int:
    p = b.parser("Soak: bounded mixed load on a 3-node cluster with a small MAX_MEMORY.", duration=120.0)
    p.add_argument("--max-memory", default="32Mi", help="each node's MAX_MEMORY (default %(default)s)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default %(default)s)")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth, last vs middle third")
    p.add_argument("--fill-timeout", type=float, default=120.0, help="bound on the fill phase (seconds)")
    p.add_argument("--get-pct", type=int, default=50, help="share of GETs in the load (default %(default)s)")
    args = p.parse_args()
    python = b.interpreter_path(args.interpreter)
    nodes = b.start_cluster(python, NODES, {"REPLICATION_FACTOR": "2", "MAX_MEMORY": args.max_memory})

    began = time.monotonic()
    connections = math.ceil(args.connections / NODES)
    fill_rounds = 0
    while time.monotonic() - began < args.fill_timeout:
        if all(metrics(node).get("kv_evictions_total", 0) > 0 for node in nodes):
            break
        # PUT-only rounds of 5 s on every node at once, over the same key space as the soak.
        fills = [b.Wrk("http://127.0.0.1:%d" % (node.port,), "put", 5, connections=connections, keys=KEYSPACE,
                       value_size=VALUE, timeout="10s") for node in nodes]
        for run in fills:
            run.result()
        fill_rounds += 1
    fill_s = time.monotonic() - began
    filled = all(metrics(node).get("kv_evictions_total", 0) > 0 for node in nodes)

    runs = [b.Wrk("http://127.0.0.1:%d" % (node.port,), "mix", args.duration, connections=connections,
                  script="kv_counted.lua", keys=KEYSPACE, value_size=VALUE, get_pct=args.get_pct,
                  timeout="10s") for node in nodes]
    samples = []
    start = time.monotonic()
    while time.monotonic() - start < args.duration + 0.5 and any(run.process.poll() is None for run in runs):
        sample = {"t": round(time.monotonic() - start, 1), "nodes": []}
        for node in nodes:
            entry = {"node": node.name, "alive": node.alive}
            if node.alive:
                entry["rss_bytes"] = node.rss()
                try:
                    entry.update(metrics(node))
                except OSError as error:
                    entry["metrics_error"] = str(error)
            sample["nodes"].append(entry)
        samples.append(sample)
        time.sleep(args.interval)
    load = b.combine([run.result() for run in runs])

    failures = []
    third = max(len(samples) // 3, 1)
    middle, last = samples[third:2 * third], samples[-third:]
    rss_growth = {}
    for index, node in enumerate(nodes):
        def mean(part):
            values = [s["nodes"][index].get("rss_bytes") for s in part if s["nodes"][index].get("rss_bytes")]
            return sum(values) / len(values) if values else None
        m, l = mean(middle), mean(last)
        rss_growth[node.name] = round(l / m - 1, 4) if m and l else None
        if rss_growth[node.name] is None or rss_growth[node.name] > args.rss_tolerance:
            failures.append("%s RSS grew %s from the middle to the last third" % (node.name, rss_growth[node.name]))
    over = [(s["t"], n["node"], n.get("kv_store_bytes"), n.get("kv_store_max_bytes")) for s in samples
            for n in s["nodes"] if n.get("kv_store_bytes", 0) > n.get("kv_store_max_bytes", math.inf)]
    if over:
        failures.append("kv_store_bytes above kv_store_max_bytes %d times, e.g. %s" % (len(over), over[0]))
    missing = [(s["t"], n["node"]) for s in samples for n in s["nodes"] if "kv_store_bytes" not in n]
    if missing:
        failures.append("%d samples without metrics, e.g. %s" % (len(missing), missing[0]))
    if load["errors"]:
        failures.append("%d error responses or socket errors: %s" % (
            load["errors"], [r["error_detail"] for r in load["per_node"]]))
    if not all(node.alive for node in nodes):
        failures.append("a node died")
    if not filled:
        failures.append("the fill phase did not reach the memory budget on every node in %ss" % (args.fill_timeout,))
    peak = [node.peak_rss() for node in nodes if node.alive]
    for node in nodes:
        node.stop()
    verdict = "FAIL" if failures else "PASS"
    b.finish("soak", args, python, {
        "description": "3 nodes RF=2, MAX_MEMORY=%s, %d%% GET / %d%% PUT of %d-byte values over %d keys"
                       % (args.max_memory, args.get_pct, 100 - args.get_pct, VALUE, KEYSPACE),
        "verdict": verdict, "failures": failures, "fill_s": round(fill_s, 1), "fill_rounds_of_5s": fill_rounds,
        "rss_growth_last_vs_middle_third": rss_growth, "samples": samples,
        "results": {"kvresponder": dict(load, peak_rss_bytes=max(peak) if peak else None)}})
    print("soak: %s%s" % (verdict, "".join("\n  - " + f for f in failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
