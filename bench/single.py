"""
The single-node scenarios: one KV Responder node, then the Node.js reference (bench/node_reference.js), each
preloaded, warmed up and driven by the same wrk command; our numbers are also given as ratios to Node's.
"""

import sys
from typing import NamedTuple

import benchlib as b


class Scenario(NamedTuple):
    mode: str            # the wrk mode (bench/lua/common.lua)
    script: str          # the Lua script
    preload: bool        # load the key space first
    what: str            # what it measures
    batch: int = 100     # operations per bulk request
    keys: int = b.HIT_KEYS  # the key space (and what is preloaded)


SCENARIOS = {
    "get_hit": ("get", "kv.lua", True, "GET of existing keys (10k keys, 100-byte values)"),
    "get_miss": ("miss", "kv_counted.lua", False, "GET of absent keys (404 expected, not an error)"),
    "put": ("put", "kv.lua", True, "PUT of 100-byte values over 10k keys"),
    "mix": ("mix", "kv.lua", True, "90% GET / 10% PUT over 10k keys"),
    "bulk_get": ("bulk_get", "kv.lua", True, "POST /bulk with 100 GETs each (10k keys)"),
    "bulk_put": ("bulk_put", "kv.lua", True, "POST /bulk with 100 PUTs each (100-byte values, 10k keys)"),
    # Issue 18's goal: a 1000-entry bulk PUT at 200k keys/s or more on one node.
    "bulk_put_1000": ("bulk_put", "kv.lua", True, "POST /bulk with 1000 PUTs each (100-byte values, 100k keys)",
                      1000, 100000),
}
SCENARIOS = {name: Scenario(*fields) for name, fields in SCENARIOS.items()}


def measure(target: b.Process, scenario: Scenario, args) -> dict:
    mode = scenario.mode
    target.wait_ready()
    if scenario.preload:
        b.bulk_load(target.base, scenario.keys)
    url = "http://127.0.0.1:%d" % (target.port,)
    options = dict(connections=args.connections, threads=args.threads, script=scenario.script,
                   batch=scenario.batch, keys=scenario.keys)
    if args.warmup > 0:
        b.run_wrk(url, mode, args.warmup, **options)
    cpu_before = target.cpu_seconds()
    result = b.run_wrk(url, mode, args.duration, **options)
    # The server's CPU time per request: steadier than req/s on a shared machine.
    result["cpu_us_per_request"] = round((target.cpu_seconds() - cpu_before) * 1e6 / max(result["requests"], 1), 1)
    if mode.startswith("bulk"):
        result["batch"] = scenario.batch
        result["keys"] = scenario.keys
        result["ops_per_s"] = round(result["rps"] * scenario.batch, 1)
        # The server's CPU time per operation (per key): what a batch costs, divided by its size.
        result["cpu_us_per_op"] = round(result["cpu_us_per_request"] / scenario.batch, 3)
    result["peak_rss_bytes"] = target.peak_rss()
    result["rss_bytes"] = target.rss()
    target.stop()
    return result


def main(scenario: str) -> dict:
    chosen = SCENARIOS[scenario]
    what = chosen.what
    # 15 s of warm-up, as for the clusters: on PyPy the request path can still be compiling after 5 s
    # (bench/results/HISTORY.md, run 8, "Warm-up").
    p = b.parser("Single node: %s." % (what,), warmup=15.0)
    p.add_argument("--no-node", action="store_true", help="skip the Node.js reference run")
    args = p.parse_args()
    python = b.interpreter_path(args.interpreter)
    results = {"kvresponder": measure(b.start_node(python), chosen, args)}
    data = {"description": what, "results": results}
    if not args.no_node:
        results["node"] = measure(b.start_node_reference(), chosen, args)
        data["ratio_to_node"] = {
            "rps": b.ratio(results["kvresponder"]["rps"], results["node"]["rps"]),
            "p99": b.ratio(results["kvresponder"]["p99_ms"], results["node"]["p99_ms"]),
        }
    return b.finish(scenario, args, python, data)


if __name__ == "__main__":
    main(sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in SCENARIOS else sys.exit("usage: single.py SCENARIO"))
