"""
Review scenarios on real ``twistd`` nodes in network namespaces (tests/netns.py), reusing the chaos suite's
fixtures: sequences checked and found sound (flapping partitions; a kill, a join and a SIGTERM together).
"""

import time

from .test_chaos import net, network  # noqa: F401



def test_a_flapping_partition_under_load_loses_no_acknowledged_write(net):
    """
    If node 3's network is cut and restored again and again (2.5 s cut, 1.5 s up, five times: each cut longer
    than PEER_TIMEOUT, so every node declares the other side dead and takes it back each time) under a load
    through every node, then once healed the cluster converges and no acknowledged write is lost.
    """
    from .history import History, Load, preload
    from .test_chaos import Targets, finish, start_cluster

    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "flpre", 100)
    majority, isolated = nodes[:2], nodes[2]
    load = Load(history, Targets(nodes), "fl", workers=4, keys_per_worker=25, max_ops=800, max_seconds=40,
                timeout=2.5).start()
    try:
        time.sleep(1.0)
        for _ in range(5):
            net.partition([isolated], majority)
            time.sleep(2.5)
            net.heal()
            time.sleep(1.5)
        net.wait_formed(nodes, timeout=15)
        time.sleep(1.5)
    finally:
        load.stop()
    finish(history, nodes, "flapping partition")


def test_a_join_right_after_a_kill_and_a_sigterm_under_load_loses_no_acknowledged_write(net):
    """
    If node 3 is killed (SIGKILL), node 4 joins at once while the ring settles, and node 1 is then SIGTERMed
    while node 4's share is still moving, all under a load through the live nodes, then the survivors converge
    and no acknowledged write is lost.
    """
    from .history import History, Load, preload
    from .test_chaos import Targets, finish, start_cluster

    nodes = start_cluster(net, [1, 2, 3])
    history = History()
    preload(history, nodes[0].url, nodes[0].node_id, "jkpre", 200)
    targets = Targets(nodes)
    load = Load(history, targets, "jk", workers=4, keys_per_worker=25, max_ops=800, max_seconds=30,
                timeout=2.5).start()
    try:
        time.sleep(1.0)
        targets.remove(nodes[2])
        time.sleep(0.2)
        nodes[2].kill()
        joiner = net.start(4, wait=False)
        time.sleep(0.3)
        targets.add(joiner)
        time.sleep(0.5)
        targets.remove(nodes[0])
        time.sleep(0.2)
        assert nodes[0].terminate(timeout=30) in (0, -15), nodes[0].log_tail()
        joiner.wait_ready()
        survivors = [nodes[1], joiner]
        net.wait_formed(survivors, timeout=15)
        time.sleep(2.0)
    finally:
        load.stop()
    finish(history, survivors, "kill, join, sigterm")
