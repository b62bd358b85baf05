"""
The coordinator's CPU a write by the keys written: keys it owns (its own copy and one remote), keys it does not
(two remote copies), all keys; and a single node's PUT, in alternating windows of one run, pinned as
``cluster_ratio`` pins (the single node and the coordinator on the first CPU). PyPy.

    python3 bench/results/run31/ownmix.py [rounds]     # from the repository's root; writes ownmix.json here
"""
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)
import benchlib as b  # noqa: E402
import cluster_ratio as cr  # noqa: E402
from kvresponder.ring import HashRing  # noqa: E402

KINDS = ("single", "all", "owned", "other")


def key_files() -> None:
    """The 10k keys split by whether the coordinator (n1) is among their two owners on the 3-node ring."""
    ring = HashRing(["n1", "n2", "n3"])
    owned, other = [], []
    for i in range(b.HIT_KEYS):
        key = b.key_name(i)
        (owned if "n1" in ring.preference_list(key, 2) else other).append(key)
    for name, keys in (("owned", owned), ("other", other), ("all", owned + other)):
        with open(os.path.join(b.log_dir(), "keys.%s" % name), "w") as out:
            out.write("\n".join(keys) + "\n")


def window(node, watched, keys: str, seconds: float = 10) -> dict:
    """PUT load through ``node`` over the key file ``keys``; the CPU a request of each of ``watched``."""
    before = [member.cpu_seconds() for member in watched]
    out = subprocess.run(["wrk", "-t1", "-c32", "-d%ds" % seconds, "--timeout", "5s",
                          "-s", os.path.join(HERE, "keys.lua"), "http://127.0.0.1:%d" % node.port, "--",
                          b.TENANT, os.path.join(b.log_dir(), "keys.%s" % keys)],
                         capture_output=True, text=True).stdout
    line = [text for text in out.splitlines() if text.startswith("RESULT")][0].split()
    requests, duration, errors = int(line[1]), int(line[2]) / 1e6, int(line[3])
    cpu = [round((member.cpu_seconds() - start) * 1e6 / requests, 1) for member, start in zip(watched, before)]
    return {"rps": round(requests / duration), "cpu": cpu, "errors": errors}


def main(rounds: int) -> None:
    key_files()
    python = b.interpreter_path("pypy")
    decoy = b.start_node(python, "decoy")
    decoy.wait_ready()
    single = b.start_node(python, "s1", env={"REPLICATION_FACTOR": "2"})
    single.wait_ready()
    b.bulk_load(single.base, b.HIT_KEYS)
    cluster = b.start_loaded_cluster(python, 3, b.HIT_KEYS, {"REPLICATION_FACTOR": "2"})
    try:
        cr.pin([single, cluster[0]], cluster[1:])
        window(single, [single], "all", 15)
        window(cluster[0], cluster, "all", 15)
        results = []
        for _ in range(rounds):
            for kind in KINDS:
                time.sleep(3)
                measured = window(single, [single], "all") if kind == "single" else window(cluster[0], cluster, kind)
                measured["kind"] = kind
                print(json.dumps(measured), flush=True)
                results.append(measured)
        summaries = []
        for kind in KINDS:
            of_kind = [w for w in results if w["kind"] == kind]
            summary = {"kind": kind, "rps": statistics.median(w["rps"] for w in of_kind),
                       "measured_us": statistics.median(w["cpu"][0] for w in of_kind),
                       "replicas_us": (statistics.median(sum(w["cpu"][1:]) for w in of_kind)
                                       if kind != "single" else None)}
            print(json.dumps(summary))
            summaries.append(summary)
        with open(os.path.join(HERE, "ownmix.json"), "w") as out:
            json.dump({"git_head": b.git_head(), "interpreter_version": b.interpreter_version(python),
                       "windows": results, "medians": summaries}, out, indent=1)
    finally:
        for node in cluster + [single, decoy]:
            node.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
