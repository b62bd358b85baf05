"""
The log writer's thread: a log stream that stalls or fails costs log lines, counted, and never a blocked caller.
"""

import io
import json
import threading
import time

import pytest

from kvresponder.log import dropped_lines_notice
from kvresponder.log.service import LOG_LINES_DROPPED
from kvresponder.log.writer import BackgroundWriter

#: Long enough for a thread's work on any machine CI runs on; the tests wait on events, not on this.
PATIENCE = 10.0


class StalledStream(io.RawIOBase):
    """
    A binary stream whose writes block until it is opened, as a full pipe blocks until its reader reads.
    """

    def __init__(self) -> None:
        self.open_ = threading.Event()
        self.entered = threading.Event()
        self.written = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.entered.set()
        self.open_.wait(PATIENCE)
        self.written += data
        return len(data)


class BrokenStream(io.RawIOBase):
    """
    A binary stream that fails its first ``failures`` writes, as stdout closed by its reader does.
    """

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.failures:
            self.failures -= 1
            raise BrokenPipeError(32, "Broken pipe")
        self.written += data
        return len(data)


def lines(count: int, start: int = 0) -> bytes:
    return b"".join(b'{"n": %d}\n' % (index,) for index in range(start, start + count))


def notice(count: int) -> bytes:
    return b'{"dropped": %d}\n' % (count,)


@pytest.fixture
def stalled():
    stream = StalledStream()
    writer = BackgroundWriter(stream, notice, max_waiting=100)
    yield stream, writer
    stream.open_.set()
    assert writer.stop(PATIENCE)


def test_a_stalled_stream_never_blocks_the_writer_and_lines_past_the_limit_are_dropped_and_counted(stalled):
    """
    If the stream stops taking writes, then ``write`` still returns at once: chunks are kept up to the limit
    (the first, being written, included), and the lines of those beyond it are dropped and counted.
    """
    stream, writer = stalled
    first = lines(3)
    writer.write(first)
    assert stream.entered.wait(PATIENCE)
    # The first chunk is in the stream's blocked write, and still counts against the limit; the second fits.
    writer.write(lines(2, 3))
    assert len(first) + len(lines(2, 3)) + len(lines(10, 100)) > 100 >= len(first) + len(lines(2, 3))
    started = time.monotonic()
    for batch in range(50):
        writer.write(lines(10, 100 + batch * 10))
    assert time.monotonic() - started < PATIENCE / 2
    assert writer.dropped == 500
    assert stream.written == b""


def test_once_the_stream_takes_writes_again_a_notice_says_how_many_lines_were_dropped(stalled):
    """
    If lines were dropped while the stream stalled, then once it writes again the kept lines come out, in
    order, then the notice of how many were dropped before the next lines; nothing is left waiting.
    """
    stream, writer = stalled
    writer.write(lines(3))
    assert stream.entered.wait(PATIENCE)
    writer.write(lines(2, 3))
    writer.write(lines(10, 5))     # beyond the limit: dropped
    writer.write(lines(10, 15))    # dropped
    stream.open_.set()
    assert writer.drain(PATIENCE)
    writer.write(lines(1, 25))
    assert writer.drain(PATIENCE)
    assert bytes(stream.written) == lines(5) + notice(20) + lines(1, 25)
    assert writer.dropped == 20


def test_a_failing_stream_loses_its_lines_counts_them_and_the_writer_goes_on():
    """
    If a write to the stream fails (its reader closed it), then the lines in it are counted as dropped, no
    exception reaches the caller, and the next chunk goes out after a notice of the loss.
    """
    stream = BrokenStream(failures=1)
    writer = BackgroundWriter(stream, notice)
    try:
        writer.write(lines(4))
        deadline = time.monotonic() + PATIENCE
        while writer.dropped < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.dropped == 4
        writer.write(lines(2, 4))
        assert writer.drain(PATIENCE)
        assert bytes(stream.written) == notice(4) + lines(2, 4)
    finally:
        assert writer.stop(PATIENCE)


def test_drain_gives_up_at_its_timeout_on_a_stream_that_takes_nothing(stalled):
    """
    If the stream takes nothing, then a stopping node's wait for its last lines ends at its timeout, saying
    they were not all written, rather than hang the exit.
    """
    stream, writer = stalled
    writer.write(lines(1))
    assert stream.entered.wait(PATIENCE)
    started = time.monotonic()
    assert not writer.drain(0.2)
    assert 0.2 <= time.monotonic() - started < PATIENCE / 2


def test_stop_writes_out_what_is_waiting_and_later_lines_are_dropped():
    """
    If the writer is stopped, then what was handed over is written first; lines handed over after are counted
    as dropped, not written to a stream the process is done with.
    """
    stream = io.BytesIO()
    writer = BackgroundWriter(stream, notice)
    writer.write(lines(3))
    assert writer.stop(PATIENCE)
    writer.write(lines(2, 3))
    assert stream.getvalue() == lines(3)
    assert writer.dropped == 2


def test_the_dropped_lines_notice_is_a_stamped_eliot_message_of_its_type():
    """
    The notice is one JSON line that eliot-tree can place: a ``log-lines-dropped`` message of its type, with
    the count, a task of its own and the node's stamp.
    """
    line = dropped_lines_notice("t1", "n1")(7)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    message = json.loads(line)
    assert message["message_type"] == LOG_LINES_DROPPED.message_type == "kvresponder:service:log-lines-dropped"
    assert message["lines"] == 7 and message["task_level"] == [1]
    assert (message["tenant"], message["node"]) == ("t1", "n1")
    assert isinstance(message["timestamp"], float) and len(message["task_uuid"]) == 36
    assert set(message) == {"timestamp", "message_type", "lines", "task_uuid", "task_level", "tenant", "node"}


def test_a_writer_stopped_on_a_failing_stream_ends_its_thread():
    """
    If the stream fails while the writer stops, then the thread ends anyway (the lines are counted), rather
    than try the stream again and again.
    """
    stream = BrokenStream(failures=1000)
    writer = BackgroundWriter(stream, notice)
    writer.write(lines(3))
    assert writer.stop(PATIENCE)
    assert writer.dropped == 3 and stream.failures >= 998


def test_the_dropped_lines_counter_is_read_from_its_reader_at_each_scrape():
    """
    If a reader is registered for ``kv_log_lines_dropped``, then each scrape exports its value as a counter
    with the tenant label; a name that is not a known counter is refused.
    """
    from prometheus_client.parser import text_string_to_metric_families

    from kvresponder.metrics import Metrics

    metrics = Metrics("t1")
    metrics.register_live_gauges(dict)  # as a node does
    dropped = [0]
    metrics.register_counter("kv_log_lines_dropped", lambda: dropped[0])

    def sample():
        families = text_string_to_metric_families(metrics.exposition().decode("utf-8"))
        [family] = [family for family in families if family.name == "kv_log_lines_dropped"]
        [one] = family.samples
        return family.type, one.name, one.labels, one.value

    assert sample() == ("counter", "kv_log_lines_dropped_total", {"tenant": "t1"}, 0.0)
    dropped[0] = 42
    assert sample()[3] == 42.0
    with pytest.raises(ValueError):
        metrics.register_counter("kv_peers_suspected", lambda: 1)
