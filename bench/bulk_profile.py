"""
Where a 1000-put POST /bulk spends its time, in one process: requests go through the tests' in-memory client
(StubTreq, tests/test_api.py's ``API``) into the node's real Site and resource tree, with no socket and no
wrk, so the figures hold still on a busy machine. For rates and CPU per key on a real node, run
bench/bulk_put_1000.py.

    python3 bench/bulk_profile.py time          # µs per request and per key (either interpreter)
    python3 bench/bulk_profile.py sections      # time in each stage: JSON, parse, stamp and store
    python3 bench/bulk_profile.py cprofile      # CPython: cProfile's top entries
    /var/cache/kv-pypy311/python bench/bulk_profile.py vmprof   # PyPy: vmprof's top entries (pip install vmprof)

REQUESTS (default 300) sets the requests per pass; each mode warms up with one pass first.
"""

import json
import os
import random
import sys
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.test_api import API  # noqa: E402

import kvresponder.coordinator as coordinator_module  # noqa: E402
import kvresponder.http.api as api_module  # noqa: E402
import kvresponder.store as store_module  # noqa: E402

REQUESTS = int(os.environ.get("REQUESTS", "300"))
BATCH = 1000
KEYS = 100000
HEADERS = {"Content-Type": "application/json"}


def bodies(count: int = 50):
    """Bodies as bulk_put_1000 sends them: 1000 puts of 100-byte values over random keys of 100k."""
    rng = random.Random(1)
    value = "v" * 98
    return [json.dumps({"put": [{"key": "k%d" % rng.randrange(KEYS), "value": value} for _ in range(BATCH)]})
            .encode() for _ in range(count)]


class Bench:
    def __init__(self) -> None:
        self.api = API()
        self.bodies = bodies()

    def run(self, requests: int) -> float:
        """Seconds per request."""
        began = time.perf_counter()
        for i in range(requests):
            response, content = self.api.raw("POST", "/t1/bulk", self.bodies[i % len(self.bodies)], HEADERS)
            if response.code != 200:
                raise RuntimeError(content[:300])
        return (time.perf_counter() - began) / requests


def timed(bench: Bench) -> None:
    for _ in range(3):
        per = bench.run(REQUESTS)
        print("%8.1f µs a request  %6.3f µs a key" % (per * 1e6, per * 1e6 / BATCH))


def sections(bench: Bench) -> None:
    spent = defaultdict(float)
    labels = []

    def wrap(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed_call(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - began
        setattr(owner, name, timed_call)
        labels.append(label)

    wrap(api_module, "parse_json_body", "JSON decoding of the body")
    wrap(api_module, "parse_bulk_put", "parse of each put (timer included)")
    wrap(coordinator_module.Coordinator, "put_many", "put_many: stamp, write")
    wrap(coordinator_module.Coordinator, "apply_batch", "  of which apply_batch")
    wrap(store_module.Store, "apply_many", "    of which Store.apply_many")
    spent.clear()
    total = bench.run(REQUESTS) * REQUESTS
    for label in labels:
        print("%-40s %8.1f µs a request" % (label, spent[label] / REQUESTS * 1e6))
    print("%-40s %8.1f µs a request" % ("whole request (in-memory client too)", total / REQUESTS * 1e6))


def cprofile(bench: Bench) -> None:
    import cProfile
    import pstats
    profile = cProfile.Profile()
    profile.enable()
    bench.run(REQUESTS)
    profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def vmprofile(bench: Bench) -> None:
    import tempfile

    import vmprof
    with tempfile.TemporaryFile() as out:
        vmprof.enable(out.fileno(), period=0.0005)
        bench.run(REQUESTS)
        vmprof.disable()
        out.flush()
        tree = vmprof.read_profile(out).get_tree()
    own, within = Counter(), Counter()

    def walk(node, stack) -> None:
        parts = node.name.split(":")
        name = "%s (%s)" % (parts[1], parts[-1].rsplit("/", 1)[-1]) if len(parts) >= 4 else node.name
        if name not in stack:
            within[name] += node.count
        own[name] += node.count - sum(child.count for child in node.children.values())
        for child in node.children.values():
            walk(child, stack | {name})
    walk(tree, frozenset())
    print("%d samples" % (tree.count,))
    for name, count in own.most_common(25):
        print("self   %5.1f%% %s" % (100.0 * count / tree.count, name))
    for name, count in within.most_common(60):
        print("within %5.1f%% %s" % (100.0 * count / tree.count, name))


MODES = {"time": timed, "sections": sections, "cprofile": cprofile, "vmprof": vmprofile}

if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "time"
    if mode not in MODES:
        sys.exit("usage: bulk_profile.py [%s]" % ("|".join(MODES),))
    bench = Bench()
    bench.run(REQUESTS)  # warm-up (PyPy compiles the path)
    MODES[mode](bench)
