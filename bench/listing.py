"""
A listing page's cost while writes go on, in one process: the real :class:`~kvresponder.store.Store`.

The store holds ``--keys`` keys. Each round applies ``--writes`` writes (overwrites, with ``--new`` of them new
keys and as many deletes), then lists one page of 100 keys from a random place. The reference, in the same
run: the same page over a full sort of every key, which is what a listing did after any change before the
order was kept across changes (:mod:`kvresponder.keyindex`).

    python3 bench/listing.py
    /var/cache/kv-pypy311/python bench/listing.py --keys 500000

It prints the median time of a page each way, and their ratio.
"""

import argparse
import os
import random
import statistics
import sys
import time
from bisect import bisect_right

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from kvresponder.store import Entry, Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--keys", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--new", type=int, default=20, help="new keys (and deletes) among each round's writes")
    args = parser.parse_args()

    clock = Clock()
    clock.advance(1_700_000_000)
    store = Store(clock.seconds, 1 << 40)
    rng = random.Random(7)
    wall = 0
    for index in range(args.keys):
        wall += 1
        store.apply(Entry("key-%08d" % (index,), b'"v"', (wall, 0, "n1")))
    next_key = args.keys
    kept, full = [], []
    for _ in range(args.rounds):
        for _ in range(args.writes - 2 * args.new):
            wall += 1
            store.apply(Entry("key-%08d" % (rng.randrange(next_key),), b'"w"', (wall, 0, "n1")))
        for _ in range(args.new):
            wall += 1
            store.apply(Entry("key-%08d" % (next_key,), b'"n"', (wall, 0, "n1")))
            next_key += 1
            wall += 1
            store.apply(Entry("key-%08d" % (rng.randrange(next_key),), None, (wall, 0, "n1")))
        after = "key-%08d" % (rng.randrange(next_key),)
        started = time.perf_counter()
        page = store.keys(after=after, limit=100)
        kept.append(time.perf_counter() - started)
        started = time.perf_counter()
        ordered = sorted(store._live_keys())
        start = bisect_right(ordered, after.encode())
        reference = [key.decode() for key in ordered[start:start + 100]]
        full.append(time.perf_counter() - started)
        assert page == reference, (page[:3], reference[:3])
    # The first page sorts every key either way.
    kept_ms, full_ms = statistics.median(kept[1:]) * 1e3, statistics.median(full[1:]) * 1e3
    print("%s, %d keys, %d writes a page (%d new, %d deletes)" % (
        sys.implementation.name, args.keys, args.writes, args.new, args.new))
    print("page, order kept across changes: %.3f ms (median)" % (kept_ms,))
    print("page, every key sorted (reference): %.3f ms (median)" % (full_ms,))
    print("ratio: %.4f" % (kept_ms / full_ms,))


if __name__ == "__main__":
    main()
