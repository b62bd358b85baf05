import collections, os, socket, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchlib as b
from labnode import launched
LAUNCH = r'''
import os, sys, time, collections, pypyjit
counts = collections.Counter()
reasons = collections.Counter()
def compile_hook(info):
    counts[info.type] += 1
    counts["ops"] += len(info.operations) if info.operations is not None else 0
def abort_hook(jitdriver, greenkey, reason, operations):
    counts["abort"] += 1
    reasons[(reason, str(greenkey)[:160])] += 1
def too_long(jitdriver, greenkey):
    counts["toolong"] += 1
    reasons[("toolong", str(greenkey)[:160])] += 1
pypyjit.set_compile_hook(compile_hook)
pypyjit.set_abort_hook(abort_hook)
pypyjit.set_trace_too_long_hook(too_long)
from twisted.internet import reactor, task
out = open(os.environ["KV_JIT_OUT"], "w")
def dump():
    out.write("%.1f %s\n" % (time.time(), dict(counts)))
    if int(time.time()) % 5 == 0:
        out.write("  reasons %s\n" % (reasons.most_common(8),))
        reasons.clear()
    out.flush()
task.LoopingCall(dump).start(1.0)
from twisted.scripts.twistd import run; sys.argv[0] = "twistd"; run()
'''
try:
    python, n1, nodes = launched(LAUNCH, sys.argv[1], "jithook", {"KV_JIT_OUT": "/tmp/jithook.%s.log" % sys.argv[1]})
    port = n1.port
    url = "http://127.0.0.1:%d" % port
    t0 = time.time()
    for i in range(5):
        c = n1.cpu_seconds()
        r = b.run_wrk(url, "put", 8)
        print("%.0f" % (time.time() - t0), r["rps"], round((n1.cpu_seconds() - c) * 1e6 / r["requests"], 1), flush=True)
finally:
    b.stop_all()
