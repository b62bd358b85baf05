"""
A hybrid logical clock.

Every write is stamped with a :class:`Version` ``(wall_ms, counter, node_id)``. Versions are plain tuples, so
they compare lexicographically and every node orders two writes the same way: the later wall time wins, then
the higher counter, then the node id as a deterministic tie-break. That total order is what lets replication,
handoff and anti-entropy apply entries in any order and still converge (last writer wins).
"""

from typing import Callable, Tuple

#: ``(wall_ms, counter, node_id)``
Version = Tuple[int, int, str]


def format_version(version: Version) -> str:
    """
    Render a version for clients: ``"<wall_ms>.<counter>.<node_id>"``.
    """
    return "%d.%d.%s" % version


def version_from_wire(value) -> Version:
    """
    Parse a version sent by a peer as a JSON list ``[wall_ms, counter, node_id]``.

    :raises ValueError: if the value is not a well-formed version.
    """
    if (
        not isinstance(value, list)
        or len(value) != 3
        or type(value[0]) is not int
        or type(value[1]) is not int
        or not isinstance(value[2], str)
        or value[0] < 0
        or value[1] < 0
    ):
        raise ValueError("malformed version: %r" % (value,))
    return (value[0], value[1], value[2])


class HybridLogicalClock:
    """
    Issues monotonically increasing versions for one node.

    :param seconds: a function returning the current wall time in seconds (``reactor.seconds`` or a
        ``task.Clock``'s ``seconds``).
    :param str node_id: this node's id, the last element of every version it issues.
    """

    def __init__(self, seconds: Callable[[], float], node_id: str) -> None:
        self._seconds = seconds
        self.node_id = node_id
        self._wall = 0
        self._counter = 0

    def now(self) -> Version:
        """
        A version strictly greater than every version this clock has issued or observed.
        """
        physical = int(self._seconds() * 1000)
        if physical > self._wall:
            self._wall = physical
            self._counter = 0
        else:
            self._counter += 1
        return (self._wall, self._counter, self.node_id)

    def observe(self, version: Version) -> None:
        """
        Move the clock past a version seen from another node, so that a later local write orders after it
        even when this node's wall clock lags behind.
        """
        wall, counter = version[0], version[1]
        if wall > self._wall or (wall == self._wall and counter > self._counter):
            self._wall = wall
            self._counter = counter
