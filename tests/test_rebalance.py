"""
The rebalancer's walks over the store yield to the reactor by time as well as by count, so that a pass over
a large store (cold code on PyPy, a slow machine) does not hold requests up.
"""

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from kvresponder.rebalance import CHECK_EVERY, CHUNK, SLICE, _Slices


class _Ticking:
    """A clock that moves ``step`` seconds every time it is read: a walk doing slow work per entry."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def seconds(self) -> float:
        self.now += self.step
        return self.now


def _yield_points(clock, entries: int):
    slices = _Slices(clock)
    return [index for index in range(1, entries + 1) if slices.due()]


def test_a_fast_walk_yields_only_every_chunk_of_entries():
    assert _yield_points(Clock(), 3 * CHUNK + 5) == [CHUNK, 2 * CHUNK, 3 * CHUNK]


def test_a_slow_walk_yields_once_its_slice_of_time_is_spent():
    # Each look at the clock finds 0.6 of a slice more gone: the walk yields at the second look.
    points = _yield_points(_Ticking(SLICE * 0.6), 10 * CHECK_EVERY)
    assert points[0] == 2 * CHECK_EVERY
    assert points[0] < CHUNK


def test_the_slice_restarts_after_a_pause():
    clock = Clock()
    slices = _Slices(clock)
    clock.advance(SLICE * 2)
    assert [slices.due() for _ in range(CHECK_EVERY)][-1] is True
    d = ensureDeferred(slices.pause())
    clock.advance(0)
    assert d.called
    assert not any(slices.due() for _ in range(CHECK_EVERY))
