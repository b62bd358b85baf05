"""Pinned as cluster_ratio: perf record + perf stat of the single node and of the coordinator under PUT load."""
import os, subprocess, sys, time, threading
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
import cluster_ratio as cr
python = b.interpreter_path("pypy")
out = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
decoy = b.start_node(python, "decoy"); decoy.wait_ready()
single = b.start_node(python, "s1", env={"REPLICATION_FACTOR": "2"})
try:
    single.wait_ready()
    b.bulk_load(single.base, b.HIT_KEYS)
    cluster = b.start_loaded_cluster(python, 3, b.HIT_KEYS, {"REPLICATION_FACTOR": "2"})
    coord = cluster[0]
    cr.pin([single, coord], cluster[1:])
    cr.measure(single, None, cluster, 15, 32, 1)
    cr.measure(coord, cluster, [single], 15, 32, 1)
    for name, node, watched, idle in [("single", single, None, cluster), ("coord", coord, cluster, [single]),
                                      ("single2", single, None, cluster)]:
        time.sleep(5)
        res = {}
        t = threading.Thread(target=lambda: res.update(cr.measure(node, watched, idle, 12, 32, 1)))
        t.start()
        time.sleep(4)
        stat = subprocess.Popen(["perf", "stat", "-e", "task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter",
                                 "-p", str(node.pid), "-o", "%s/%s.stat" % (out, name), "--", "sleep", "3"])
        stat.wait()
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-g", "-p", str(node.pid),
                        "-o", "%s/%s.data" % (out, name), "--", "sleep", "3"], check=False)
        t.join()
        print(name, res["rps"], res["cpu_us_per_request"], res["cpu_us_per_request_per_node"], flush=True)
finally:
    b.stop_all()
