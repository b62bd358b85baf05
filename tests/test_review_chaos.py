"""
Review scenarios on real ``twistd`` nodes in network namespaces (tests/netns.py), reusing the chaos suite's
fixtures.
"""

import sys
import time

from . import clock_nemesis
from .netns import metric_sum, wait_until
from .test_chaos import SKEWED, _require_libfaketime, _start_with_one_skewed, net, network  # noqa: F401


def _wall_only(timestamps):
    """
    libfaketime on the wall clock only, as an NTP step does it (the nemesis's default fakes the monotonic clock
    too, which no real step does).
    """
    return dict(clock_nemesis.faketime_env(timestamp_file=timestamps), FAKETIME_DONT_FAKE_MONOTONIC="1")


def _alive_ids(node):
    return {peer["id"] for peer in node.peers() if peer["state"] == "alive"}


def test_a_node_whose_clock_ran_ahead_rejoins_once_its_clock_is_set_right(net, tmp_path):
    """
    If node 3 runs 120 s ahead (its heartbeats refused by the others as clock_ahead), and its clock is then
    set right while it keeps running (an NTP step), then within 10 s every healthy node has it back as an
    alive peer, not 120 s later.
    """
    _require_libfaketime()
    timestamps = str(tmp_path / "faketime-node3")
    clock_nemesis.step(timestamps, "+120s")
    healthy, skewed = _start_with_one_skewed(net, _wall_only(timestamps))
    wait_until(lambda: abs(clock_nemesis.clock_offset(skewed) - 120.0) < 1.5, 10, "node3's clock to be ahead")
    time.sleep(2.0)
    assert all(SKEWED not in _alive_ids(node) for node in healthy)
    clock_nemesis.step(timestamps, "+0")
    wait_until(lambda: abs(clock_nemesis.clock_offset(skewed)) < 1.5, 10, "node3's clock to be set right")
    stepped = time.monotonic()
    try:
        wait_until(lambda: all(SKEWED in _alive_ids(node) for node in healthy), 10,
                   "the healthy nodes to take node3 back", lambda: "\n".join(
                       "%s: alive %s, replayed %s" % (node.node_id, sorted(_alive_ids(node)), metric_sum(
                           node.metrics(), "kv_discovery_messages_total", result="replayed")) for node in healthy))
    finally:
        sys.stdout.write("\n[clock set right] healthy nodes' peers %.1fs after the step: %s\n" % (
            time.monotonic() - stepped, {node.node_id: sorted(_alive_ids(node)) for node in healthy}))


def test_a_node_whose_clock_steps_back_keeps_heartbeating(net, tmp_path):
    """
    If node 3's wall clock steps back 20 s while it runs (an NTP step, within the 30 s replay window in which
    peers take in a clock behind theirs), then it keeps sending heartbeats and the healthy nodes keep taking them
    in: it stays an alive peer (it may turn clock-skewed, but it must not vanish). Before the fix, its timers ran
    on the wall clock (every timer armed before the step waited 20 s), and the peers dropped its heartbeats as
    replayed, their times being below the last one taken in.
    """
    _require_libfaketime()
    timestamps = str(tmp_path / "faketime-node3")
    clock_nemesis.step(timestamps, "+0")
    healthy, skewed = _start_with_one_skewed(net, _wall_only(timestamps))
    skewed.wait_ready()
    net.wait_formed(healthy + [skewed])
    clock_nemesis.step(timestamps, "-20s")
    wait_until(lambda: abs(clock_nemesis.clock_offset(skewed) + 20.0) < 1.5, 5, "node3's clock to step back")
    stepped = time.monotonic()
    missing = []
    while time.monotonic() - stepped < 8.0:
        missing = [node.node_id for node in healthy if SKEWED not in _alive_ids(node)]
        if missing:
            break
        time.sleep(0.3)
    sys.stdout.write("\n[clock step -20s] %.1fs after the step, node3 missing from the peers of %s\n" % (
        time.monotonic() - stepped, missing))
    assert missing == [], "%s dropped node3 %.1fs after its clock stepped back: it stopped heartbeating" % (
        missing, time.monotonic() - stepped)
