import collections, re, sys
path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
text = open(path).read()
counts_block = re.search(r"\{jit-backend-counts\n(.*?)\n\[[0-9a-f]+\] jit-backend-counts\}", text, re.S).group(1)
entry, bridge, token = {}, {}, {}
for line in counts_block.splitlines():
    name, _, n = line.rpartition(":")
    n = int(n)
    if name.startswith("entry "):
        entry[int(name[6:])] = n
    elif name.startswith("bridge "):
        bridge[int(name[7:])] = n
    elif name.startswith("TargetToken("):
        token[int(name[12:-1])] = n
traces = []
for kind, body in re.findall(r"\{jit-log-opt-(loop|bridge)\n(.*?)\n\[[0-9a-f]+\] jit-log-opt-(?:loop|bridge)\}", text, re.S):
    head = body.split("\n", 1)[0]
    if kind == "loop":
        m = re.match(r"# Loop (\d+) \((.*)\) : (.*) with (\d+) ops", head)
        if not m:
            continue
        n = entry.get(int(m.group(1)), 0)
        # iterations of its labels
        labels = [int(t) for t in re.findall(r"label\(.*?descr=TargetToken\((\d+)\)\)", body)]
        n = max([n] + [token.get(t, 0) for t in labels])
        name = m.group(2)[:90]
    else:
        m = re.match(r"# bridge out of Guard (0x[0-9a-f]+) with (\d+) ops", head)
        if not m:
            continue
        n = bridge.get(int(m.group(1), 16), 0)
        name = "bridge " + m.group(1)
    ops = [l for l in body.split("\n")[1:] if l and not l.startswith("#") and not l.startswith("debug_merge_point") and not l.startswith("[")]
    calls = re.findall(r"= call_(?:may_force_|assembler_|release_gil_|loopinvariant_)?[irnf]\(ConstClass\(([^)]+)\)", body) + \
            re.findall(r"^\s*call_(?:may_force_|assembler_|release_gil_|loopinvariant_)?n\(ConstClass\(([^)]+)\)", body, re.M)
    codes = collections.Counter(re.findall(r"<code object ([^,. ]+)[,.] file '([^']+)'", body))
    traces.append((n, len(ops), name, calls, codes))
total = sum(n * ops for n, ops, *_ in traces)
print("weighted ops total", total)
calls_w = collections.Counter()
for n, ops, name, calls, codes in traces:
    for c in calls:
        calls_w[re.sub(r"__.*", "", c)] += n
print("== residual calls, by executions")
for c, n in calls_w.most_common(top):
    print("%10d  %s" % (n, c))
print("== hottest traces (count x ops)")
for n, ops, name, calls, codes in sorted(traces, key=lambda t: -t[0] * t[1])[:15]:
    main = ", ".join("%s(%s)" % (k[0], k[1].rsplit("/", 1)[-1]) for k, _ in codes.most_common(4))
    print("%8d x %5d  %s | %s" % (n, ops, name[:50], main[:150]))
