import collections, re, sys
path, want = sys.argv[1], sys.argv[2]
top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
text = open(path).read()
counts_block = re.search(r"\{jit-backend-counts\n(.*?)\n\[[0-9a-f]+\] jit-backend-counts\}", text, re.S).group(1)
entry, bridge, token = {}, {}, {}
for line in counts_block.splitlines():
    name, _, n = line.rpartition(":")
    n = int(n)
    if name.startswith("entry "): entry[int(name[6:])] = n
    elif name.startswith("bridge "): bridge[int(name[7:])] = n
    elif name.startswith("TargetToken("): token[int(name[12:-1])] = n
where = collections.Counter()
for kind, body in re.findall(r"\{jit-log-opt-(loop|bridge)\n(.*?)\n\[[0-9a-f]+\] jit-log-opt-(?:loop|bridge)\}", text, re.S):
    head = body.split("\n", 1)[0]
    if kind == "loop":
        m = re.match(r"# Loop (\d+) \((.*)\) : (.*) with (\d+) ops", head)
        if not m: continue
        labels = [int(t) for t in re.findall(r"label\(.*?descr=TargetToken\((\d+)\)\)", body)]
        n = max([entry.get(int(m.group(1)), 0)] + [token.get(t, 0) for t in labels])
    else:
        m = re.match(r"# bridge out of Guard (0x[0-9a-f]+) with (\d+) ops", head)
        if not m: continue
        n = bridge.get(int(m.group(1), 16), 0)
    if not n: continue
    last = "?"
    for line in (re.sub(r"^\+\d+: ", "", l) for l in body.split("\n")):
        if line.startswith("debug_merge_point"):
            mm = re.search(r"'([^;]+);([^:]+):([\d-]+)~#(\d+) (\w+)'", line)
            if mm:
                last = "%s:%s %s #%s %s" % (mm.group(2).replace("/kvresponder/", " kvresponder/").split(" ")[-1].replace("/opt/kv-pypy/lib/pypy3.11/site-packages/", ""), mm.group(3), mm.group(1), mm.group(4), mm.group(5))
        elif want in line and "call" in line:
            where[last] += n
for k, v in where.most_common(top):
    print("%10d  %s" % (v, k))
