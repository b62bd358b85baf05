"""
Review scenarios on real ``twistd`` nodes in network namespaces (tests/netns.py), reusing the chaos suite's
fixtures: a later write through a joining node against an earlier one stamped by a clock ahead.
"""

import sys
import time

from . import clock_nemesis
from .netns import wait_until
from .test_chaos import _require_libfaketime, _start_with_one_skewed, net, network  # noqa: F401



def test_a_later_write_through_a_joining_node_beats_an_earlier_one_stamped_ahead(net):
    """
    If node 3's clock runs 30 s ahead within a 60 s MAX_CLOCK_OFFSET, keys are written through it, and node 4
    then joins and, while still joining, takes later writes of the keys whose both owners its join replaced,
    then once settled every node returns the later writes.
    """
    from concurrent.futures import ThreadPoolExecutor

    from kvresponder.ring import HashRing

    from .netns import session

    _require_libfaketime()
    healthy, skewed = _start_with_one_skewed(net, clock_nemesis.faketime_env("+30s"),
                                             env={"MAX_CLOCK_OFFSET": "60"})
    skewed.wait_ready()
    net.wait_formed(healthy + [skewed])
    before = HashRing(["node1", "node2", "node3"])
    after = HashRing(["node1", "node2", "node3", "node4"])
    keys = [key for key in ("jw-%d" % i for i in range(3000))
            if not set(before.preference_list(key, 2)) & set(after.preference_list(key, 2))][:60]
    s = session()
    for key in keys:
        assert s.put(skewed.url + "/kv/" + key, json={"value": "earlier"}, timeout=5).status_code == 201
    joiner = net.start(4, wait=False, env={"MAX_CLOCK_OFFSET": "60",
                                           "CLUSTER_SECRET": healthy[0].env["CLUSTER_SECRET"]})

    def answers():
        try:
            return joiner.session.get(joiner.url + "/health/live", timeout=0.2).status_code == 200
        except Exception:
            return False
    wait_until(answers, 20, "node4 to answer", interval=0.02)
    states = []

    def write(key):
        with session() as own:
            health = own.get(joiner.url + "/health", timeout=5).json()
            state = "%s ring %s" % (health["state"], health["ring_size"])
            response = own.put(joiner.url + "/kv/" + key, json={"value": "later"}, timeout=5)
            return state, response.status_code
    with ThreadPoolExecutor(max_workers=8) as pool:
        states = list(pool.map(write, keys))
    # A 503 (a node that has heard no peer yet, with the fix for finding 3) is no acknowledgement: only the
    # acknowledged later writes must win.
    assert all(code in (200, 201, 503) for _, code in states), states
    acknowledged = [key for key, (_, code) in zip(keys, states) if code in (200, 201)]
    assert len(acknowledged) >= len(keys) // 2, states
    keys_written = keys
    keys = acknowledged
    joiner.wait_ready()
    time.sleep(3.0)
    nodes = healthy + [skewed, joiner]
    wrong = {}
    for node in nodes:
        for key in keys:
            value = s.get(node.url + "/kv/" + key, timeout=5).json().get("value")
            if value != "later":
                wrong.setdefault(node.node_id, []).append(key)
    sys.stdout.write("\n[join, clock +30s] %d later writes acknowledged by node4 (%d while it was joining); earlier value "
                     "returned instead of the later one, by node: %s\n" % (
                         len(keys), sum(state.startswith("joining") and code != 503 for state, code in states),
                         {node: len(found) for node, found in wrong.items()}))
    lost = set(key for found in wrong.values() for key in found)
    sys.stdout.write("  lost keys as written: %s\n" % ([(key, state, code) for key, (state, code) in zip(keys_written, states)
                                                      if key in lost],))
    assert wrong == {}
