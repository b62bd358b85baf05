"""
How long what this node reads now may have waited unread: whether it was just stalled.

A node's process can stop running for a while: a VM frozen or moved, a container throttled, a long garbage
collection, SIGSTOP. What reached its sockets meanwhile is read when it runs again, all at once, as if it had just
arrived. Most of it does not care when it arrived; a heartbeat's timestamp does. Measured against this node's
clock on reading, a heartbeat held 10 s says that its sender's clock is 10 s behind, and a burst of them would make
this node take its own, correct clock for wrong (:mod:`kvresponder.clockskew`) and refuse every client.

A :class:`StallWatch` ticks on the reactor. The reactor reads its sockets between the rounds in which it runs its
timers, so what it reads now waited at most the time since the last tick; and, until the next tick, as long as
the last one was late (a node stopped in the middle of its Python code may run its timers before it reads again,
and then reads what waited).
"""

from .log.discovery import STALLED

#: A stall at least this long is logged (``kvresponder:discovery:stalled``): shorter ones are a busy reactor's
#: long turns, which only cost the heartbeats they held their clock samples.
LOG_AFTER = 1.0
#: The shortest tick, in seconds, however small the tolerance asked for.
MIN_INTERVAL = 0.01


class StallWatch:
    """
    :param clock: the reactor's ``IReactorTime``, whose ``seconds`` must not jump with the wall clock.
    :param float tolerance: how long what is read may have waited and still count as fresh; the watch ticks
        twice within it.
    """

    def __init__(self, clock, tolerance: float) -> None:
        self.clock = clock
        # Twice the shortest tick at least: with a tiny MAX_CLOCK_OFFSET, heartbeats read on time must still count.
        self.tolerance = max(tolerance, 2 * MIN_INTERVAL)
        self.interval = self.tolerance / 2
        #: When it last ticked; ``None`` before its first tick (the service starting it may start seconds after
        #: the watch was made: no stall, and nothing read before it).
        self._ticked = None
        #: The time between the last two ticks, if the last was late: until the next.
        self._late = 0.0

    def tick(self) -> None:
        now = self.clock.seconds()
        if self._ticked is None:
            self._ticked = now
            return
        gap, self._ticked = now - self._ticked, now
        late = gap > self.interval + self.tolerance
        self._late = gap if late else 0.0
        if late and gap >= LOG_AFTER:
            STALLED.log(seconds=round(gap, 3))

    def held_for(self) -> float:
        """
        The longest what is read now may have waited unread, in seconds.
        """
        if self._ticked is None:
            return 0.0
        return max(self.clock.seconds() - self._ticked, self._late)

    def fresh(self) -> bool:
        """
        Whether what is read now waited at most ``tolerance`` seconds.
        """
        return self.held_for() <= self.tolerance

