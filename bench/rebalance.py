"""
Rebalancing: N keys (default 100k) in a 2-node RF=2 cluster (so each node holds all of them), then a third
node starts. Timed from its start: until its /health/ready answers 200, and until its kv_store_keys stops
changing (unchanged for --stable seconds); the time reported for the latter is when it last changed.
With RF=2 over 3 nodes, its share is about 2/3 of the keys.
"""

import time

import benchlib as b


def main() -> dict:
    p = b.parser("Rebalancing: a third node joins a 2-node cluster holding N keys.")
    p.add_argument("--keys", type=int, default=100000, help="keys loaded first (default %(default)s)")
    p.add_argument("--stable", type=float, default=3.0, help="seconds without change that count as settled")
    p.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds")
    args = p.parse_args()
    python = b.interpreter_path(args.interpreter)
    env = b.with_secret({"REPLICATION_FACTOR": "2", "MAX_MEMORY": "1Gi"})
    # Loading through a 2-node cluster is slower (bench/results/HISTORY.md, "Method"), so the keys go into the
    # first node alone, and the second node joins and takes its
    # copies (with RF=2 over 2 nodes, all of them). The state is the same: 2 nodes holding every key twice.
    discovery = b.free_port(b.socket.SOCK_DGRAM)
    nodes = [b.start_node(python, "n1", discovery, env)]
    nodes[0].wait_ready()
    load_s = b.bulk_load(nodes[0].base, args.keys, batch=1000, workers=2)
    began = time.monotonic()
    nodes.append(b.start_node(python, "n2", discovery, env))
    nodes[1].wait_ready(args.timeout)
    b.wait_formed(nodes)
    b.wait_keys(nodes[1:], args.keys, args.timeout)
    second_join_s = time.monotonic() - began
    began = time.monotonic()
    joiner = b.start_node(python, "n3", discovery, env)
    ready_s = None
    last_keys, last_change = None, None
    samples = []
    while time.monotonic() - began < args.timeout:
        now = time.monotonic() - began
        if ready_s is None and b.http_status(joiner.base + "/health/ready", timeout=1) == 200:
            ready_s = now
        try:
            keys = joiner.metric("kv_store_keys")
        except (OSError, KeyError):
            keys = None
        if keys is not None:
            samples.append((round(now, 2), keys))
            if keys != last_keys:
                last_keys, last_change = keys, now
            elif ready_s is not None and keys > 0 and now - last_change >= args.stable:
                break
        time.sleep(0.1)
    else:
        raise SystemExit("the joining node did not settle in %ss" % (args.timeout,))
    counts = [node.metric("kv_store_keys") for node in nodes + [joiner]]
    expected = args.keys * 2 / 3
    result = {
        "keys": args.keys,
        "preload_s": round(load_s, 2),
        "second_node_join_s": round(second_join_s, 2),
        "ready_s": round(ready_s, 2),
        "settled_s": round(max(last_change, ready_s), 2),
        "joiner_keys": last_keys,
        "joiner_expected_share": round(expected),
        "keys_per_node_after": counts,
        "peak_rss_bytes": max(node.peak_rss() for node in nodes + [joiner]),
        "samples": samples[::5],
    }
    for node in nodes + [joiner]:
        node.stop()
    return b.finish("rebalance", args, python, {"description": "third node joins 2 nodes holding %d keys"
                                                % (args.keys,), "results": {"kvresponder": result}})


if __name__ == "__main__":
    main()
