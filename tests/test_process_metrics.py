"""
The process series of ``/metrics`` (memory, CPU, file descriptors), read from ``/proc`` and labelled with the
tenant like every other series.
"""

import os
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvresponder.metrics import Metrics

PROCESS_FAMILIES = {
    "process_resident_memory_bytes": "gauge", "process_virtual_memory_bytes": "gauge",
    "process_cpu_seconds": "counter", "process_open_fds": "gauge", "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
}


def _process_samples(metrics: Metrics) -> dict:
    families = text_string_to_metric_families(metrics.exposition().decode("utf-8"))
    return {family.name: (family.type, family.samples) for family in families if family.name.startswith("process_")}


def _fake_proc(root, ticks, pagesize):
    """
    A /proc with a boot time and a process "self" whose figures are chosen, so the values can be predicted.
    """
    (root / "self" / "fd").mkdir(parents=True)
    (root / "stat").write_text("cpu  1 2 3\nbtime 1700000000\n")
    # Fields after the command: state, ppid, ... utime (11), stime (12), ... starttime (19), vsize (20), rss (21).
    fields = ["S"] + ["0"] * 40
    fields[11], fields[12] = str(3 * ticks), str(2 * ticks)
    fields[19], fields[20], fields[21] = str(50 * ticks), "987654321", "1000"
    (root / "self" / "stat").write_text("4242 (twistd (x)) " + " ".join(fields) + "\n")
    (root / "self" / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max open files            4096                 1048576              files\n")
    for name in ("0", "1", "2", "7"):
        (root / "self" / "fd" / name).write_text("")
    return 1000 * pagesize


def test_the_process_series_come_from_proc_with_the_tenant_label(tmp_path):
    """
    If /proc holds a process's figures, then /metrics exports each of the six process series once, labelled
    with the tenant only, with the figure converted (pages to bytes, clock ticks to seconds).
    """
    import resource
    ticks = os.sysconf("SC_CLK_TCK")
    rss = _fake_proc(tmp_path, ticks, resource.getpagesize())
    samples = _process_samples(Metrics("t9", proc=str(tmp_path)))
    assert {name: kind for name, (kind, _) in samples.items()} == PROCESS_FAMILIES
    values = {}
    for name, (_, family_samples) in samples.items():
        (sample,) = family_samples
        assert sample.labels == {"tenant": "t9"}, sample
        values[sample.name] = sample.value
    assert values == {
        "process_resident_memory_bytes": rss, "process_virtual_memory_bytes": 987654321,
        "process_cpu_seconds_total": 5.0, "process_open_fds": 4, "process_max_fds": 4096,
        "process_start_time_seconds": 1700000050.0,
    }


def test_without_proc_there_are_no_process_series_and_the_rest_is_unharmed(tmp_path):
    """
    If there is no /proc (macOS), then the process series are left out and the node's own series remain.
    """
    metrics = Metrics("t9", proc=str(tmp_path / "none"))
    assert _process_samples(metrics) == {}
    assert b"kv_build_info" in metrics.exposition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads this process's /proc")
def test_the_real_process_reports_its_own_memory_and_descriptors():
    """
    If the running interpreter (CPython or PyPy) is measured, then its resident memory is some MiB, and a
    file it opens shows as one more descriptor.
    """
    metrics = Metrics("t9")
    before = {name: samples[0].value for name, (_, samples) in _process_samples(metrics).items()}
    assert 1 << 20 < before["process_resident_memory_bytes"] <= before["process_virtual_memory_bytes"]
    with open(os.devnull) as extra:
        during = {name: samples[0].value for name, (_, samples) in _process_samples(metrics).items()}
        opened = str(extra.fileno()) in os.listdir("/proc/self/fd")
    assert opened
    # At least one more: another thread of the test process may open one too meanwhile.
    assert during["process_open_fds"] >= before["process_open_fds"] + 1
