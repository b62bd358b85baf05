"""
Latency below saturation, single node, 90/10 GET/PUT mix:

1. saturate: wrk -c<C> as fast as it can go; its rate is the saturating rate R;
2. paced: the same C connections, each pausing between requests (wrk's delay() hook, bench/lua/kv_paced.lua)
   so that the total is about R/2; the rate actually reached is reported;
3. few connections: wrk -c4 (the issue's suggested approximation).

wrk is not wrk2: it measures latency from when a request is sent, so a stall delays the following requests
instead of counting against them (coordinated omission). The percentiles here are therefore optimistic.
"""

import benchlib as b


def main() -> dict:
    p = b.parser("Latency at half the saturating rate (90/10 mix, single node).")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the saturating rate (default %(default)s)")
    args = p.parse_args()
    python = b.interpreter_path(args.interpreter)
    node = b.start_node(python)
    node.wait_ready()
    b.bulk_load(node.base, b.HIT_KEYS)
    url = "http://127.0.0.1:%d" % (node.port,)
    if args.warmup > 0:
        b.run_wrk(url, "mix", args.warmup, connections=args.connections)
    saturated = b.run_wrk(url, "mix", args.duration, connections=args.connections, script="kv_counted.lua")
    target = saturated["rps"] * args.fraction
    # Each connection: one request per (delay + latency); the latency at this load is about p50.
    delay_ms = max(args.connections * 1000.0 / target - saturated["p50_ms"] * args.fraction, 0.0)
    paced = b.run_wrk(url, "mix", args.duration, connections=args.connections, script="kv_paced.lua",
                      delay_ms=round(delay_ms, 3))
    paced["target_rps"] = round(target, 1)
    paced["delay_ms"] = round(delay_ms, 3)
    few = b.run_wrk(url, "mix", args.duration, connections=4, script="kv_counted.lua")
    few["share_of_saturating_rps"] = b.ratio(few["rps"], saturated["rps"])
    peak = node.peak_rss()
    node.stop()
    return b.finish("latency", args, python, {
        "description": "p99 below saturation: paced at %.0f%% of the saturating rate, and with 4 connections"
                       % (args.fraction * 100,),
        "results": {"kvresponder": dict(paced, saturated=saturated, c4=few, peak_rss_bytes=peak)}})


if __name__ == "__main__":
    main()
