"""
Giving freed memory back to the operating system (kvresponder.reclaim).
"""

import gc
import os
import platform
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

import kvresponder
from kvresponder.reclaim import heap_trimmer, reclaimer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(kvresponder.__file__)))


class _Steps:
    """
    A major collection that is done after ``count`` steps, recording each step in ``calls``.
    """

    def __init__(self, count: int, calls: list) -> None:
        self.left = count
        self.calls = calls

    def __call__(self):
        self.left -= 1
        self.calls.append("step")
        return SimpleNamespace(major_is_done=self.left == 0, oldstate=self.oldstate)

    #: The collector's state before the step: 0 (scanning) when no collection was under way.
    oldstate = 0


def run_next_turn(clock: Clock) -> None:
    """
    Run what is due in the reactor's next turn: the calls already scheduled for now, not those they schedule
    in turn (``Clock.advance`` would run those too; the reactor leaves them for the turn after).
    """
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    assert due, "nothing was scheduled for the next turn"
    for call in due:
        clock.calls.remove(call)
        call.func(*call.args, **call.kw)


def test_on_pypy_the_reclaimer_runs_one_collection_step_a_reactor_turn_then_trims(monkeypatch):
    """
    If the node reclaims on PyPy, then the major collection runs one step at once and one more each time the
    reactor comes round, never all together, and the trim follows the step that finished it.
    """
    calls = []
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    clock = Clock()
    reclaim = reclaimer(clock, "PyPy", trimmer=lambda: calls.append("trim"), step=_Steps(3, calls))
    reclaim()
    assert calls == ["step"]
    run_next_turn(clock)
    assert calls == ["step", "step"]
    run_next_turn(clock)
    assert calls == ["step", "step", "step", "trim"]
    assert clock.getDelayedCalls() == []


def test_a_reclaim_asked_for_while_one_is_under_way_starts_no_second_one():
    calls = []
    clock = Clock()
    steps = _Steps(2, calls)
    reclaim = reclaimer(clock, "PyPy", trimmer=lambda: calls.append("trim"), step=steps)
    assert reclaim() is True
    assert reclaim() is False
    assert calls == ["step"]
    run_next_turn(clock)
    assert calls == ["step", "step", "trim"]
    # Once finished, the next one starts afresh.
    steps.left = 1
    assert reclaim() is True
    assert calls == ["step", "step", "trim", "step", "trim"]


def test_a_collection_already_under_way_is_finished_and_followed_by_a_whole_one():
    """
    If PyPy was already marking when the reclaim began (what was dropped since may survive that collection),
    then the reclaim finishes it and runs one whole collection more before it trims.
    """
    calls = []
    clock = Clock()
    answers = iter([(1, True), (0, False), (1, False), (2, True)])

    def step():
        oldstate, done = next(answers)
        calls.append("step")
        return SimpleNamespace(oldstate=oldstate, major_is_done=done)
    reclaim = reclaimer(clock, "PyPy", trimmer=lambda: calls.append("trim"), step=step)
    assert reclaim() is True
    assert calls == ["step"]
    for _ in range(3):
        run_next_turn(clock)
    assert calls == ["step", "step", "step", "step", "trim"]
    assert clock.getDelayedCalls() == []


def test_a_step_that_fails_is_logged_and_does_not_leave_the_reclaimer_stuck(monkeypatch):
    """
    If a later step fails (in a reactor turn of its own), then the failure is logged with its traceback, the
    reclaim ends, and the next one starts afresh.
    """
    import sys as _sys

    import kvresponder.reclaim
    calls = []
    logged = []
    monkeypatch.setattr(kvresponder.reclaim, "write_traceback", lambda: logged.append(_sys.exc_info()[1]))
    clock = Clock()
    answers = [SimpleNamespace(oldstate=0, major_is_done=False), RuntimeError("boom"),
               SimpleNamespace(oldstate=0, major_is_done=True)]

    def step():
        answer = answers.pop(0)
        calls.append("step")
        if isinstance(answer, Exception):
            raise answer
        return answer
    reclaim = reclaimer(clock, "PyPy", trimmer=lambda: calls.append("trim"), step=step)
    assert reclaim() is True
    run_next_turn(clock)
    assert calls == ["step", "step"]
    assert clock.getDelayedCalls() == []
    assert [str(error) for error in logged] == ["boom"]
    assert reclaim() is True
    assert calls == ["step", "step", "step", "trim"]


def test_a_pypy_without_collection_steps_collects_at_once_then_trims(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    reclaimer(Clock(), "PyPy", trimmer=lambda: calls.append("trim"), step=None)()
    assert calls == ["collect", "trim"]


def test_on_cpython_the_reclaimer_only_trims(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    reclaim = reclaimer(Clock(), "CPython", trimmer=lambda: calls.append("trim"))
    reclaim()
    assert calls == ["trim"]


def test_without_a_trimmer_cpython_has_nothing_to_reclaim_and_pypy_still_collects(monkeypatch):
    calls = []
    clock = Clock()
    assert reclaimer(clock, "CPython", trimmer=None) is None
    reclaimer(clock, "PyPy", trimmer=None, step=_Steps(1, calls))()
    assert calls == ["step"]


@pytest.mark.skipif(platform.python_implementation() != "PyPy", reason="PyPy's incremental collector")
def test_on_pypy_the_real_collector_finishes_a_major_collection_in_steps_and_frees_the_garbage():
    """
    If the real reclaimer runs on PyPy with garbage in the old generation, then PyPy's own steps finish a
    major collection within a bounded number of reactor turns, and the garbage's finalizer has run.
    """
    import weakref

    class Garbage:
        pass

    clock = Clock()
    trims = []
    reclaim = reclaimer(clock, trimmer=lambda: trims.append(True))
    gone = []
    doomed = Garbage()
    reference = weakref.ref(doomed, lambda _: gone.append(True))
    gc.collect()  # now in the old generation
    del doomed
    reclaim()
    turns = 0
    while not trims and turns < 10000:
        run_next_turn(clock)
        turns += 1
    assert trims == [True]
    assert clock.getDelayedCalls() == []
    assert reference() is None and gone == [True]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_the_heap_trimmer_gives_scattered_free_pages_back_to_the_os():
    """
    If most of a large C heap is freed while a few blocks stay live throughout it (as a store's are), then
    the freed pages stay resident until the heap trimmer runs, and it gives at least half of them back. Run in
    a child process, so that its heap is its own.
    """
    assert heap_trimmer() is not None, "glibc has malloc_trim"
    script = textwrap.dedent("""
        import ctypes, ctypes.util, sys
        sys.path.insert(0, %r)
        from kvresponder.reclaim import heap_trimmer
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() alone gives nothing back
        def rss():
            with open("/proc/self/status") as status:
                return [int(l.split()[1]) * 1024 for l in status if l.startswith("VmRSS")][0]
        blocks = []
        for _ in range(100000):
            block = libc.malloc(1024)
            ctypes.memset(block, 1, 1024)
            blocks.append(block)
        for index, block in enumerate(blocks):
            if index %% 64:
                libc.free(block)
        freed = rss()
        assert heap_trimmer()() is True
        print(freed - rss())
    """ % (REPO,))
    output = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, check=True).stdout
    released = int(output)
    # About 98 MB were freed in scattered runs of 63 KiB; at least half must go back.
    assert released > 48 * 1024 * 1024, released
