"""
The in-process bench scripts still run against the code: they build the real classes by hand, so a change to a
constructor breaks them without breaking the service.
"""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.parametrize("extra", [[], ["--single"]], ids=["replicated", "single"])
def test_write_path_measures_a_round_of_writes_all_answered(extra):
    """
    If ``bench/write_path.py`` runs one small round, then it exits cleanly (it fails itself when a write goes
    unanswered) and prints the coordinator's µs a write.
    """
    done = subprocess.run([sys.executable, os.path.join(BENCH, "write_path.py"), "--rounds", "1", "--writes", "300"]
                          + extra, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "round 1: coordinator" in done.stdout and "µs a write" in done.stdout


def test_the_ab_windows_give_every_cluster_the_same_mean_place_in_the_run():
    """
    If ``bench/ab.py`` measures four clusters over two or more rounds, then each cluster gets a window every
    round, and over an even number of rounds every cluster's windows sit at the same mean place in the run, so
    that a drift of the VM's speed over the run favours none of them.
    """
    sys.path.insert(0, BENCH)
    try:
        from ab import schedule
    finally:
        sys.path.remove(BENCH)
    for rounds in (2, 4):
        order = schedule(4, rounds)
        assert sorted(order) == sorted(list(range(4)) * rounds)
        places = {cluster: [place for place, each in enumerate(order) if each == cluster] for cluster in range(4)}
        assert len({sum(found) / len(found) for found in places.values()}) == 1, places
    assert schedule(4, 1) == [0, 1, 2, 3]


@pytest.mark.parametrize("path, part", [
    ("/opt/kv-pypy/lib/pypy3.11/site-packages/twisted/internet/tcp.py", "system calls"),
    ("/work/main/kvresponder/sendnow.py", "system calls"),
    ("/opt/kv-pypy/lib/pypy3.11/site-packages/twisted/web/http.py", "Twisted's HTTP server"),
    ("/opt/kv-pypy/lib/pypy3.11/site-packages/twisted/protocols/basic.py", "Twisted's HTTP server"),
    ("/work/main/kvresponder/http/fastlane.py", "fast lane"),
    ("/work/main/kvresponder/log/__init__.py", "logging"),
    ("/opt/kv-pypy/lib/pypy3.11/site-packages/eliot/_action.py", "logging"),
    ("/usr/lib/pypy3.11/json/encoder.py", "JSON"),
    ("/work/main/kvresponder/store.py", "store"),
    ("/opt/kv-pypy/lib/pypy3.11/site-packages/twisted/internet/epollreactor.py", "reactor loop"),
    ("/work/main/kvresponder/ring.py", "everything else"),
    ("<builtin>/__builtin__/app_functional.py", "everything else"),
])
def test_a_profiled_functions_file_names_its_part_of_the_write(path, part):
    """
    If ``bench/profile_parts.py`` sorts a sampled function by its file, then each file lands in the part of a
    write it belongs to, and a file of no part in "everything else".
    """
    sys.path.insert(0, BENCH)
    try:
        from profile_parts import part_of
    finally:
        sys.path.remove(BENCH)
    assert part in part_of(path)


def test_the_listing_bench_checks_its_pages_against_a_full_sort_and_prints_the_ratio():
    """
    If ``bench/listing.py`` runs a few small rounds, then every page it lists equals the reference's (it fails
    itself otherwise), and it prints both times and their ratio.
    """
    done = subprocess.run([sys.executable, os.path.join(BENCH, "listing.py"), "--keys", "3000", "--rounds", "5",
                           "--writes", "100"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "every key sorted (reference)" in done.stdout and "ratio: " in done.stdout
