"""
perf stat of a pinned 3-node cluster's coordinator under PUT load, at each number of wrk connections given
(default 32 and 64), in 5 s windows; per client request. Run from the repository: python3 bench/results/run18/perf_stat_by_connections.py 32 64
"""
import os, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
from cluster_ratio import pin
OUT = os.path.join(tempfile.mkdtemp(), "perf.txt")
python = b.interpreter_path("pypy")
env = b.with_secret({"REPLICATION_FACTOR": "2"})
decoy = b.start_node(python, "decoy")
nodes = b.start_cluster(python, 3, env=env)
try:
    for x in nodes: x.wait_ready()
    b.wait_formed(nodes)
    pin([nodes[0]], nodes[1:])
    n1 = nodes[0]
    b.run_wrk(n1.base, "put", 15)
    for c in [int(x) for x in sys.argv[1:]] or [32, 64]:
        b.run_wrk(n1.base, "put", 3, connections=c)
        cpu = [n.cpu_seconds() for n in nodes]
        st = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "task-clock,context-switches,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write", "-p", str(n1.pid), "-o", OUT], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        r = b.run_wrk(n1.base, "put", 5, connections=c)
        st.send_signal(2); st.wait()
        cpu2 = [n.cpu_seconds() for n in nodes]
        n = r["requests"]
        print("c", c, "rps", r["rps"], "cpu us/req", [round((y - x) * 1e6 / n, 1) for x, y in zip(cpu, cpu2)])
        for line in open(OUT):
            parts = line.strip().split(",")
            if len(parts) > 3 and parts[0].replace(".", "").isdigit():
                print("   %-40s %10.3f per request" % (parts[2], float(parts[0]) / n))
finally:
    b.stop_all()
