"""
Where a residual call of a PyPy JIT log comes from: the Python line before it in each trace, weighed by how often
the trace was entered: ``python3 jitwhere.py LOG CALL [TOP]`` (CALL: part of the callee's name).
"""
import collections
import re
import sys

from jitparse import traces


def main() -> None:
    text, want = open(sys.argv[1]).read(), sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    where = collections.Counter()
    for n, _, ops in traces(text):
        if not n:
            continue
        last = "?"
        for op in ops:
            if op.startswith("debug_merge_point"):
                m = re.search(r"'([^;]+);([^:]+):([\d-]+)~#(\d+) (\w+)'", op)
                if m:
                    source = m.group(2).replace("/kvresponder/", " kvresponder/").split(" ")[-1]
                    last = "%s:%s %s #%s %s" % (source, m.group(3), m.group(1), m.group(4), m.group(5))
            elif want in op and "call" in op:
                where[last] += n
    for place, n in where.most_common(top):
        print("%10d  %s" % (n, place))


if __name__ == "__main__":
    main()
