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
own=Counter(); total=root.count
st=[root]
while st:
    n=st.pop()
    f=n.name.split(":")
    key = "%s:%s:%s" % (f[1] if len(f)>1 else n.name, f[-1].replace("/opt/kv-pypy/lib/pypy3.11/site-packages/","").replace("/work/main/",""), f[2] if len(f)>2 else "")
    own[key]+= n.count - sum(c.count for c in n.children.values())
    st.extend(n.children.values())
print("samples", total)
for k,v in own.most_common(int(sys.argv[2]) if len(sys.argv)>2 else 45):
    print("%5.1f%%  %s" % (v*100.0/total, k))
