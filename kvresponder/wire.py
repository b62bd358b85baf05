"""
The JSON shapes entries take between peers.

An entry travels as ``{"k": key, "v": value, "ver": [wall_ms, counter, node], "exp": expires_at}`` where
``value`` is the stored JSON text as a string (``null`` for a tombstone), so that a value crosses nodes
byte for byte, without being parsed and serialized again.
"""

import math
import struct
from typing import List, Sequence

from .hlc import version_from_wire
from .store import Entry

#: The media type of a binary batch of entries (handoff, re-replication, anti-entropy, bulk writes).
BATCH_TYPE = b"application/x-kvresponder-batch"

# Per entry: key length, value length (TOMBSTONE for a delete), wall ms, counter, node id length, expiry
# (NaN for none); then the key, the node id and the value bytes.
_HEADER = struct.Struct(">HIqIBd")
_TOMBSTONE = 0xFFFFFFFF
_NO_EXPIRY = float("nan")

#: The hard cap on keys between peers, in UTF-8 bytes. The public API's cap (MAX_KEY_LENGTH, at most 256
#: characters of at most 4 bytes each) always fits within it.
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


def encode_batch(entries: Sequence[Entry]) -> bytes:
    """
    Entries as one binary frame: a JSON round trip of many entries costs more than the rest of a handoff.
    """
    parts = []
    pack = _HEADER.pack
    for entry in entries:
        key = entry.key.encode("utf-8")
        wall, counter, node = entry.version
        node_bytes = node.encode("utf-8")
        value = entry.value
        parts.append(pack(len(key), _TOMBSTONE if value is None else len(value), wall, counter, len(node_bytes),
                          _NO_EXPIRY if entry.expires_at is None else entry.expires_at))
        parts.append(key)
        parts.append(node_bytes)
        if value is not None:
            parts.append(value)
    return b"".join(parts)


def decode_batch(data: bytes) -> List[Entry]:
    """
    :raises ValueError: if ``data`` is not a well-formed batch.
    """
    entries = []
    view = memoryview(data)
    offset = 0
    size = len(data)
    unpack = _HEADER.unpack_from
    header = _HEADER.size
    try:
        while offset < size:
            key_length, value_length, wall, counter, node_length, expires_at = unpack(data, offset)
            offset += header
            key = bytes(view[offset:offset + key_length]).decode("utf-8")
            offset += key_length
            node = bytes(view[offset:offset + node_length]).decode("utf-8")
            offset += node_length
            if value_length == _TOMBSTONE:
                value = None
            else:
                value = bytes(view[offset:offset + value_length])
                offset += value_length
            if offset > size or not key or key_length > MAX_KEY_BYTES or wall < 0:
                raise ValueError("truncated or malformed entry")
            entries.append(Entry(key, value, (wall, counter, node),
                                 None if math.isnan(expires_at) else expires_at))
    except (struct.error, UnicodeDecodeError) as error:
        raise ValueError("malformed batch: %s" % (error,))
    return entries
