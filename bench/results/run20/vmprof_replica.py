"""
Run 20: vmprof of one replica (n2) of a pinned 3-node RF=2 PyPy cluster under PUT load through n1 (wrk -t1 -c32,
15 s of warm-up, 10 s measured), pinned as cluster_ratio pins; then its self samples by file and by function,
scaled to the replica's CPU a client request. From the repository:

    python3 bench/results/run20/vmprof_replica.py record
    /var/cache/kv-pypy311/python bench/results/run20/vmprof_replica.py read
"""
import collections, os, socket, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "run19"))
OUT = "/tmp/kv-replica.prof"
CPU = "/tmp/kv-replica.cpu"

def record():
    import benchlib as b
    from cluster_ratio import pin
    from profile_parts import PROFILED_TWISTD
    python = b.interpreter_path("pypy")
    env = b.with_secret({"REPLICATION_FACTOR": "2"})
    discovery = b.free_port(socket.SOCK_DGRAM)
    port = b.free_port()
    settings = dict(env, HEARTBEAT_INTERVAL="0.5", KV_PROFILE_OUT=OUT,
                    LOG_FILE=os.path.join(b.log_dir(), "rep-%d.eliot.log" % port))
    command = [python, "-c", PROFILED_TWISTD, "-n", "--pidfile=", "kvresponder", "--tenant", b.TENANT,
               "--port", str(port), "--node-id", "n2", "--discovery-port", str(discovery)]
    decoy = b.start_node(python, "decoy")
    decoy.wait_ready()
    n1 = b.start_node(python, "n1", discovery, env)
    rep = b.Process("n2", command, b.node_env(settings), port, "http://127.0.0.1:%d/%s" % (port, b.TENANT))
    n3 = b.start_node(python, "n3", discovery, env)
    nodes = [n1, rep, n3]
    try:
        for node in nodes:
            node.wait_ready()
        b.wait_formed(nodes)
        pin([n1], nodes[1:])
        b.run_wrk(n1.base, "put", 15)
        before = [n.cpu_seconds() for n in nodes]
        result = b.run_wrk(n1.base, "put", 10)
        cpu = [(n.cpu_seconds() - s) * 1e6 / result["requests"] for n, s in zip(nodes, before)]
        print(result["rps"], "req/s", [round(c, 2) for c in cpu], "us a request")
        with open(CPU, "w") as out:
            out.write("%f\n" % (cpu[1],))
    finally:
        b.stop_all()

def read():
    import vmprof
    stack, main = [vmprof.read_profile(OUT).get_tree()], None
    while stack and main is None:
        node = stack.pop()
        if "py:mainLoop:" in node.name:
            main = node
        stack.extend(node.children.values())
    byfile, byfunc = collections.Counter(), collections.Counter()
    stack = [main]
    while stack:
        node = stack.pop()
        own = node.count - sum(child.count for child in node.children.values())
        parts = node.name.split(":")
        fname = parts[-1].split("/site-packages/")[-1].split("/work/main/")[-1]
        byfile[fname] += own
        byfunc["%s:%s" % (fname, parts[1] if len(parts) > 2 else node.name)] += own
        stack.extend(node.children.values())
    cpu = float(open(CPU).read())
    total = main.count
    print("# replica: %d samples, %.2f us a client request" % (total, cpu))
    for n, c in byfile.most_common(30):
        print("%6.2f  %s" % (c / total * cpu, n))
    print()
    for n, c in byfunc.most_common(40):
        print("%6.2f  %s" % (c / total * cpu, n))

if __name__ == "__main__":
    record() if sys.argv[1] == "record" else read()
