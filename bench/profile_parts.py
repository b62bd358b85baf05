"""
The parts of a single node's PUT time, by vmprof (PyPy): the share of the samples under the reactor's main loop
that each part of the code spent itself, by the file of the function sampled. What docs/PERFORMANCE.md's "Where
a write's time goes" table shows.

    /var/cache/kv-pypy311/python -m pip install vmprof           # once, into the PyPy venv
    python3 bench/profile_parts.py                                        # this work tree's code, on PyPy
    python3 bench/profile_parts.py --base eef4a6a                         # another revision's, from a git worktree
                                                                          # (writes profile_put-<commit>.pypy.json)
    python3 bench/profile_parts.py --read put.prof [more.prof ...]        # profiles recorded before (--profile)

A recording runs ``bench/put.py``'s load (10k keys preloaded, 15 s of warm-up, 10 s measured) against one node
started under vmprof, then reads the profile, which covers the warm-up too. A system call's time shows as the
time of the Python function that made it, so ``sendnow.py`` and Twisted's ``tcp.py`` stand for the sockets'
``send`` and ``recv``. vmprof is asked for a sample every 0.5 ms; the profiles PyPy writes hold about one every
4 ms of CPU (some 6,000 for a run), so read the shares, not the counts.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections import Counter

import benchlib as b

#: Each part, and the paths (substrings of a sampled function's file) that belong to it, in the order they are
#: tried: the first match wins.
PARTS = [
    ("the answer's send and the request's recv (system calls)", ["kvresponder/sendnow.py", "twisted/internet/tcp.py"]),
    ("Twisted's HTTP server and Klein", ["twisted/web/", "twisted/protocols/", "klein/", "werkzeug/"]),
    ("the fast lane and the kv routes", ["kvresponder/http/"]),
    ("logging (Eliot, the line's encoding, the task id, buffering)", ["kvresponder/log/", "eliot/"]),
    ("JSON", ["/json/"]),
    ("the store and the clock", ["kvresponder/store.py", "kvresponder/hlc.py"]),
    ("the reactor loop", ["twisted/internet/epollreactor.py", "twisted/internet/base.py",
                          "twisted/internet/posixbase.py", "twisted/python/log.py", "twisted/python/context.py"]),
]
OTHER = "everything else"


def part_of(path: str) -> str:
    for name, patterns in PARTS:
        if any(pattern in path for pattern in patterns):
            return name
    return OTHER


def _main_loop(node):
    """
    The profile's ``mainLoop`` node (samples before the reactor ran, start-up, are left out), or ``None``.
    """
    stack = [node]
    while stack:
        current = stack.pop()
        if "py:mainLoop:" in current.name:
            return current
        stack.extend(current.children.values())
    return None


def parts(path: str) -> dict:
    """
    ``{part: share}`` of the samples under the main loop of the vmprof profile at ``path``, and their count.
    """
    import vmprof

    tree = vmprof.read_profile(path).get_tree()
    root = _main_loop(tree) or tree
    own: Counter = Counter()
    stack = [root]
    while stack:
        node = stack.pop()
        fields = node.name.split(":")
        filename = fields[-1] if len(fields) >= 4 else node.name
        own[part_of(filename)] += node.count - sum(child.count for child in node.children.values())
        stack.extend(node.children.values())
    total = max(root.count, 1)
    return {"samples": root.count,
            "shares": {name: round(own[name] * 100.0 / total, 1) for name in [p for p, _ in PARTS] + [OTHER]}}


#: twistd, under vmprof writing to ``$KV_PROFILE_OUT`` until the process exits.
PROFILED_TWISTD = ("import atexit, os, sys, vmprof; out = open(os.environ['KV_PROFILE_OUT'], 'w+b'); "
                   "vmprof.enable(out.fileno(), period=0.0005); atexit.register(vmprof.disable); "
                   "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()")


def record(python: str, lib, profile: str, args) -> dict:
    """
    ``bench/put.py``'s load against one node under vmprof writing to ``profile``, started by ``lib`` (this work
    tree's benchlib, or a worktree's: the node runs that tree's code, from its directory): the load's
    measurements.
    """
    import single

    port = lib.free_port()
    settings = lib.with_secret({"HEARTBEAT_INTERVAL": "0.5", "KV_PROFILE_OUT": profile,
                                "LOG_FILE": os.path.join(lib.log_dir(), "profiled-%d.eliot.log" % (port,))})
    command = [python, "-c", PROFILED_TWISTD, "-n", "--pidfile=", "kvresponder", "--tenant", lib.TENANT,
               "--port", str(port), "--node-id", "n1", "--discovery-port", str(lib.free_port(socket.SOCK_DGRAM))]
    node = lib.Process("profiled", command, lib.node_env(settings), port, "http://127.0.0.1:%d/%s" % (port, lib.TENANT))
    node.eliot_log = settings["LOG_FILE"]
    try:
        # measure() stops the node, by SIGTERM: vmprof writes the rest of the profile as the process exits.
        return single.measure(node, single.SCENARIOS["put"], args)
    finally:
        lib.stop_all()


def _table(results: dict) -> None:
    names = [p for p, _ in PARTS] + [OTHER]
    print("| | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        print("| %s | %s |" % (name, " | ".join("%.0f %%" % result["shares"][name] for result in results.values())))
    print("| samples | %s |" % (" | ".join(str(result["samples"]) for result in results.values()),))


def _read(python: str, paths) -> list:
    """
    :func:`parts` of each profile, read by ``python`` (the interpreter that wrote them, where vmprof is installed).
    The profiles are read from copies under the system's temporary directory, which PyPy's wrapper
    (.ci/setup-pypy.sh) shares with its root, as it does not share every host path.
    """
    directory = tempfile.mkdtemp(prefix="kv-profile-read-")
    try:
        copies = []
        for index, path in enumerate(paths):
            copies.append(os.path.join(directory, "%d.prof" % (index,)))
            shutil.copyfile(path, copies[-1])
        read = subprocess.run([python, os.path.abspath(__file__), "--read-json"] + copies, capture_output=True,
                              text=True, cwd=b.REPO)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if read.returncode != 0:
        raise SystemExit("reading the profiles failed:\n" + read.stderr)
    found = json.loads(read.stdout)
    return found if len(paths) > 1 else [found]


def _code() -> str:
    """
    This work tree's commit, marked ``-dirty`` if it has changes: the code a default run profiles.
    """
    return subprocess.run(["git", "-C", b.REPO, "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                          text=True, check=True).stdout.strip()


def main() -> None:
    p = b.parser("The share of a single node's PUT time in each part of the code, by vmprof.", warmup=15.0)
    p.set_defaults(interpreter="pypy")
    p.add_argument("--base", help="profile this git revision's code (from a worktree) instead of the work tree's; "
                                  "the result goes to profile_put-<commit>.<interpreter>.json unless --out says")
    p.add_argument("--profile", help="keep the recorded vmprof profile at this path (by default it is removed)")
    p.add_argument("--read", nargs="+", metavar="PROFILE", help="only read these vmprof profiles, and print a table")
    args = p.parse_args()
    if args.read and (args.base or args.profile):
        p.error("--read reads profiles recorded before: it takes no --base or --profile")
    python = b.interpreter_path(args.interpreter)
    if subprocess.run([python, "-c", "import vmprof"], capture_output=True).returncode != 0:
        p.error("vmprof is not installed for %s: %s -m pip install vmprof" % (args.interpreter, python))
    if args.read:
        _table(dict(zip(args.read, _read(python, args.read))))
        return
    from ab import remove_worktree, resolve, variant_lib

    base = None if args.base is None else resolve(args.base)
    if args.base is not None and base is None:
        p.error("--base: no commit %r in %s" % (args.base, b.REPO))
    if base is not None and not args.out:
        # Not the file of this tree's code, which PERFORMANCE.md cites.
        args.out = os.path.join(b.RESULTS, "profile_put-%s.%s.json" % (base, args.interpreter))
    code = base or _code()
    worktree = None
    # Recorded under the temporary directory, which PyPy's wrapper shares with the host; copied to --profile after.
    directory = tempfile.mkdtemp(prefix="kv-profile-")
    profile = os.path.join(directory, "put.prof")
    try:
        lib, worktree = variant_lib(base)
        measured = record(python, lib, profile, args)
        (found,) = _read(python, [profile])
        if args.profile:
            shutil.copyfile(profile, args.profile)
    finally:
        if worktree is not None:
            remove_worktree(worktree)
        b.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
    _table({code: found})
    b.finish("profile_put", args, python, {
        "description": "single-node PUT under vmprof: the share of the main loop's samples in each part of the code",
        "code": code, "results": {"kvresponder": measured}, "profile": found})


def _read_json(paths) -> None:
    results = [parts(path) for path in paths]
    print(json.dumps(results[0] if len(results) == 1 else results))


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--read-json":
        _read_json(sys.argv[2:])
    else:
        main()
