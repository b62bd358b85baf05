"""
The JSON shapes entries take between peers.

An entry travels as ``{"k": key, "v": value, "ver": [wall_ms, counter, node], "ttl": seconds_left, "exp":
expires_at}`` (``exp``, on the sender's clock, for nodes older than ``ttl``; newer ones read ``ttl``), where
``value`` is the stored JSON text as a string (``null`` for a tombstone), so that a value crosses nodes
byte for byte, without being parsed and serialized again.

An expiry travels as the time it has left, not as a wall-clock time: the receiver adds it to its own clock.
Two nodes whose clocks disagree then still expire a copy within the network delay of each other, where an
absolute time would stretch or cut the TTL by the clocks' difference. A time left is always below
:data:`ABSOLUTE_SINCE`; a larger number is an absolute time, as nodes before this format sent it.
"""

import math
import struct
from typing import List, Optional, Sequence

from .hlc import version_from_wire
from .store import Entry

#: The media type of a binary batch of entries (handoff, re-replication, anti-entropy, bulk writes).
BATCH_TYPE = b"application/x-kvresponder-batch"

# Per entry: key length, value length (TOMBSTONE for a delete), wall ms, counter, node id length, expiry
# (NaN for none); then the key, the node id and the value bytes.
_HEADER = struct.Struct(">HIqIBd")
_TOMBSTONE = 0xFFFFFFFF
_NO_EXPIRY = float("nan")

#: Expiry fields at or above this many seconds are absolute Unix times (from an older node); below, they are the
#: seconds left (a TTL is at most ten years, about 3.2e8 s).
ABSOLUTE_SINCE = 1e9

#: The hard cap on keys between peers, in UTF-8 bytes. The public API's cap (MAX_KEY_LENGTH, at most 256
#: characters of at most 4 bytes each) always fits within it.
MAX_KEY_BYTES = 1024


def time_left(expires_at: Optional[float], now: float) -> Optional[float]:
    """
    The wire form of an expiry: the seconds left from ``now`` (the sender's clock), or ``None``.
    """
    return None if expires_at is None else expires_at - now


def expiry_from_wire(value: Optional[float], now: float) -> Optional[float]:
    """
    An expiry on this node's clock (``now``) from its wire form; ``None`` for none.

    :raises ValueError: if it is not a finite number.
    """
    if value is None:
        return None
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False  # a JSON integer no float holds
    if not finite:
        raise ValueError("bad expiry")
    return float(value) if value >= ABSOLUTE_SINCE else now + value


#: In the answer to a read of many keys, an entry the peer holds but left out, to keep the answer's size
#: bounded: ask for it again.
OMITTED = False


def entry_to_wire(entry: Entry, now: float) -> dict:
    """
    :param now: this node's wall clock, in seconds.
    """
    return {
        "k": entry.key,
        "v": None if entry.value is None else entry.value.decode("utf-8"),
        "ver": list(entry.version),
        "ttl": time_left(entry.expires_at, now),
        # For a node older than "ttl", which reads only this absolute time (on our clock).
        "exp": entry.expires_at,
    }


def entry_from_wire(data, now: float) -> Entry:
    """
    :param now: this node's wall clock, in seconds.
    :raises ValueError: if ``data`` is not a well-formed entry.
    """
    if not isinstance(data, dict):
        raise ValueError("an entry must be an object")
    key, value = data.get("k"), data.get("v")
    # "exp": an absolute time, from a node that predates "ttl".
    expiry = data.get("ttl", data.get("exp"))
    if not isinstance(key, str) or not key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError("bad key")
    if value is not None and not isinstance(value, str):
        raise ValueError("bad value")
    if expiry is not None and (isinstance(expiry, bool) or not isinstance(expiry, (int, float))):
        raise ValueError("bad expiry")
    version = version_from_wire(data.get("ver"))
    return Entry(key, None if value is None else value.encode("utf-8"), version, expiry_from_wire(expiry, now))


def entries_from_wire(items, now: float) -> List[Entry]:
    if not isinstance(items, list):
        raise ValueError("entries must be a list")
    return [entry_from_wire(item, now) for item in items]


def encode_batch(entries: Sequence[Entry], now: float) -> bytes:
    """
    Entries as one binary frame: a JSON round trip of many entries costs more than the rest of a handoff.

    :param now: this node's wall clock, in seconds: expiries travel as the time they have left.
    """
    parts = []
    pack = _HEADER.pack
    for entry in entries:
        key = entry.key.encode("utf-8")
        wall, counter, node = entry.version
        node_bytes = node.encode("utf-8")
        value = entry.value
        parts.append(pack(len(key), _TOMBSTONE if value is None else len(value), wall, counter, len(node_bytes),
                          _NO_EXPIRY if entry.expires_at is None else entry.expires_at - now))
        parts.append(key)
        parts.append(node_bytes)
        if value is not None:
            parts.append(value)
    return b"".join(parts)


def decode_batch(data: bytes, now: float) -> List[Entry]:
    """
    :param now: this node's wall clock, in seconds.
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
            if offset > size or not key or key_length > MAX_KEY_BYTES or wall < 0 or math.isinf(expires_at):
                raise ValueError("truncated or malformed entry")
            entries.append(Entry(key, value, (wall, counter, node), None if math.isnan(expires_at) else
                                 (expires_at if expires_at >= ABSOLUTE_SINCE else now + expires_at)))
    except (struct.error, UnicodeDecodeError) as error:
        raise ValueError("malformed batch: %s" % (error,))
    return entries
