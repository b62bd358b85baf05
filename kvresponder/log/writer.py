"""
Log lines written from a thread of their own, so that a log reader that falls behind never stalls the reactor.

In a pod, a node's stdout is a pipe that the container runtime reads and copies to disk. When that reader falls
behind (a slow disk, a runtime restarting) or stops, the pipe fills, and a write to it blocks: on the reactor
thread, every request of the node would wait with it, and its peers would find it unanswering. A log file
(``LOG_FILE``) can stall the same way on a slow disk.

So the node's log destination hands its lines, a chunk at a time, to a :class:`BackgroundWriter`, which does the
blocking writes in its own thread, with ``os.write`` on a file descriptor (:class:`FileSink`): no Python stream object
(and no lock of one) is shared with the rest of the process. It keeps at most ``max_waiting`` bytes waiting; a
chunk beyond that is dropped and its lines counted. Once the stream takes writes again, the writer first writes
a line saying how many were dropped, where they were. Losing log lines is the lesser harm: the node keeps
serving, and the count shows in ``kv_log_lines_dropped_total``.
"""

import os
import select
import threading
import weakref
from typing import Callable, List, Optional, Union

#: Bytes of log lines a writer keeps waiting for its stream at most (``LOG_BUFFER``): a few seconds of a node's
#: info-level lines at full write load.
MAX_WAITING = 16 * 1024 * 1024


class FileSink:
    """
    Where a :class:`BackgroundWriter` writes: a file descriptor, written with ``os.write`` (which may write part
    of what it is given, and then says how much).

    :param fd: the descriptor: stdout's, or a log file's.
    :param owned: whether the sink closes it (a log file's) or leaves it open (stdout's).
    """

    def __init__(self, fd: int, owned: bool = True) -> None:
        self._fd = fd
        self._owned = owned

    @classmethod
    def for_stream(cls, stream) -> "FileSink":
        """
        A sink writing to the descriptor of ``stream`` (stdout) itself, not through the stream's object (nor its
        lock): wherever that descriptor leads when a line is written. A daemonized ``twistd`` points it at
        ``/dev/null`` after the service is made.
        """
        stream.flush()
        return cls(stream.fileno(), owned=False)

    @classmethod
    def for_file(cls, path: str) -> "FileSink":
        """
        A sink appending to the file at ``path``, made if missing.
        """
        return cls(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644))

    def write(self, data: memoryview) -> int:
        """
        Write some of ``data``, waiting until the descriptor takes some; how much it took.
        """
        while True:
            try:
                return os.write(self._fd, data)
            except BlockingIOError:
                # Someone made the descriptor non-blocking (a shared pipe or terminal): wait here, in this thread.
                select.select([], [self._fd], [], 1.0)

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)


class BackgroundWriter:
    """
    A sink's writes, done in a thread of its own. ``write`` never waits for the sink.

    The thread starts with the first write, and again in a forked child (``twistd`` without ``-n`` forks after
    the service is made), which writes only its own lines: those waiting at the fork are the parent's to write.

    :param sink: has ``write(memoryview) -> int`` (see :class:`FileSink`); only this writer's thread calls it.
    :param notice: ``notice(count)``, the line (bytes, newline included) written where ``count`` lines were
        dropped; called in the writer's thread.
    :param max_waiting: bytes kept waiting at most; a chunk written while nothing waits is always taken.
    """

    def __init__(self, sink, notice: Callable[[int], bytes], max_waiting: int = MAX_WAITING,
                 name: str = "kvresponder-log-writer") -> None:
        self._sink = sink
        self._notice = notice
        self._max_waiting = max_waiting
        self._name = name
        self._changed = threading.Condition(threading.Lock())
        #: Chunks to write, in order; an ``int`` in their place counts the lines dropped there.
        self._queue: List[Union[bytes, int]] = []
        #: Bytes of the chunks handed over and not yet written: those queued and the one being written.
        self._waiting = 0
        self._writing = False
        #: The last write failed: the sink takes nothing now.
        self._failing = False
        #: The last byte written ended a line (a notice must not be glued to half a line).
        self._line_ended = True
        self._dropped = 0
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: this() is not None and this()._forked())

    @property
    def dropped(self) -> int:
        """
        Lines dropped since the writer started: refused while too much was waiting, or lost to a failed write.
        """
        return self._dropped

    def write(self, data: bytes) -> None:
        """
        Hand ``data`` (whole lines) to the writer's thread; if too much is already waiting, or the writer was
        stopped, drop it.
        """
        with self._changed:
            if self._stopping or (self._waiting and self._waiting + len(data) > self._max_waiting):
                lines = data.count(b"\n")
                self._dropped += lines
                if not self._stopping:
                    self._mark_dropped(lines)
                return
            self._queue.append(data)
            self._waiting += len(data)
            if self._thread is None:
                self._start()
            self._changed.notify_all()

    def flush(self) -> None:
        """
        Nothing to do: the writer's thread writes each chunk as soon as the sink takes it.
        """

    def drain(self, timeout: float) -> bool:
        """
        Wait until everything handed over is written, or ``timeout`` seconds; whether it all was. For the end of
        the process, so that its last lines are not lost, without hanging on a sink that takes nothing: a sink
        whose last write failed ends the wait at once (and not all was written).
        """
        with self._changed:
            settled = self._changed.wait_for(lambda: not self._writing and (
                not self._queue or (self._failing and all(type(item) is int for item in self._queue))), timeout)
            return settled and not self._failing

    def stop(self, timeout: float) -> bool:
        """
        Write out what is waiting, within ``timeout`` seconds, end the thread and close the sink; whether the
        thread ended (the sink stays open if it did not).
        """
        with self._changed:
            self._stopping = True
            thread = self._thread
            self._changed.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        self._sink.close()
        return True

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _forked(self) -> None:
        # The parent's thread is not in the child, and its lock may have been held at the fork. The lines waiting
        # at the fork are the parent's to write: the child writing them too would log them twice.
        self._changed = threading.Condition(threading.Lock())
        self._writing = False
        self._queue = []
        self._waiting = 0
        self._thread = None

    def _mark_dropped(self, lines: int, at_end: bool = True) -> None:
        queue = self._queue
        index = len(queue) - 1 if at_end else 0
        if queue and type(queue[index]) is int:
            queue[index] += lines
        elif at_end:
            queue.append(lines)
        else:
            queue.insert(0, lines)

    def _run(self) -> None:
        changed = self._changed
        while True:
            with changed:
                changed.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                item = self._queue.pop(0)
                self._writing = True
            if type(item) is int:
                text = self._notice(item)
                data, size = (text if self._line_ended else b"\n" + text), 0
            else:
                data, size = item, len(item)
            lost = self._write_all(data)
            with changed:
                self._writing = False
                self._waiting -= size
                if lost is None:
                    self._failing = False
                else:
                    # The sink failed (stdout closed, a full disk). The lines not written are lost, and so is
                    # everything waiting behind them: the sink takes nothing now. All are counted, and one notice
                    # waits for the sink to take writes again. Nothing to log to.
                    self._failing = True
                    queued = [chunk for chunk in self._queue if type(chunk) is not int]
                    lost_here = (lost if size else 0) + sum(chunk.count(b"\n") for chunk in queued)
                    self._dropped += lost_here
                    self._queue = [(item if not size else 0) + lost_here
                                   + sum(mark for mark in self._queue if type(mark) is int)]
                    self._waiting = 0
                changed.notify_all()
                if lost is not None:
                    if self._stopping:
                        return
                    # Try the sink again only with a chunk handed over after this failure: one attempt a chunk,
                    # rather than a spin on the sink.
                    changed.wait_for(lambda: self._stopping or any(type(i) is not int for i in self._queue))

    def _write_all(self, data: bytes) -> Optional[int]:
        """
        Write all of ``data``; ``None`` if it was, else the lines lost (those whose end was not written).
        """
        view = memoryview(data)
        try:
            while view:
                written = self._sink.write(view)
                if written:
                    self._line_ended = view[written - 1] == 0x0A
                view = view[written:]
        except Exception:
            return bytes(view).count(b"\n")
        return None
