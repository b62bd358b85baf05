"""
Run 19: vmprof of a pinned single node and of a pinned 3-node RF=2 coordinator under PUT load (wrk -t1 -c32, 15 s
of warm-up, 10 s measured), then their self samples by file, scaled to each node's measured CPU a request.
From the repository:

    python3 bench/results/run19/vmprof_coordinator_vs_single.py record single
    python3 bench/results/run19/vmprof_coordinator_vs_single.py record cluster
    /var/cache/kv-pypy311/python bench/results/run19/vmprof_coordinator_vs_single.py read

The profiles and the measured CPU go to /tmp (which PyPy's wrapper shares).
"""
import collections
import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

OUT = "/tmp/kv-run19-%s.prof"
CPU = "/tmp/kv-run19-%s.cpu"


def record(mode):
    import benchlib as b
    from cluster_ratio import pin
    from profile_parts import PROFILED_TWISTD
    python = b.interpreter_path("pypy")
    env = b.with_secret({"REPLICATION_FACTOR": "2"})
    discovery = b.free_port(socket.SOCK_DGRAM)
    port = b.free_port()
    settings = dict(env, HEARTBEAT_INTERVAL="0.5", KV_PROFILE_OUT=OUT % mode,
                    LOG_FILE=os.path.join(b.log_dir(), "run19-%d.eliot.log" % port))
    command = [python, "-c", PROFILED_TWISTD, "-n", "--pidfile=", "kvresponder", "--tenant", b.TENANT,
               "--port", str(port), "--node-id", "n1", "--discovery-port", str(discovery)]
    decoy = b.start_node(python, "decoy")
    decoy.wait_ready()
    nodes = [b.Process("n1", command, b.node_env(settings), port, "http://127.0.0.1:%d/%s" % (port, b.TENANT))]
    if mode == "cluster":
        nodes += [b.start_node(python, "n%d" % i, discovery, env) for i in (2, 3)]
    try:
        for node in nodes:
            node.wait_ready()
        if mode == "cluster":
            b.wait_formed(nodes)
        pin([nodes[0]], nodes[1:])
        b.run_wrk(nodes[0].base, "put", 15)
        before = nodes[0].cpu_seconds()
        result = b.run_wrk(nodes[0].base, "put", 10)
        cpu = (nodes[0].cpu_seconds() - before) * 1e6 / result["requests"]
        print(mode, result["rps"], "req/s", round(cpu, 2), "us a request")
        with open(CPU % mode, "w") as out:
            out.write("%f\n" % (cpu,))
    finally:
        b.stop_all()


def self_by_file(path):
    import vmprof
    stack, main = [vmprof.read_profile(path).get_tree()], None
    while stack and main is None:
        node = stack.pop()
        if "py:mainLoop:" in node.name:
            main = node
        stack.extend(node.children.values())
    counts = collections.Counter()
    stack = [main]
    while stack:
        node = stack.pop()
        own = node.count - sum(child.count for child in node.children.values())
        name = node.name.split(":")[-1] if node.name.startswith("py:") else node.name
        counts[name.split("/site-packages/")[-1].split(os.getcwd() + "/")[-1]] += own
        stack.extend(node.children.values())
    return main.count, counts


def read():
    scaled = {}
    for mode in ("single", "cluster"):
        total, counts = self_by_file(OUT % mode)
        cpu = float(open(CPU % mode).read())
        print("# %s: %d samples under mainLoop, %.2f us a request" % (mode, total, cpu))
        scaled[mode] = {name: count / total * cpu for name, count in counts.items()}
    single, cluster = scaled["single"], scaled["cluster"]
    print("%8s %8s %8s  %s" % ("single", "coord", "diff", "file (us a request)"))
    for name in sorted(set(single) | set(cluster), key=lambda n: single.get(n, 0) - cluster.get(n, 0)):
        a, b = single.get(name, 0), cluster.get(name, 0)
        if max(a, b) >= 0.05:
            print("%8.2f %8.2f %+8.2f  %s" % (a, b, b - a, name))


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"]:
        record(sys.argv[2])
    else:
        read()
