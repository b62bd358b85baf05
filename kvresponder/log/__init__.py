"""
Structured logging with Eliot: typed action and message types, per-area levels, and destinations.

Each area (``http``, ``store``, ``discovery``, ``replication``, ``rebalance``) declares its types in its own
small module beside this one and registers each type's level here with :func:`leveled`. A
:class:`LogPolicy` holds the current level of every area; the destination drops messages below it, and hot
paths ask :meth:`LogPolicy.enabled` before they build an action at all, so a quiet level costs little.
"""

import json
import sys
from typing import Dict, IO, Optional

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
LEVEL_NAMES = {value: name for name, value in LEVELS.items()}
AREAS = ("http", "store", "discovery", "replication", "rebalance", "service")

#: type name -> (area, level), filled in by :func:`leveled` as the area modules are imported.
_TYPE_LEVELS: Dict[str, tuple] = {}


def leveled(area: str, level: int, eliot_type):
    """
    Register the area and level of an Eliot ``ActionType`` or ``MessageType`` and return it.
    """
    if area not in AREAS:
        raise ValueError("unknown log area %r" % (area,))
    name = getattr(eliot_type, "action_type", None) or getattr(eliot_type, "message_type")
    _TYPE_LEVELS[name] = (area, level)
    return eliot_type


class UnknownLevel(ValueError):
    pass


class LogPolicy:
    """
    The current level of each area. Changed at run time by the admin endpoint.
    """

    def __init__(self, level: str = "info") -> None:
        self._levels: Dict[str, int] = {}
        self.set_all(level)

    def set_all(self, level: str) -> None:
        value = self._parse(level)
        for area in AREAS:
            self._levels[area] = value

    def set_area(self, area: str, level: str) -> None:
        if area not in AREAS:
            raise UnknownLevel("unknown log area %r; areas are %s" % (area, ", ".join(AREAS)))
        self._levels[area] = self._parse(level)

    @staticmethod
    def _parse(level) -> int:
        if not isinstance(level, str) or level.lower() not in LEVELS:
            raise UnknownLevel("unknown log level %r; levels are %s" % (level, ", ".join(LEVELS)))
        return LEVELS[level.lower()]

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
        if message.get("action_status") == "failed":
            return True
        area, level = known
        return level >= self._levels[area]


class JSONLineDestination:
    """
    An Eliot destination writing one JSON object a line, stamped with the tenant and node id, filtered by
    the policy.
    """

    def __init__(self, stream: IO[str], policy: LogPolicy, tenant: str, node_id: str,
                 flush: bool = True) -> None:
        self._stream = stream
        self._policy = policy
        self._stamp = {"tenant": tenant, "node": node_id}
        self._flush = flush
        self._encode = json.JSONEncoder(default=_fallback).encode

    def __call__(self, message: dict) -> None:
        if not self._policy.admits(message):
            return
        message.update(self._stamp)
        self._stream.write(self._encode(message) + "\n")
        if self._flush:
            self._stream.flush()

    def flush(self) -> None:
        """
        Write out what is buffered. A destination made with ``flush=False`` is flushed on a timer and at
        shutdown instead of after every line (a system call per message was a fifth of a write's cost).
        """
        self._stream.flush()


def _fallback(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


def open_destination(policy: LogPolicy, tenant: str, node_id: str, log_file: Optional[str] = None,
                     stdout: IO[str] = None, flush: bool = True) -> JSONLineDestination:
    """
    A destination on stdout, or appending to ``log_file``. With ``flush=False`` the caller flushes it.
    """
    if log_file:
        stream = open(log_file, "a", buffering=1 if flush else 65536, encoding="utf-8")
    else:
        stream = stdout if stdout is not None else sys.stdout
    return JSONLineDestination(stream, policy, tenant, node_id, flush=flush)
