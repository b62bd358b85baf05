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

#: The largest wall time (ms) and counter the peer wire format carries (a signed and an unsigned 32-bit field).
MAX_WALL = 2 ** 63 - 1
MAX_COUNTER = 2 ** 32 - 1


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
        or not 0 <= value[0] <= MAX_WALL
        or not 0 <= value[1] <= MAX_COUNTER
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
        elif self._counter < MAX_COUNTER:
            self._counter += 1
        else:
            # The counter is full for this millisecond: borrow the next one, still strictly greater.
            self._wall += 1
            self._counter = 0
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
