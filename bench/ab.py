"""
Two variants of the 3-node RF=2 write path, side by side in one run: A (a git revision, or this work tree) and B
(this work tree), each with environment variables of its own. For a change whose effect is smaller than what
the VM's speed does between two runs.

Four clusters start in the order A, B, B, A, after an idle decoy node: on this VM, the first node a run starts
is slower than those after it, and a later one can still be a few percent faster or slower than another
(bench/results/HISTORY.md, run 17). So each variant runs twice, once early and once late. Each coordinator is
pinned as in ``cluster_ratio`` (a CPU of its own; the replicas and wrk on the rest). Windows of PUT load
through each coordinator go round the four clusters, in reverse on every other round, ``--gap`` seconds apart.

The result is each variant's rate and coordinator CPU a write, as the mean of its two clusters' medians, and B
over A. Each cluster's own medians show how far apart the two clusters of one variant were: that is the noise.

    python3 bench/ab.py --base HEAD~1                        # the last commit's effect
    python3 bench/ab.py --b-env REPLICATION_STREAM=false     # a setting's effect, same code
"""

import importlib.util
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import benchlib as b
from cluster_ratio import measure, pin

NODES = 3


def resolve(revision: str):
    """
    ``revision`` as a short commit hash, or ``None`` if it names no commit here: resolved once, before a run, so
    that a commit made while it runs changes neither the code measured nor what the result file records.
    """
    found = subprocess.run(["git", "-C", b.REPO, "rev-parse", "--verify", "--quiet", "--short", revision + "^{commit}"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def variant_lib(revision):
    """
    ``(benchlib, worktree)``: a benchlib whose nodes run ``revision``'s code, from a worktree made for it;
    this work tree's own (and no worktree) for ``None``.
    """
    if revision is None:
        return b, None
    worktree = tempfile.mkdtemp(prefix="kv-ab-")
    os.rmdir(worktree)
    subprocess.run(["git", "-C", b.REPO, "worktree", "add", "--detach", "--quiet", worktree, revision], check=True)
    try:
        spec = importlib.util.spec_from_file_location("benchlib_ab_base",
                                                      os.path.join(worktree, "bench", "benchlib.py"))
        lib = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lib)
    except BaseException:
        remove_worktree(worktree)
        raise
    return lib, worktree


def remove_worktree(worktree):
    subprocess.run(["git", "-C", b.REPO, "worktree", "remove", "--force", worktree], check=False)
    shutil.rmtree(worktree, ignore_errors=True)


def _env(pairs):
    env = {"REPLICATION_FACTOR": "2"}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit("not NAME=VALUE: %r" % (pair,))
        env[name] = value
    return env


def _window(coordinator, seconds, options) -> dict:
    """
    PUT load through ``coordinator`` for ``seconds``, measured as ``cluster_ratio`` measures a window.
    """
    measured = measure(coordinator, None, [], seconds, *options)
    return {"rps": measured["rps"], "p99_ms": measured["p99_ms"], "errors": measured["errors"],
            "coordinator_us": measured["cpu_us_per_request"]}


def schedule(clusters: int, rounds: int):
    """
    The order of the windows: every cluster once a round, forwards, then backwards, so that each cluster's mean
    place in the run is the same.
    """
    order = []
    for index in range(rounds):
        order.extend(range(clusters) if index % 2 == 0 else reversed(range(clusters)))
    return order


def main() -> dict:
    p = b.parser("Two variants of the 3-node write path side by side, each in two clusters.", warmup=15.0)
    p.add_argument("--base", help="A's git revision (default: this work tree, for a comparison of settings)")
    p.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE", help="a variable for A's nodes")
    p.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE", help="a variable for B's nodes")
    p.add_argument("--rounds", type=int, default=3, help="windows of each cluster (default %(default)s)")
    p.add_argument("--gap", type=float, default=5.0, help="seconds of no load before each window")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    base = None if args.base is None else resolve(args.base)
    if args.base is not None and base is None:
        p.error("--base: no commit %r in %s" % (args.base, b.REPO))
    python = b.interpreter_path(args.interpreter)
    envs = {"A": _env(args.a_env), "B": _env(args.b_env)}
    libs = {"B": b}
    worktree = None
    clusters = []
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        libs["A"], worktree = variant_lib(base)
        decoy = b.start_node(python, "decoy")
        decoy.wait_ready()
        for label in ("A", "B", "B", "A"):
            nodes = libs[label].start_loaded_cluster(python, NODES, b.HIT_KEYS, envs[label])
            clusters.append((label, nodes))
        pinning = pin([nodes[0] for _, nodes in clusters], [node for _, nodes in clusters for node in nodes[1:]])
        options = (args.connections, args.threads)
        for _, nodes in clusters:
            _window(nodes[0], args.warmup, options)
        windows = [[] for _ in clusters]
        for index in schedule(len(clusters), args.rounds):
            time.sleep(args.gap)
            windows[index].append(_window(clusters[index][1][0], args.duration, options))
    finally:
        for lib in {id(lib): lib for lib in libs.values()}.values():
            lib.stop_all()
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        if worktree is not None:
            remove_worktree(worktree)
    per_cluster = [{"variant": label, "started": place + 1,
                    "rps_median": statistics.median(w["rps"] for w in windows[place]),
                    "coordinator_us_median": statistics.median(w["coordinator_us"] for w in windows[place]),
                    "windows": windows[place]}
                   for place, (label, _) in enumerate(clusters)]
    # A variant's figure is the mean of its two clusters' medians: with the clusters started A, B, B, A, a drift
    # with the start order weighs the same on both (a median over the pooled windows would pick whichever
    # cluster's windows fall in the middle).
    variants = {}
    for label in ("A", "B"):
        mine = [cluster for cluster in per_cluster if cluster["variant"] == label]
        variants[label] = {"rps": round(statistics.mean(c["rps_median"] for c in mine), 1),
                           "coordinator_us": round(statistics.mean(c["coordinator_us_median"] for c in mine), 2),
                           "errors": sum(w["errors"] for c in mine for w in c["windows"])}
    result = {
        "variants": variants,
        "clusters": per_cluster,
        "b_over_a_rps": round(variants["B"]["rps"] / variants["A"]["rps"], 3),
        "b_over_a_coordinator_us": round(variants["B"]["coordinator_us"] / variants["A"]["coordinator_us"], 3),
    }
    return b.finish("ab", args, python, {
        "description": "3 nodes RF=2 PUT through one node: variant B against A, two clusters each",
        "base": base, "a_env": args.a_env, "b_env": args.b_env, "rounds": args.rounds, "gap_s": args.gap,
        "pinning": pinning, "results": {"kvresponder": result}})


if __name__ == "__main__":
    main()
