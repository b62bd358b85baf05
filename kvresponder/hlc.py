"""
A hybrid logical clock.

Every write is stamped with a :class:`Version` ``(wall_ms, counter, node_id)``. Versions are plain tuples, so
they compare lexicographically and every node orders two writes the same way: the later wall time wins, then
the higher counter, then the node id as a deterministic tie-break. That total order is what lets replication,
handoff and anti-entropy apply entries in any order and still converge (last writer wins).
"""

import re
from typing import Callable, Dict, List, Optional, Tuple

#: ``(wall_ms, counter, node_id)``
Version = Tuple[int, int, str]

#: The largest wall time (ms) and counter the peer wire format carries (a signed and an unsigned 32-bit field).
MAX_WALL = 2 ** 63 - 1
MAX_COUNTER = 2 ** 32 - 1
#: Versions :meth:`HybridLogicalClock.above` stamps have counters from here up: a clock never counts this far
#: within one millisecond, so a re-stamped version never equals one :meth:`~HybridLogicalClock.now` issues, even
#: once the wall clock reaches the millisecond it was stamped in.
RESTAMP_BASE = 2 ** 31

#: How many milliseconds :meth:`HybridLogicalClock.above` keeps a highest counter apiece for. Past that, those
#: ahead of the clock are folded into one floor (see ``above``), so that a node re-stamping writes above the
#: versions of a clock far ahead keeps a bounded record of them.
RESTAMP_MILLISECONDS = 4096


def format_version(version: Version) -> str:
    """
    Render a version for clients: ``"<wall_ms>.<counter>.<node_id>"``.
    """
    return "%d.%d.%s" % version


#: What a node id may be: it ends every version, and is written into JSON and log lines as it is. ``\Z``, not
#: ``$``, which would also take a trailing newline.
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,62}\Z")


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
        or not NODE_ID_PATTERN.match(value[2])
    ):
        raise ValueError("malformed version: %r" % (value,))
    return (value[0], value[1], value[2])


class HybridLogicalClock:
    """
    Issues monotonically increasing versions for one node.

    :param seconds: a function returning the current wall time in seconds (``reactor.seconds`` or a
        ``task.Clock``'s ``seconds``).
    :param str node_id: this node's id, the last element of every version it issues.
    :param float max_ahead: seconds (``MAX_CLOCK_OFFSET``): a version seen from another node whose wall time is
        further than this ahead of this node's wall clock is never adopted (:meth:`observe`). ``None``: no
        bound.
    """

    def __init__(self, seconds: Callable[[], float], node_id: str, max_ahead: Optional[float] = None) -> None:
        self._seconds = seconds
        self.node_id = node_id
        self._max_ahead_ms = None if max_ahead is None else int(max_ahead * 1000)
        self._wall = 0
        self._counter = 0
        #: The highest counter :meth:`above` issued in each millisecond it stamped that this clock has not
        #: passed yet (a few: only keys that a clock ahead of this one wrote get re-stamped).
        self._above: Dict[int, int] = {}
        #: In every millisecond up to ``_folded_wall``, :meth:`above` issued no counter higher than
        #: ``_folded_counter``: the record of milliseconds folded together when ``_above`` grew too large.
        self._folded_wall = -1
        self._folded_counter = 0

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

    def lead(self) -> float:
        """
        How far, in seconds, the versions this clock issues are ahead of the wall clock it reads (0 if they are
        not): a little, after it adopted a version from a peer ahead within the bound; more, after its wall clock
        was set back (it had run ahead), since the versions it issues never go back.
        """
        return max(0.0, self._wall / 1000.0 - self._seconds())

    def now_many(self, count: int) -> List[Version]:
        """
        ``count`` versions, each strictly greater than the one before it and than every version this clock has
        issued or observed, as ``count`` calls of :meth:`now` would give them, but reading the wall clock
        once: the versions of a bulk write, in the millisecond it arrived.
        """
        if count <= 0:
            return []
        wall, first, node = self.now()
        last = first + count - 1
        if last > MAX_COUNTER:
            # The millisecond's counter runs out within the batch: let now() borrow the next ones.
            return [(wall, first, node)] + [self.now() for _ in range(count - 1)]
        self._counter = last
        return [(wall, counter, node) for counter in range(first, last + 1)]

    def observe(self, version: Version) -> bool:
        """
        Move the clock past a version seen from another node, so that a later local write orders after it
        even when this node's wall clock lags behind a little.

        A version further ahead of this node's wall clock than the bound is not adopted: one node with a
        wrong clock would otherwise drag every clock of the cluster along with it, for good. Writes that must
        still order after such a version are stamped with :meth:`above` instead.

        :return: ``False`` if the version was too far ahead to adopt, else ``True``.
        """
        wall, counter = version[0], version[1]
        if counter >= RESTAMP_BASE:
            # A write stamped just above another version by its coordinator: it says where that version was,
            # not what any clock read, and is not adopted (nor is it a clock fault).
            return True
        if wall > self._wall or (wall == self._wall and counter > self._counter):
            if self._max_ahead_ms is not None and wall > int(self._seconds() * 1000) + self._max_ahead_ms:
                return False
            self._wall = wall
            self._counter = counter
        return True

    def above(self, version: Version) -> Version:
        """
        A version of this node that orders after ``version`` and after every version this clock issued:
        :meth:`now`, or, when ``version`` is ahead of that, a version just above it, in the same millisecond
        with a counter of :data:`RESTAMP_BASE` or more, and above the versions this method issued before in that
        millisecond (two overlapping writes re-stamped above one version must not share a version). The clock itself does not
        move, so a version stamped in the future by a skewed node does not carry this node's later writes into
        the future with it. (When that millisecond's counters are used up, the next millisecond with room.)

        No version is ever issued twice, and the record that ensures it stays bounded: a millisecond the
        clock has passed is dropped from it (:meth:`now` is above any version there, so no re-stamp lands
        there again); when it would hold more than :data:`RESTAMP_MILLISECONDS`, the milliseconds ahead of the
        clock are folded into one floor that every later re-stamp in them starts above. Folding costs
        counters in those milliseconds, never uniqueness, and the floor lapses once the clock passes them. (Above
        the format's last version, none fits: that one is returned.)
        """
        now = self.now()
        if now > version:
            return now
        wall = version[0]
        # Above what this method issued in that millisecond too (it may have been above this very version).
        counter = max(version[1], RESTAMP_BASE - 1, self._issued_in(wall))
        while counter >= MAX_COUNTER:
            wall += 1
            if wall <= self._folded_wall and self._folded_counter >= MAX_COUNTER:
                # Every folded millisecond is full: the first one past them.
                wall = self._folded_wall + 1
            counter = max(RESTAMP_BASE - 1, self._issued_in(wall))
        if wall > MAX_WALL:
            # Above a version at the format's very end (only a corrupt peer sends one; no clock gets there):
            # the last version the format carries, which loses to it but still travels, is stored and compared.
            return (MAX_WALL, MAX_COUNTER, self.node_id)
        record = self._above
        if wall not in record and len(record) >= RESTAMP_MILLISECONDS:
            self._forget_or_fold()
        self._above[wall] = counter + 1
        return (wall, counter + 1, self.node_id)

    def _issued_in(self, wall: int) -> int:
        """
        The highest counter :meth:`above` may have issued in millisecond ``wall`` (0 for none).
        """
        issued = self._above.get(wall, 0)
        # Re-stamps land only at or ahead of the clock: once it has passed the folded milliseconds, the floor
        # applies to none that is asked about, so it never needs clearing here.
        if wall <= self._folded_wall and self._folded_counter > issued:
            return self._folded_counter
        return issued

    def _forget_or_fold(self) -> None:
        """
        Make room in the record of re-stamped milliseconds: drop those behind this clock (a re-stamp never
        lands there again); if more than half are left, fold them all into the floor.
        """
        clock_wall = self._wall
        ahead = {wall: counter for wall, counter in self._above.items() if wall >= clock_wall}
        if len(ahead) > RESTAMP_MILLISECONDS // 2:
            # The old floor still covers milliseconds ahead of the clock unless the clock passed them all.
            floor = self._folded_counter if self._folded_wall >= clock_wall else 0
            self._folded_counter = max(floor, max(ahead.values()))
            self._folded_wall = max(self._folded_wall, max(ahead))
            ahead = {}
        self._above = ahead
