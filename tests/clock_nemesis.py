"""
A clock nemesis for the chaos suite: run one node under libfaketime (Debian's ``faketime`` package), with its
wall clock offset from the start or stepped while it runs, and observe clocks from outside.

libfaketime is preloaded into the node's process and fakes ``clock_gettime``/``gettimeofday``, so
``time.time()`` and with it the reactor's clock (Twisted schedules on ``time.time``) run offset. Everything
else on the host, this test process included, keeps the real clock, so the test can compare.
"""

import email.utils
import glob
import os
import time
from typing import Dict, Optional

from .netns import ChaosNode

# Debian's faketime package, under the machine's multiarch directory (x86_64-linux-gnu, aarch64-linux-gnu, ...).
LIBFAKETIME = (sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
               or ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"])[0]

ONE_YEAR = 365 * 86400.0


def faketime_env(spec: Optional[str] = None, timestamp_file: Optional[str] = None) -> Dict[str, str]:
    """
    The environment that runs a node under libfaketime.

    :param spec: a fixed offset from the start, as libfaketime reads it: ``+30s``, ``-30s``, ``+365d``.
    :param timestamp_file: instead, a file holding such an offset, read again at most once a second
        (``FAKETIME_CACHE_DURATION=1``), so that :func:`step` can move the clock of a running node.
    """
    env = {"LD_PRELOAD": LIBFAKETIME}
    # FAKETIME_DONT_FAKE_MONOTONIC=1 would be closer to an NTP step, which leaves the monotonic clock
    # alone, but with it libfaketime 0.9.10 makes Python's time.sleep fail with EINVAL. So the monotonic
    # clock steps too: the node's reactor, timed by it (``tap.steady_seconds``), absorbs a step back, and a
    # step forward looks to it like a stall of as long.
    if spec is not None:
        env["FAKETIME"] = spec
    if timestamp_file is not None:
        env["FAKETIME_TIMESTAMP_FILE"] = timestamp_file
        env["FAKETIME_CACHE_DURATION"] = "1"
    return env


def step(timestamp_file: str, spec: str) -> None:
    """
    Set the offset a node started with ``faketime_env(timestamp_file=...)`` reads; it applies within a second.
    Written to a new file then renamed, so the node never reads half a line.
    """
    partial = timestamp_file + ".new"
    with open(partial, "w") as handle:
        handle.write(spec + "\n")
    os.replace(partial, timestamp_file)


def clock_offset(node: ChaosNode) -> float:
    """
    The node's wall clock minus this process's, in seconds, from the ``Date`` header Twisted stamps on every
    answer with ``time.time()``: independent of anything the node reports about clocks. The header has
    whole seconds (truncated), so the result is within about ±0.6 s of the truth on a quiet host.
    """
    before = time.time()
    response = node.session.get(node.url + "/health/live", timeout=5)
    after = time.time()
    stamped = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
    return stamped + 0.5 - (before + after) / 2


def peer_offset(node: ChaosNode, peer: str) -> Optional[float]:
    """
    ``kv_clock_offset_seconds{peer=...}`` as ``node`` exports it, or None while it has no such series.
    """
    for series, value in node.metrics().items():
        if series.startswith("kv_clock_offset_seconds{") and 'peer="%s"' % (peer,) in series:
            return value
    return None


def version_wall(version: str) -> float:
    """
    The wall-clock part of a version ``<wall_ms>.<counter>.<node>``, in Unix seconds.
    """
    return int(version.split(".", 1)[0]) / 1000.0


def version_key(version: str):
    """
    A version as the order in which versions win: wall milliseconds, then counter, then node id.
    """
    wall, counter, node = version.split(".", 2)
    return (int(wall), int(counter), node)


def logged(node: ChaosNode, message_type: str) -> bool:
    """
    Whether the node's log has an Eliot message (or action) of that type.
    """
    return any(m.get("message_type") == message_type or m.get("action_type") == message_type
               for m in node.log_messages())
