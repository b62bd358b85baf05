"""
The JSON shapes entries take between peers.

An entry travels as ``{"k": key, "v": value, "ver": [wall_ms, counter, node], "exp": expires_at}`` where
``value`` is the stored JSON text as a string (``null`` for a tombstone), so that a value crosses nodes
byte for byte, without being parsed and serialized again.
"""

from typing import List

from .hlc import version_from_wire
from .store import Entry

#: The hard cap on keys between peers; the public API's cap (MAX_KEY_BYTES) is at most this.
MAX_KEY_BYTES = 1024


def entry_to_wire(entry: Entry) -> dict:
    return {
        "k": entry.key,
        "v": None if entry.value is None else entry.value.decode("utf-8"),
        "ver": list(entry.version),
        "exp": entry.expires_at,
    }


def entry_from_wire(data) -> Entry:
    """
    :raises ValueError: if ``data`` is not a well-formed entry.
    """
    if not isinstance(data, dict):
        raise ValueError("an entry must be an object")
    key, value, expires_at = data.get("k"), data.get("v"), data.get("exp")
    if not isinstance(key, str) or not key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError("bad key")
    if value is not None and not isinstance(value, str):
        raise ValueError("bad value")
    if expires_at is not None and not isinstance(expires_at, (int, float)):
        raise ValueError("bad expiry")
    version = version_from_wire(data.get("ver"))
    return Entry(key, None if value is None else value.encode("utf-8"), version,
                 None if expires_at is None else float(expires_at))


def entries_from_wire(items) -> List[Entry]:
    if not isinstance(items, list):
        raise ValueError("entries must be a list")
    return [entry_from_wire(item) for item in items]
