"""
Giving freed memory back to the operating system (kvresponder.reclaim).
"""

import gc
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import kvresponder
from kvresponder.reclaim import heap_trimmer, reclaimer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(kvresponder.__file__)))


def test_on_pypy_the_reclaimer_collects_then_trims(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    reclaim = reclaimer("PyPy", trimmer=lambda: calls.append("trim"))
    reclaim()
    assert calls == ["collect", "trim"]


def test_on_cpython_the_reclaimer_only_trims(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    reclaim = reclaimer("CPython", trimmer=lambda: calls.append("trim"))
    reclaim()
    assert calls == ["trim"]


def test_without_a_trimmer_cpython_has_nothing_to_reclaim_and_pypy_still_collects(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    assert reclaimer("CPython", trimmer=None) is None
    reclaimer("PyPy", trimmer=None)()
    assert calls == ["collect"]


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
