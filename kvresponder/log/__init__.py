"""
Structured logging with Eliot: typed action and message types, per-area levels, and destinations.

Each area (``http``, ``store``, ``discovery``, ``replication``, ``rebalance``) declares its types in its own
small module beside this one and registers each type's level here with :func:`leveled`. A
:class:`LogPolicy` holds the current level of every area; the destination drops messages below it, and hot
paths ask :meth:`LogPolicy.enabled` before they build an action at all, so a quiet level costs little.
"""

import io
import itertools
import json
import os
import platform
import re
import sys
import time
from uuid import uuid4

from eliot import current_action
from typing import Dict, IO, List, Optional, Sequence, Tuple

from ..privateapi import c_json_encoder, default_eliot_logger, set_task_uuid_factory, sole_eliot_destination


DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
LEVEL_NAMES = {value: name for name, value in LEVELS.items()}
#: Other names taken for a level: the seed's contract lists ``warn``.
LEVEL_ALIASES = {"warn": "warning"}
AREAS = ("http", "store", "discovery", "replication", "rebalance", "service")

#: type name -> (area, level), filled in by :func:`leveled` as the area modules are imported.
_TYPE_LEVELS: Dict[str, tuple] = {}
#: Type names written whatever the levels (:func:`leveled`'s ``always``).
_ALWAYS: set = set()


def leveled(area: str, level: int, eliot_type, always: bool = False):
    """
    Register the area and level of an Eliot ``ActionType`` or ``MessageType`` and return it.

    :param always: write it whatever the levels (as failed actions are): for a line that must not be lost to the
        very levels it reports.
    """
    if area not in AREAS:
        raise ValueError("unknown log area %r" % (area,))
    name = getattr(eliot_type, "action_type", None) or getattr(eliot_type, "message_type")
    _TYPE_LEVELS[name] = (area, level)
    if always:
        _ALWAYS.add(name)
    return eliot_type


def canonical_level(name) -> Optional[str]:
    """
    The level named, in any letter case and with ``warn`` for ``warning``; ``None`` if there is no such level.
    """
    if not isinstance(name, str):
        return None
    name = name.lower()
    name = LEVEL_ALIASES.get(name, name)
    return name if name in LEVELS else None


def _as_json(value) -> str:
    """
    ``value`` as a client sent it, in JSON (``null``, ``"info\\u0000"``): not as Python would write it, in an answer
    to a JSON request; cut short if long.
    """
    text = json.dumps(value)
    return text if len(text) <= 64 else text[:60] + "..."


class UnknownLevel(ValueError):
    pass


class LogPolicy:
    """
    The current level of each area. Changed at run time by the admin endpoint.
    """

    def __init__(self, level: str = "info") -> None:
        self._levels: Dict[str, int] = {}
        self.set_all(level)

    def updated(self, level: Optional[str] = None, levels: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """
        The levels :meth:`update` would set, by area, without setting them.

        :raises UnknownLevel: naming what is unknown.
        """
        preview = LogPolicy()
        preview._levels = dict(self._levels)
        preview.update(level, levels)
        return preview.levels()

    def set_all(self, level: str) -> None:
        self.update(level)

    def set_area(self, area: str, level: str) -> None:
        self.update(levels={area: level})

    def update(self, level: Optional[str] = None, levels: Optional[Dict[str, str]] = None) -> None:
        """
        Set every area to ``level`` if given, then each area named in ``levels`` to its own: all of it or,
        if any level or area is unknown, none of it.

        :raises UnknownLevel: naming what is unknown.
        """
        value = None if level is None else self._parse(level)
        values = {}
        for area, name in (levels or {}).items():
            if area not in AREAS:
                raise UnknownLevel("unknown log area %s; areas are %s" % (_as_json(area), ", ".join(AREAS)))
            values[area] = self._parse(name)
        if value is not None:
            for area in AREAS:
                self._levels[area] = value
        self._levels.update(values)

    @staticmethod
    def _parse(level) -> int:
        name = canonical_level(level)
        if name is None:
            raise UnknownLevel("unknown log level %s; levels are %s (or warn)" % (_as_json(level), ", ".join(LEVELS)))
        return LEVELS[name]

    def enabled(self, area: str, level: int) -> bool:
        return level >= self._levels[area]

    def levels(self) -> Dict[str, str]:
        return {area: LEVEL_NAMES[value] for area, value in self._levels.items()}

    def admits(self, message: dict) -> bool:
        """
        Whether a serialized Eliot message passes the current levels. Types this project did not declare
        (Eliot's own tracebacks, for instance) always pass.
        """
        name = message.get("action_type") or message.get("message_type")
        known = _TYPE_LEVELS.get(name)
        if known is None:
            return True
        if message.get("action_status") == "failed" or name in _ALWAYS:
            return True
        area, level = known
        return level >= self._levels[area]


#: Lines a buffered destination holds as text before it writes them to its stream (about 64 KiB).
PENDING_LINES = 256


class JSONLineDestination:
    """
    An Eliot destination writing one JSON object a line, stamped with the tenant and node id, filtered by
    the policy.

    :param stream: a binary stream (the service's file or stdout), or a text stream.
    """

    def __init__(self, stream: IO, policy: LogPolicy, tenant: str, node_id: str,
                 flush: bool = True) -> None:
        self._stream = stream
        self._binary = not isinstance(stream, io.TextIOBase)
        self._policy = policy
        # The stamp is spliced in as text after each message's own fields, rather than added to the
        # message (which other destinations share) and encoded again every time.
        self._stamp = ", " + json.dumps({"tenant": tenant, "node": node_id})[1:] + "\n"
        self._flush = flush
        self._pending: list = []
        # Eliot messages are flat dicts of plain values: no cycles to look for. ASCII output, so that the
        # binary stream takes it without another encoding step.
        general = c_json_encoder(_fallback) or json.JSONEncoder(default=_fallback, check_circular=False).encode
        # CPython's encoder is C and quicker than the flat one; PyPy's is Python, and slower.
        self._encode = _FlatEncoder(general).encode if _PYPY else general

    def __call__(self, message: dict) -> None:
        if not self._policy.admits(message):
            return
        timestamp = message.get("timestamp")
        if type(timestamp) is float:
            # The timestamp is written to the microsecond by integer formatting: the encoder's shortest
            # round-trip repr of a float was a large share of a line's encoding on PyPy. The message goes back
            # as it came, for the other destinations.
            del message["timestamp"]
            try:
                text = self._encode(message)
            finally:
                message["timestamp"] = timestamp
            second = int(timestamp)
            head = '{"timestamp": %d.%06d' % (second, int((timestamp - second) * 1000000))
            line = head + ", " + text[1:-1] + self._stamp if len(text) > 2 else head + self._stamp
        else:
            text = self._encode(message)
            line = text[:-1] + self._stamp if len(text) > 2 else text[:-1] + self._stamp[2:]
        self._write_line(line)

    def _write_line(self, line: str) -> None:
        if self._flush:
            self._stream.write(line.encode("ascii") if self._binary else line)
            self._stream.flush()
            return
        # Buffered: lines wait as text and go to the stream together, one encode and one write for many
        # (a write to a buffered file per line was a large share of a line's cost on PyPy).
        pending = self._pending
        pending.append(line)
        if len(pending) >= PENDING_LINES:
            self._write_pending()

    def write_direct(self, line_type: "DirectLine", values: tuple, task_uuid: str, task_level: List[int]) -> None:
        """
        Write the line a message of ``line_type`` with the field ``values`` at ``task_uuid``/``task_level``
        would make, formatted straight from them (see :class:`DirectLine`); nothing if the policy turns it away.
        """
        if not self._policy.enabled(line_type.area, line_type.level):
            return
        now = time.time()
        second = int(now)
        text = _quoted_text
        encoded = [text(value) if type(value) is str else ("true" if value else "false") if type(value) is bool
                   else self._encode(value) for value in values]
        encoded.append(text(task_uuid))
        encoded.append(", ".join([str(level) for level in task_level]))
        self._write_line(line_type.template % (second, int((now - second) * 1000000), *encoded) + self._stamp)

    def _write_pending(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending = []
            self._stream.write(text.encode("ascii") if self._binary else text)

    def flush(self) -> None:
        """
        Write out what is buffered. A destination made with ``flush=False`` is flushed on a timer and at
        shutdown instead of after every line (a system call per message costs more than the line itself).
        """
        self._write_pending()
        self._stream.flush()


_PYPY = platform.python_implementation() == "PyPy"


class _FlatEncoder:
    """
    Encodes a log message as the JSON encoder ``general`` would, with a quicker path for the values most
    fields hold (text that needs no escaping, integers, booleans, ``None``, and lists of integers such as
    ``task_level``); any other value, and any text to escape, is ``general``'s. PyPy's JSON encoder is written
    in Python, and a line's encoding was most of what logging a write cost there.
    """

    def __init__(self, general) -> None:
        self._general = general
        #: Each field name as it starts its member (``"name": ``): messages of a type repeat theirs.
        self._names: Dict[str, str] = {}

    def _text(self, value: str) -> str:
        if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            return '"' + value + '"'
        return self._general(value)

    def encode(self, message) -> str:
        if type(message) is not dict:
            return self._general(message)
        general = self._general
        text = self._text
        names = self._names
        parts = []
        for name, value in message.items():
            member = names.get(name)
            if member is None:
                if type(name) is not str:
                    return general(message)
                member = text(name) + ": "
                if len(names) < 1024:
                    names[name] = member
            kind = type(value)
            if kind is str:
                encoded = text(value)
            elif kind is bool:
                encoded = "true" if value else "false"
            elif kind is int:
                encoded = str(value)
            elif value is None:
                encoded = "null"
            elif kind is list and all(type(item) is int for item in value):
                encoded = "[" + ", ".join([str(item) for item in value]) + "]"
            else:
                encoded = general(value)
            parts.append(member + encoded)
        return "{" + ", ".join(parts) + "}"


_escape_text = json.JSONEncoder().encode


def _quoted_text(value: str) -> str:
    """
    ``value`` as a JSON string, as the destination's encoder writes it (ASCII, escaped).
    """
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return '"' + value + '"'
    return _escape_text(value)


class DirectLine:
    """
    A message type logged on every write (``store:applied``), with its fields in a fixed order: while the
    service's own destination is the only place messages go, its JSON line is formatted straight from the
    values, without the message dict, Eliot's logger and the encoder (most of what a write's line cost, on
    either interpreter); anywhere else (inside an action, under ``capture_logging``, with another
    destination added) it is the :func:`emit` of the same message. Both ways give the same line.

    :param message_type: the leveled Eliot ``MessageType``.
    :param names: its fields, in the order :meth:`emit` takes their values.
    """

    def __init__(self, message_type, names: Sequence[str]) -> None:
        self.message_type = message_type
        self.names = tuple(names)
        self.area, self.level = _TYPE_LEVELS[message_type.message_type]
        # As the destination writes a message: the timestamp first, the fields, then Eliot's own.
        self.template = "".join(['{"timestamp": %d.%06d'] + [", %s: %%s" % (_quoted_text(name),)
                                                              for name in self.names]
                                + [', "message_type": %s, "task_uuid": %%s, "task_level": [%%s]' % (
                                    _quoted_text(message_type.message_type),)])

    def emit(self, _task: Optional[Tuple[str, List[int]]], *values) -> None:
        """
        Log the message with the field ``values``, as :func:`emit` would.
        """
        destination = sole_eliot_destination()
        if type(destination) is not JSONLineDestination or (_task is None and current_action() is not None):
            emit(self.message_type, _task, **dict(zip(self.names, values)))
            return
        if _task is None:
            destination.write_direct(self, values, _task_uuid[0](), [1])
        else:
            destination.write_direct(self, values, _task[0], _task[1])


def _fallback(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


def open_log_sink(log_file: Optional[str] = None, stdout: IO = None):
    """
    Where a node's log lines go, for its :class:`~kvresponder.log.writer.BackgroundWriter`: ``log_file``,
    appended to, or stdout (``stdout`` if given, else ``sys.stdout``), written to its descriptor.
    """
    from .writer import FileSink

    if log_file:
        return FileSink.for_file(log_file)
    return FileSink.for_stream(stdout if stdout is not None else sys.stdout)


def dropped_lines_notice(tenant: str, node_id: str):
    """
    ``notice(count)``: the line a node's :class:`~kvresponder.log.writer.BackgroundWriter` writes once it had to
    drop ``count`` lines, a ``kvresponder:service:log-lines-dropped`` message of a task of its own. It is
    written whatever the levels: the lines it stands for were. Safe to call from any thread.
    """
    from .service import LOG_LINES_DROPPED

    def notice(count: int) -> bytes:
        return (json.dumps({"timestamp": time.time(), "message_type": LOG_LINES_DROPPED.message_type,
                            "lines": count, "task_uuid": str(uuid4()), "task_level": [1],
                            "tenant": tenant, "node": node_id}) + "\n").encode("ascii")
    return notice


def _start_task_ids() -> None:
    """
    Draw this process's part of its task ids from the system's random source, and a counter for the rest.
    """
    global _task_prefix, _next_task
    bits = int.from_bytes(os.urandom(15), "big")
    # 74 random bits fill the version-4 UUID's first 19 digits (with its version and variant bits); the counter
    # fills the last 12 from a random start below 2**46, so it cannot outgrow its 12 digits in a process's life.
    _task_prefix = "%08x-%04x-4%03x-%04x-" % (bits >> 88, (bits >> 72) & 0xFFFF, (bits >> 60) & 0xFFF,
                                               0x8000 | (bits >> 46) & 0x3FFF)
    _next_task = itertools.count(bits & 0x3FFFFFFFFFFF).__next__


_task_prefix = ""
_next_task = itertools.count().__next__
_start_task_ids()
# A forked child would repeat its parent's ids.
os.register_at_fork(after_in_child=_start_task_ids)


def fast_task_uuid() -> str:
    """
    A task id in the text form of a version-4 UUID, unique without a system call or a random draw per task:
    a task id must be unique, not secret, and ``uuid.uuid4`` reads ``os.urandom`` every time. Each process
    (and each forked child) draws 74 random bits of its own at start, and counts the rest.
    """
    return _task_prefix + "%012x" % _next_task()


_task_uuid = [lambda: str(uuid4())]

def emit(message_type, _task: Optional[Tuple[str, List[int]]] = None, **fields) -> None:
    """
    Log a message of the Eliot ``message_type`` with ``fields``: at ``_task`` (a task id and a task level)
    if given; otherwise inside the current action as ``message_type.log`` would, or, outside any action, as
    the one message of a task of its own. The message has the fields Eliot gives it, built here without the
    ``Action`` and ``TaskLevel`` objects Eliot would make and drop (for the one line a write logs at info,
    they were much of what the line cost).
    """
    if _task is None:
        if current_action() is not None:
            message_type.log(**fields)
            return
        task_uuid, task_level = _task_uuid[0](), [1]
    else:
        task_uuid, task_level = _task
    fields["message_type"] = message_type.message_type
    fields["timestamp"] = time.time()
    fields["task_uuid"] = task_uuid
    fields["task_level"] = task_level
    default_eliot_logger().write(fields)


def new_task_uuid() -> str:
    """
    An id for a new Eliot task, as Eliot would draw it.
    """
    return _task_uuid[0]()


def task_id(task_uuid: str, level: int) -> bytes:
    """
    The serialized Eliot task id (as ``Action.serialize_task_id`` writes it) of the message at ``[level]`` of
    the task ``task_uuid``: what a peer that logs a message of that task is sent.
    """
    # Concatenated, then encoded: formatting bytes with ``%`` took several times as long on PyPy, once a copy.
    return (task_uuid + "@/" + str(level)).encode("ascii")


_TASK_ID = re.compile(r"([0-9A-Za-z-]{1,64})@((?:/[1-9][0-9]{0,9}){1,32})\Z")


def parse_task_id(serialized: bytes) -> Optional[Tuple[str, List[int]]]:
    """
    The task id and task level a serialized Eliot task id names, or ``None`` if it is malformed, or names a
    task's root level ``[1]`` (a continued task is always below it).
    """
    # The usual id, one a replica gets with every copy at info: ``<uuid>@/<level>``, read without the pattern.
    task, separator, level = serialized.partition(b"@/")
    if (separator and 0 < len(task) <= 64 and 0 < len(level) <= 10 and level.isdigit() and level[0] != 48
            and task.replace(b"-", b"a").isalnum() and task.isascii()):
        number = int(level)
        return (task.decode("ascii"), [number]) if number != 1 else None
    return _parse_task_id(serialized)


def _parse_task_id(serialized: bytes) -> Optional[Tuple[str, List[int]]]:
    try:
        match = _TASK_ID.match(serialized.decode("ascii"))
    except UnicodeDecodeError:
        return None
    if match is None:
        return None
    level = [int(part) for part in match.group(2)[1:].split("/")]
    if level == [1]:
        return None
    return match.group(1), level


def use_fast_task_ids() -> None:
    """
    Make Eliot name new tasks with :func:`fast_task_uuid`. Eliot builds each task id as ``str(uuid4())``
    inside ``eliot._action``; this replaces that module's ``uuid4``. The running service turns it on; the
    ids keep the UUID text form that ``eliot-tree`` and log queries expect.
    """
    set_task_uuid_factory(fast_task_uuid)
    _task_uuid[0] = fast_task_uuid
