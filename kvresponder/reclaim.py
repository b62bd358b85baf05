"""
Giving memory back to the operating system as the store turns over.

A cache's memory is judged by its RSS: that is what a container's memory limit counts. Two things keep freed
memory in the RSS of a process that fills and churns a large store:

- PyPy frees garbage only at its major collections, and it does not count the large byte strings it keeps
  outside its heap towards the next one. The node runs a major collection as the store turns over
  (:meth:`kvresponder.node.Node._reclaim`), step by step between requests.
- glibc's ``malloc`` keeps freed chunks in its heap. When live blocks are scattered through it (a store is),
  whole free pages between them stay resident until ``malloc_trim`` hands them back: a sizeable share of the
  store's own size (bench/results/HISTORY.md).

:func:`reclaimer` builds the one function that does both, as far as this process can.
"""

import ctypes
import ctypes.util
import gc
import platform
from typing import Callable, Optional

from eliot import write_traceback


def heap_trimmer() -> Optional[Callable[[], bool]]:
    """
    ``malloc_trim(0)`` of the C library, if it has one (glibc), as a function that returns whether memory was
    released; or ``None`` (musl, macOS).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def trim_heap() -> bool:
        return bool(trim(0))
    return trim_heap


_FIND = object()


def reclaimer(clock, implementation: Optional[str] = None, trimmer=_FIND,
              step=_FIND) -> Optional[Callable[[], bool]]:
    """
    The function the node runs as its store turns over: a major collection on PyPy (where garbage waits for
    one), then the C heap's trim (where there is one). ``None`` if there is nothing to do.

    On PyPy the collection is incremental: one step of the major collection (``gc.collect_step``) a reactor
    turn, so that requests are served between the steps, and the trim after the last step. ``gc.collect()``
    would stop the node for the whole of it, longer than a request should wait on a large heap; each step
    takes a fraction of that. If PyPy had a major collection under way already, that one is
    finished and one more whole collection runs, since the first may keep what was dropped after it began
    marking. Asked again while one is under way, it does nothing and returns ``False``. A step that fails is
    logged, and ends the reclaim.

    :param clock: ``IReactorTime``: the next step is scheduled on it.
    :param implementation: ``platform.python_implementation()`` by default.
    :param trimmer: a function that trims the C heap, or ``None`` for none; :func:`heap_trimmer`'s by default.
    :param step: runs one step of a major collection and returns an object whose ``major_is_done`` says
        whether it finished one and whose ``oldstate`` is the collector's state before the step
        (``STATE_SCANNING``, 0, when none was under way); ``gc.collect_step`` by default on PyPy. ``None``: a
        full ``gc.collect()``.
    """
    if implementation is None:
        implementation = platform.python_implementation()
    if trimmer is _FIND:
        trimmer = heap_trimmer()
    if implementation != "PyPy":
        if trimmer is None:
            return None

        def trim_only() -> bool:
            trimmer()
            return True
        return trim_only
    if step is _FIND:
        step = getattr(gc, "collect_step", None)

    def trim() -> None:
        if trimmer is not None:
            trimmer()

    if step is None:
        def collect_and_trim() -> bool:
            gc.collect()
            trim()
            return True
        return collect_and_trim

    #: Major collections still to finish: empty when none is under way.
    remaining = []

    def next_step() -> None:
        try:
            stats = step()
            if not remaining:
                # The first step. A major collection PyPy had already begun marking may keep what was dropped
                # since it began: finish it, then run one whole collection more.
                remaining.append(1 if stats.oldstate == getattr(stats, "STATE_SCANNING", 0) else 2)
            if stats.major_is_done:
                remaining[0] -= 1
                if remaining[0] == 0:
                    del remaining[:]
                    trim()
                    return
            clock.callLater(0, next_step)
        except Exception:
            del remaining[:]
            write_traceback()

    def reclaim() -> bool:
        """
        Start reclaiming; ``False`` if a reclaim is still under way (this one is then not started).
        """
        if remaining:
            return False
        next_step()
        return True
    return reclaim
