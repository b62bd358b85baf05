"""
Giving memory back to the operating system as the store turns over.

A cache's memory is judged by its RSS: that is what a container's memory limit counts. Two things keep freed
memory in the RSS of a process that fills and churns a large store:

- PyPy frees garbage only at its major collections, and it does not count the large byte strings it keeps
  outside its heap towards the next one. The node runs a full collection as the store turns over
  (:meth:`kvresponder.node.Node._reclaim`).
- glibc's ``malloc`` keeps freed chunks in its heap. When live blocks are scattered through it (a store is),
  whole free pages between them stay resident until ``malloc_trim`` hands them back. Measured with 1M keys of
  100 bytes: 52 MB on PyPy and 21 MB on CPython, about a sixth of the store.

:func:`reclaimer` builds the one function that does both, as far as this process can.
"""

import ctypes
import ctypes.util
import gc
import platform
from typing import Callable, Optional


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


def reclaimer(implementation: Optional[str] = None, trimmer=_FIND) -> Optional[Callable[[], None]]:
    """
    The function the node runs as its store turns over: a full collection on PyPy (where garbage waits for
    one), then the C heap's trim (where there is one). ``None`` if there is nothing to do.

    :param implementation: ``platform.python_implementation()`` by default.
    :param trimmer: a function that trims the C heap, or ``None`` for none; :func:`heap_trimmer`'s by default.
    """
    if implementation is None:
        implementation = platform.python_implementation()
    if trimmer is _FIND:
        trimmer = heap_trimmer()
    collect = gc.collect if implementation == "PyPy" else None
    if collect is None and trimmer is None:
        return None

    def reclaim() -> None:
        if collect is not None:
            collect()
        if trimmer is not None:
            trimmer()
    return reclaim
