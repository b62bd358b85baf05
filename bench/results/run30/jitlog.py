"""A coordinator under PUT load with PYPYLOG=jit-log-opt,jit-backend-counts, exiting normally so the counts are written."""
import os, socket, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
import cluster_ratio as cr
LAUNCH = r'''
import os, sys
real_kill = os.kill
def kill(pid, sig):
    # twistd re-raises SIGTERM on itself after stopping: exit normally instead, so PyPy writes the JIT counts.
    if pid == os.getpid():
        return
    real_kill(pid, sig)
os.kill = kill
from twisted.scripts.twistd import run; sys.argv[0] = "twistd"; run()
'''
python = b.interpreter_path("pypy")
env = b.with_secret({"REPLICATION_FACTOR": "2"})
discovery = b.free_port(socket.SOCK_DGRAM)
mode = sys.argv[1]
log = "/tmp/jitlog.%s.log" % mode
port = b.free_port()
settings = dict(env, HEARTBEAT_INTERVAL="0.5", PYPYLOG="jit-log-opt,jit-backend-counts:" + log,
                LOG_FILE=os.path.join(b.log_dir(), "jitlog-%d.eliot.log" % port))
command = [python, "-c", LAUNCH, "-n", "--pidfile=", "kvresponder", "--tenant", b.TENANT,
           "--port", str(port), "--node-id", "n1", "--discovery-port", str(discovery)]
n1 = b.Process("n1", command, b.node_env(settings), port, "http://127.0.0.1:%d/%s" % (port, b.TENANT))
nodes = [n1]
try:
    n1.wait_ready(); b.bulk_load(n1.base, b.HIT_KEYS)
    if mode == "coord":
        nodes += [b.start_node(python, "n%d" % i, discovery, env) for i in (2, 3)]
        for n in nodes: n.wait_ready()
        b.wait_formed(nodes); b.wait_keys(nodes, 2 * b.HIT_KEYS)
    cr.pin([n1], nodes[1:])
    url = "http://127.0.0.1:%d" % port
    b.run_wrk(url, "put", 20)
    c = n1.cpu_seconds()
    r = b.run_wrk(url, "put", 10)
    print(mode, r["rps"], round((n1.cpu_seconds() - c) * 1e6 / r["requests"], 1), flush=True)
finally:
    b.stop_all()
