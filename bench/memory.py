"""
Memory per key: one node (MAX_MEMORY large enough to hold everything), N keys of 100-byte values written
through POST /bulk; RSS before and after. Overhead per key = (RSS after - RSS before) / N - (key + value bytes); the marginal overhead is the slope of
RSS over keys (read after each tenth of the load, from the first tenth on) less the payload.
The Node.js reference does the same, for comparison.
"""

import time

import benchlib as b

KEY_WIDTH = 10  # keys "m000000001": 10 bytes each, so the payload is exactly 110 bytes per key


def key(i: int) -> str:
    return "m%0*d" % (KEY_WIDTH - 1, i)


def slope(points) -> float:
    """The least-squares slope of ``[(x, y), ...]``."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    return (sum((x - mean_x) * (y - mean_y) for x, y in points)
            / sum((x - mean_x) ** 2 for x, _ in points))


def measure(target: b.Process, keys: int, batch: int, settle: float, steps: int) -> dict:
    target.wait_ready()
    # A few requests first, so that the "before" includes the code paths' own warm state.
    b.bulk_load(target.base, 1000, batch=100, name=lambda i: "warm%d" % (i,))
    time.sleep(settle)
    before = target.rss()
    # The load in equal steps, RSS read after each: the slope of RSS over keys is the cost of one more key,
    # apart from what the process pays once as it first grows (PyPy touches its nursery and compiles the
    # load path; allocators grow their arenas).
    samples = [(0, before)]
    seconds = 0.0
    step = keys // steps
    for index in range(steps):
        count = step if index < steps - 1 else keys - step * (steps - 1)
        seconds += b.bulk_load(target.base, count, batch=batch, start=index * step, name=key)
        samples.append((index * step + count, target.rss()))
    time.sleep(settle)
    after = target.rss()
    payload = KEY_WIDTH + b.VALUE_SIZE
    # From the end of the first step on (past the one-off growth) to the settled end, which stands in for the
    # last step's own reading.
    marginal = slope(samples[1:-1] + [(keys, after)])
    result = {
        "keys": keys,
        "payload_bytes_per_key": payload,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_samples": [{"keys": count, "rss_bytes": rss} for count, rss in samples],
        "peak_rss_bytes": target.peak_rss(),
        "rss_per_key_bytes": round((after - before) / keys, 1),
        "overhead_per_key_bytes": round((after - before) / keys - payload, 1),
        "marginal_overhead_per_key_bytes": round(marginal - payload, 1),
        "load_seconds": round(seconds, 2),
        "load_keys_per_s": round(keys / seconds, 1),
    }
    if target.name != "node-ref":
        result["kv_store_keys"] = target.metric("kv_store_keys")
        result["kv_store_bytes"] = target.metric("kv_store_bytes")
        result["store_accounted_bytes_per_key"] = round(result["kv_store_bytes"] / max(result["kv_store_keys"], 1), 1)
    target.stop()
    return result


def main() -> dict:
    p = b.parser("Memory per key: N keys of 100-byte values via POST /bulk.")
    p.add_argument("--keys", type=int, default=1000000, help="keys written (default %(default)s)")
    p.add_argument("--batch", type=int, default=1000, help="puts per bulk request (default %(default)s)")
    p.add_argument("--settle", type=float, default=4.0,
                   help="seconds to wait before reading RSS (default %(default)s: the node gives back what a "
                        "burst of writes left behind once its store has been left alone for 2 s)")
    p.add_argument("--steps", type=int, default=10, help="RSS samples during the load (default %(default)s)")
    p.add_argument("--no-node", action="store_true", help="skip the Node.js reference run")
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps must be at least 3: the slope is fitted from the end of the first step on")
    python = b.interpreter_path(args.interpreter)
    results = {"kvresponder": measure(b.start_node(python, env={"MAX_MEMORY": "4Gi", "MAX_VALUE_SIZE": "4Mi"}),
                                      args.keys, args.batch, args.settle, args.steps)}
    if not args.no_node:
        results["node"] = measure(b.start_node_reference(), args.keys, args.batch, args.settle, args.steps)
    return b.finish("memory", args, python, {"description": "RSS per key, %d keys of %d-byte values"
                                             % (args.keys, b.VALUE_SIZE), "results": results})


if __name__ == "__main__":
    main()
