"""
Log lines written from a thread of their own, so that a log reader that falls behind never stalls the reactor.

In a pod, a node's stdout is a pipe that the container runtime reads and copies to disk. When that reader falls
behind (a slow disk, a runtime restarting) or stops, the pipe fills, and a write to it blocks: on the reactor
thread, every request of the node would wait with it, and its peers would find it unanswering. A log file
(``LOG_FILE``) can stall the same way on a slow disk.

So the node's log destination hands its lines, a chunk at a time, to a :class:`BackgroundWriter`, which does the
blocking writes in its own thread. It keeps at most ``max_waiting`` bytes waiting; a chunk beyond that is dropped
and its lines counted. Once the stream takes writes again, the writer first writes a line saying how many were
dropped. Losing log lines is the lesser harm: the node keeps serving, and the count shows in
``kv_log_lines_dropped_total``.
"""

import threading
from typing import Callable, IO, List, Union

#: Bytes of log lines a writer keeps waiting for its stream at most: a few seconds of a node's info-level lines
#: at full write load.
MAX_WAITING = 16 * 1024 * 1024


class BackgroundWriter:
    """
    A binary stream's writes, done in a thread of its own. ``write`` never blocks on the stream.

    :param stream: a binary stream (stdout's buffer, a log file); only this writer's thread writes to it.
    :param notice: ``notice(count)``, the line (bytes, newline included) written before the next lines once
        ``count`` lines were dropped; called in the writer's thread.
    :param max_waiting: bytes kept waiting at most; a chunk written while the writer is idle is always taken.
    """

    def __init__(self, stream: IO[bytes], notice: Callable[[int], bytes], max_waiting: int = MAX_WAITING,
                 name: str = "kvresponder-log-writer") -> None:
        self._stream = stream
        self._notice = notice
        self._max_waiting = max_waiting
        self._changed = threading.Condition(threading.Lock())
        #: Chunks to write, in order; an ``int`` in their place counts the lines dropped there.
        self._queue: List[Union[bytes, int]] = []
        #: Bytes of the chunks handed over and not yet written: those queued and those being written.
        self._waiting = 0
        self._writing = False
        self._dropped = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

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
            self._changed.notify_all()

    def _mark_dropped(self, lines: int, at_end: bool = True) -> None:
        queue = self._queue
        index = len(queue) - 1 if at_end else 0
        if queue and type(queue[index]) is int:
            queue[index] += lines
        elif at_end:
            queue.append(lines)
        else:
            queue.insert(0, lines)

    def flush(self) -> None:
        """
        Nothing to do: the writer's thread writes and flushes each chunk as soon as the stream takes it.
        """

    def drain(self, timeout: float) -> bool:
        """
        Wait until everything handed over is written, or ``timeout`` seconds; whether it all was. For the end of
        the process, so that its last lines are not lost, without hanging on a stream that takes nothing.
        """
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._writing, timeout)

    def stop(self, timeout: float) -> bool:
        """
        Write out what is waiting, within ``timeout`` seconds, and end the thread; whether it ended.
        """
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                items, self._queue = self._queue, []
                self._writing = True
            chunks = [item for item in items if type(item) is not int]
            size = sum(len(chunk) for chunk in chunks)
            try:
                self._stream.write(b"".join(self._notice(item) if type(item) is int else item for item in items))
                self._stream.flush()
            except Exception:
                # A stream that cannot be written (stdout closed, a full disk): these lines are lost too, and
                # counted; the next chunk tries again, after a notice of all that was lost. Nothing to log to.
                lost = sum(chunk.count(b"\n") for chunk in chunks)
                with self._changed:
                    self._dropped += lost
                    self._mark_dropped(lost + sum(item for item in items if type(item) is int), at_end=False)
                    self._waiting -= size
                    self._writing = False
                    self._changed.notify_all()
                    if self._stopping:
                        return
                    # Try the stream again with the next chunk (or at the stop), rather than spin on it.
                    self._changed.wait_for(
                        lambda: self._stopping or any(type(item) is not int for item in self._queue))
                continue
            with self._changed:
                self._waiting -= size
                self._writing = False
                self._changed.notify_all()
