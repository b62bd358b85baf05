"""
The log writer's thread: a log sink that stalls or fails costs log lines, counted, and never a blocked caller.
"""

import fcntl
import json
import os
import threading
import time

import pytest

from kvresponder.log import dropped_lines_notice
from kvresponder.log.service import LOG_LINES_DROPPED
from kvresponder.log.writer import BackgroundWriter, FileSink

from .harness import F_SETPIPE_SZ

#: Long enough for a thread's work on any machine CI runs on; the tests wait on events, not on this.
PATIENCE = 10.0


class StalledSink:
    """
    A sink whose writes block until it is opened, as a full pipe blocks until its reader reads.
    """

    def __init__(self) -> None:
        self.open_ = threading.Event()
        self.entered = threading.Event()
        self.written = bytearray()
        self.closed = False

    def write(self, data) -> int:
        self.entered.set()
        self.open_.wait(PATIENCE)
        self.written += data
        return len(data)

    def close(self) -> None:
        self.closed = True


class FlakySink:
    """
    A sink that takes at most ``most`` bytes a write, and fails when ``failures`` says so (a list of booleans,
    one a write; past its end, writes succeed), as stdout closed by its reader does.
    """

    def __init__(self, failures=(), most: int = 1 << 30) -> None:
        self.failures = list(failures)
        self.most = most
        self.written = bytearray()
        self.closed = False

    def write(self, data) -> int:
        if self.failures and self.failures.pop(0):
            raise BrokenPipeError(32, "Broken pipe")
        taken = bytes(data[:self.most])
        self.written += taken
        return len(taken)

    def close(self) -> None:
        self.closed = True


def lines(count: int, start: int = 0) -> bytes:
    return b"".join(b'{"n": %d}\n' % (index,) for index in range(start, start + count))


def notice(count: int) -> bytes:
    return b'{"dropped": %d}\n' % (count,)


def wait_until(predicate) -> None:
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        assert time.monotonic() < deadline, "not within %ss" % (PATIENCE,)
        time.sleep(0.005)


@pytest.fixture
def stalled():
    sink = StalledSink()
    writer = BackgroundWriter(sink, notice, max_waiting=100)
    yield sink, writer
    sink.open_.set()
    assert writer.stop(PATIENCE)


def test_a_stalled_sink_never_blocks_the_writer_and_lines_past_the_limit_are_dropped_and_counted(stalled):
    """
    If the sink stops taking writes, then ``write`` still returns at once: chunks are kept up to the limit
    (the first, being written, included), and the lines of those beyond it are dropped and counted.
    """
    sink, writer = stalled
    first = lines(3)
    writer.write(first)
    assert sink.entered.wait(PATIENCE)
    # The first chunk is in the sink's blocked write, and still counts against the limit; the second fits. Each
    # later batch would fit beside the second alone, and not beside both.
    writer.write(lines(2, 3))
    batch = len(lines(6, 100))
    assert len(lines(2, 3)) + batch <= 100 < len(first) + len(lines(2, 3)) + batch
    started = time.monotonic()
    for index in range(50):
        writer.write(lines(6, 100 + index * 6))
    assert time.monotonic() - started < PATIENCE / 2
    assert writer.dropped == 300
    assert sink.written == b""


def test_once_the_sink_takes_writes_again_a_notice_says_how_many_lines_were_dropped_where(stalled):
    """
    If lines were dropped while the sink stalled, then once it writes again the kept lines come out, in
    order, with the notice of how many were dropped where they were; nothing is left waiting.
    """
    sink, writer = stalled
    writer.write(lines(3))
    assert sink.entered.wait(PATIENCE)
    writer.write(lines(2, 3))
    writer.write(lines(10, 5))     # beyond the limit: dropped
    writer.write(lines(10, 15))    # dropped
    sink.open_.set()
    assert writer.drain(PATIENCE)
    writer.write(lines(1, 25))
    assert writer.drain(PATIENCE)
    assert bytes(sink.written) == lines(5) + notice(20) + lines(1, 25)
    assert writer.dropped == 20


def test_a_sink_that_takes_part_of_a_write_gets_the_rest_next():
    """
    If the sink takes a few bytes at a time (``os.write`` on a pipe may), then every byte still arrives, in order.
    """
    sink = FlakySink(most=7)
    writer = BackgroundWriter(sink, notice)
    writer.write(lines(20))
    writer.write(lines(20, 20))
    assert writer.drain(PATIENCE)
    assert bytes(sink.written) == lines(40) and writer.dropped == 0
    assert writer.stop(PATIENCE)


def test_a_failing_sink_loses_its_lines_counts_them_and_the_writer_goes_on():
    """
    If a write to the sink fails (its reader closed it), then the lines in it are counted as dropped, no
    exception reaches the caller, and the next chunk goes out after a notice of the loss.
    """
    sink = FlakySink(failures=[True])
    writer = BackgroundWriter(sink, notice)
    try:
        writer.write(lines(4))
        wait_until(lambda: writer.dropped == 4)
        # Nothing more can be written until another chunk comes: a stopping node's wait ends at once, saying
        # that not all was written.
        started = time.monotonic()
        assert not writer.drain(PATIENCE)
        assert time.monotonic() - started < PATIENCE / 2
        writer.write(lines(2, 4))
        assert writer.drain(PATIENCE)
        assert bytes(sink.written) == notice(4) + lines(2, 4)
    finally:
        assert writer.stop(PATIENCE)


def test_a_sink_that_keeps_failing_is_tried_once_a_chunk_and_every_line_is_counted():
    """
    If the sink fails every write (stdout's reader gone for good, a full disk), then the thread tries it once for
    each chunk handed over, not in a loop, and every line handed over is counted as dropped.
    """
    sink = FlakySink(failures=[True] * 10000)
    writer = BackgroundWriter(sink, notice)
    try:
        for chunk in range(20):
            writer.write(lines(5, chunk * 5))
            time.sleep(0.005)
        wait_until(lambda: writer.dropped == 100)
        time.sleep(0.2)
        attempts = 10000 - len(sink.failures)
        assert attempts <= 2 * 20, attempts   # a chunk, and the notice before it
        assert writer.dropped == 100 and sink.written == b""
    finally:
        assert writer.stop(PATIENCE)


def test_a_write_that_fails_halfway_loses_the_lines_it_cut_and_the_notice_starts_a_line_of_its_own():
    """
    If the sink takes part of a chunk and then fails, then the lines whose end was not written are counted as
    lost, and the notice that follows begins on a new line, not glued to the cut one.
    """
    sink = FlakySink(failures=[False, True], most=12)
    writer = BackgroundWriter(sink, notice)
    try:
        writer.write(lines(3))       # 27 bytes: 12 taken, then the write fails
        wait_until(lambda: writer.dropped == 2)
        writer.write(lines(1, 3))
        assert writer.drain(PATIENCE)
        assert bytes(sink.written) == lines(3)[:12] + b"\n" + notice(2) + lines(1, 3)
    finally:
        assert writer.stop(PATIENCE)


def test_drain_gives_up_at_its_timeout_on_a_sink_that_takes_nothing(stalled):
    """
    If the sink takes nothing, then a stopping node's wait for its last lines ends at its timeout, saying
    they were not all written, rather than hang the exit.
    """
    sink, writer = stalled
    writer.write(lines(1))
    assert sink.entered.wait(PATIENCE)
    started = time.monotonic()
    assert not writer.drain(0.2)
    assert 0.2 <= time.monotonic() - started < PATIENCE / 2


def test_stop_writes_out_what_is_waiting_closes_the_sink_and_later_lines_are_dropped():
    """
    If the writer is stopped, then what was handed over is written first and the sink closed; lines handed
    over after are counted as dropped, not written to a sink the process is done with.
    """
    sink = FlakySink()
    writer = BackgroundWriter(sink, notice)
    writer.write(lines(3))
    assert writer.stop(PATIENCE)
    writer.write(lines(2, 3))
    assert bytes(sink.written) == lines(3) and sink.closed
    assert writer.dropped == 2


def test_a_writer_stopped_on_a_failing_sink_ends_its_thread():
    """
    If the sink fails while the writer stops, then the thread ends anyway (the lines are counted), rather
    than try the sink again and again.
    """
    sink = FlakySink(failures=[True] * 1000)
    writer = BackgroundWriter(sink, notice)
    writer.write(lines(3))
    assert writer.stop(PATIENCE)
    assert writer.dropped == 3 and len(sink.failures) >= 998


def test_a_real_pipe_nobody_reads_holds_up_no_writer_and_gives_every_kept_line_once_read():
    """
    If the writer's sink is a real pipe that nobody reads (stdout in a pod whose log reader is stuck), then
    writes still return at once, and once the pipe is read, the lines kept come out whole and in order, with
    a notice counting those dropped.
    """
    read_end, write_end = os.pipe()
    # A pipe's capacity depends on the kernel's page size: make it the usual 64 KiB.
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 64 * 1024)
    writer = BackgroundWriter(FileSink(write_end), notice, max_waiting=64 * 1024)
    try:
        chunk_lines = 1000
        started = time.monotonic()
        for chunk in range(40):  # about four times what the pipe and the limit hold
            writer.write(lines(chunk_lines, chunk * chunk_lines))
        assert time.monotonic() - started < PATIENCE / 2
        assert writer.dropped > 0
        received = bytearray()

        def read():
            while True:
                data = os.read(read_end, 1 << 16)
                if not data:
                    return
                received.extend(data)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert writer.drain(PATIENCE)
    finally:
        assert writer.stop(PATIENCE)  # closes the write end: the reader sees the end
    reader.join(PATIENCE)
    os.close(read_end)
    written = [json.loads(line) for line in bytes(received).splitlines()]
    numbers = [line["n"] for line in written if "n" in line]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert len(numbers) + sum(line.get("dropped", 0) for line in written) == 40 * chunk_lines
    assert writer.dropped == 40 * chunk_lines - len(numbers)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_writes_its_own_lines_and_the_parent_those_waiting_at_the_fork(tmp_path):
    """
    If the process forks with lines waiting (``twistd`` without ``-n`` forks after making the service), then
    the child's writer, with a thread of its own, writes the child's lines, and the lines waiting at the fork
    are written once, by the parent.
    """
    path = str(tmp_path / "log")
    parent = os.getpid()
    stalled = StalledSink()

    class Sink:
        """The parent's writes stall; the child's go to the file."""
        def write(self, data) -> int:
            if os.getpid() == parent:
                return stalled.write(data)
            with open(path, "ab") as log:
                return log.write(data)

        def close(self) -> None:
            pass

    writer = BackgroundWriter(Sink(), notice)
    writer.write(lines(1))
    assert stalled.entered.wait(PATIENCE)   # the parent's thread is now held in a write
    writer.write(lines(2, 1))               # waiting, not being written
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            writer.write(lines(1, 3))
            status = 0 if writer.drain(PATIENCE) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    stalled.open_.set()
    assert writer.stop(PATIENCE)
    assert os.waitstatus_to_exitcode(status) == 0
    with open(path, "rb") as log:
        assert log.read() == lines(1, 3)
    assert bytes(stalled.written) == lines(3)


def test_a_sink_for_a_file_appends_to_it_and_one_for_stdout_writes_to_its_descriptor_and_leaves_it_open(tmp_path):
    """
    If log lines go to ``LOG_FILE``, then the file is made if missing and appended to, not truncated, by each new
    sink; if they go to stdout, then they are written to stdout's descriptor after what the stream held, and
    stopping the writer leaves that descriptor open.
    """
    path = str(tmp_path / "node.log")
    for start in (0, 2):
        writer = BackgroundWriter(FileSink.for_file(path), notice)
        writer.write(lines(2, start))
        assert writer.drain(PATIENCE) and writer.stop(PATIENCE)
    with open(path, "rb") as log:
        assert log.read() == lines(4)
    read_end, write_end = os.pipe()
    stdout = os.fdopen(write_end, "w")
    try:
        stdout.write("held\n")
        writer = BackgroundWriter(FileSink.for_stream(stdout), notice)
        writer.write(lines(1))
        assert writer.drain(PATIENCE) and writer.stop(PATIENCE)
        stdout.write("after\n")
        stdout.flush()  # would fail on a closed descriptor
    finally:
        stdout.close()
    with os.fdopen(read_end, "rb") as received:
        assert received.read() == b"held\n" + lines(1) + b"after\n"


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
