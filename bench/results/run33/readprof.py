import sys, vmprof
from collections import Counter
tree = vmprof.read_profile(sys.argv[1]).get_tree()
def find(node):
    st=[node]
    while st:
        c=st.pop()
        if "py:mainLoop:" in c.name: return c
        st.extend(c.children.values())
root = find(tree) or tree
own = Counter(); incl = Counter()
st=[(root, frozenset())]
while st:
    n, seen = st.pop()
    f = n.name.split(":")
    key = "%s:%s:%s" % (f[1] if len(f)>1 else n.name, f[-1].split("/")[-1] if len(f)>=4 else "", f[2] if len(f)>2 else "")
    own[key] += n.count - sum(c.count for c in n.children.values())
    if key not in seen: incl[key] += n.count
    st.extend((c, seen | {key}) for c in n.children.values())
tot = root.count
print("samples", tot)
print("--- self")
for k, v in own.most_common(int(sys.argv[2]) if len(sys.argv)>2 else 40): print("%5.1f%% %s" % (v*100/tot, k))
print("--- inclusive")
for k, v in incl.most_common(int(sys.argv[3]) if len(sys.argv)>3 else 40): print("%5.1f%% %s" % (v*100/tot, k))
