"""A coordinator under PUT load with PYPYLOG=jit-log-opt,jit-backend-counts, exiting normally so the counts are written."""
import os, socket, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
from labnode import launched
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
mode = sys.argv[1]
try:
    python, n1, nodes = launched(LAUNCH, mode, "jitlog",
                                 {"PYPYLOG": "jit-log-opt,jit-backend-counts:/tmp/jitlog.%s.log" % mode})
    port = n1.port
    url = "http://127.0.0.1:%d" % port
    b.run_wrk(url, "put", 20)
    c = n1.cpu_seconds()
    r = b.run_wrk(url, "put", 10)
    print(mode, r["rps"], round((n1.cpu_seconds() - c) * 1e6 / r["requests"], 1), flush=True)
finally:
    b.stop_all()
