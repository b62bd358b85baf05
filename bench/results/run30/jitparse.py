"""
The residual calls in a PyPy JIT log (PYPYLOG=jit-log-opt,jit-backend-counts), weighed by how often their traces
were entered, and the hottest traces: ``python3 jitparse.py LOG [TOP]``.
"""
import collections
import re
import sys


def counts(text: str):
    """Entries of loops, entries of bridges (by guard), and iterations of labels, from jit-backend-counts."""
    block = re.search(r"\{jit-backend-counts\n(.*?)\n\[[0-9a-f]+\] jit-backend-counts\}", text, re.S).group(1)
    entry, bridge, token = {}, {}, {}
    for line in block.splitlines():
        name, _, n = line.rpartition(":")
        n = int(n)
        if name.startswith("entry "):
            entry[int(name[6:])] = n
        elif name.startswith("bridge "):
            bridge[int(name[7:])] = n
        elif name.startswith("TargetToken("):
            token[int(name[12:-1])] = n
    return entry, bridge, token


def traces(text: str):
    """Each optimized trace as (times entered, its name, its ops' lines without their offsets)."""
    entry, bridge, token = counts(text)
    for kind, body in re.findall(r"\{jit-log-opt-(loop|bridge)\n(.*?)\n\[[0-9a-f]+\] jit-log-opt-(?:loop|bridge)\}",
                                 text, re.S):
        head = body.split("\n", 1)[0]
        if kind == "loop":
            m = re.match(r"# Loop (\d+) \((.*)\) : (.*) with (\d+) ops", head)
            if not m:
                continue
            labels = [int(t) for t in re.findall(r"label\(.*?descr=TargetToken\((\d+)\)\)", body)]
            n = max([entry.get(int(m.group(1)), 0)] + [token.get(t, 0) for t in labels])
            name = m.group(2)
        else:
            m = re.match(r"# bridge out of Guard (0x[0-9a-f]+) with (\d+) ops", head)
            if not m:
                continue
            n = bridge.get(int(m.group(1), 16), 0)
            name = "bridge " + m.group(1)
        yield n, name, [re.sub(r"^\+\d+: ", "", line) for line in body.split("\n")[1:]]


CALL = re.compile(r"call_(?:may_force_|assembler_|release_gil_|loopinvariant_)?[irnf]\(ConstClass\(([^)]+)\)")


def main() -> None:
    text = open(sys.argv[1]).read()
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    calls = collections.Counter()
    weighed = []
    for n, name, ops in traces(text):
        real = [op for op in ops if op and not op.startswith(("#", "debug_merge_point", "["))]
        weighed.append((n * len(real), n, len(real), name))
        for op in real:
            m = CALL.search(op)
            if m:
                calls[re.sub(r"__.*", "", m.group(1))] += n
    print("== residual calls, by executions")
    for call, n in calls.most_common(top):
        print("%10d  %s" % (n, call))
    print("== hottest traces (times entered x ops)")
    for _, n, length, name in sorted(weighed, reverse=True)[:15]:
        print("%8d x %5d  %s" % (n, length, name[:100]))


if __name__ == "__main__":
    main()
