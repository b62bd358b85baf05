"""
The declared shapes of the bodies peers send to ``/<tenant>/_internal/*``, and a small checker for them.

Each internal route names its schema in :data:`SCHEMAS` (as Tahoe-LAFS's storage server declares its
``_SCHEMAS``), and a body is checked against it before the handler sees it: types, sizes, key lengths, bucket
ids in range, versions well formed. A body that does not fit raises :class:`SchemaError`, which the route
answers with a JSON 400; the handler then runs only on values it can use without another check.

A schema is a function of the decoded JSON value that returns it or raises :class:`SchemaError`. Records
ignore fields they do not name: a peer one version ahead during a rolling upgrade may send more.
"""

import json
import math
from typing import Callable, Dict, Optional

from ..hlc import version_from_wire
from ..rebalance import BUCKETS
from ..settings import NODE_ID_PATTERN
from ..wire import MAX_KEY_BYTES

#: Keys at most in one get, one listing of versions.
MAX_SYNC_KEYS = 50000
#: Keys at most in one page of ``/_internal/keys``: a listing asks for its limit plus one.
MAX_KEYS_LIMIT = 10001

Schema = Callable[[object], object]


class SchemaError(ValueError):
    """
    A body does not fit its schema.

    :param str where: the path of the offending value (``buckets.a``), or ``""`` for the body itself.
    :param str problem: what is wrong with it.
    """

    def __init__(self, where: str, problem: str) -> None:
        ValueError.__init__(self, "%s %s" % (where or "the body", problem))
        self.where = where
        self.problem = problem


def _inside(where: str, name) -> str:
    name = str(name)
    if len(name) > 40:
        name = name[:40] + "..."
    return "%s.%s" % (where, name) if where else name


def _check(schema: Schema, value, where: str):
    try:
        return schema(value)
    except SchemaError as error:
        raise SchemaError(_inside(where, error.where) if error.where else where, error.problem)


def text(min_length: int = 0, max_bytes: Optional[int] = None, pattern=None) -> Schema:
    """A string that has a UTF-8 form, of ``min_length`` characters or more, ``max_bytes`` UTF-8 bytes at most."""
    def check(value):
        if not isinstance(value, str):
            raise SchemaError("", "must be a string")
        if len(value) < min_length:
            raise SchemaError("", "must have at least %d character(s)" % (min_length,))
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise SchemaError("", "has no UTF-8 form (a lone surrogate)")
        if max_bytes is not None and size > max_bytes:
            raise SchemaError("", "must be at most %d UTF-8 bytes" % (max_bytes,))
        if pattern is not None and not pattern.match(value):
            raise SchemaError("", "is not well formed")
        return value
    return check


def integer(low: int, high: int) -> Schema:
    """An integer (not a boolean) from ``low`` to ``high``."""
    def check(value):
        if type(value) is not int or not low <= value <= high:
            raise SchemaError("", "must be an integer from %d to %d" % (low, high))
        return value
    return check


def finite_number(value):
    """A number (not a boolean) that a float holds, finite."""
    if type(value) not in (int, float):
        raise SchemaError("", "must be a number")
    try:
        if not math.isfinite(float(value)):
            raise SchemaError("", "must be finite")
    except OverflowError:
        raise SchemaError("", "is too large")
    return value


def nullable(schema: Schema) -> Schema:
    def check(value):
        return None if value is None else schema(value)
    return check


def list_of(item: Schema, max_items: int) -> Schema:
    def check(value):
        if not isinstance(value, list):
            raise SchemaError("", "must be a list")
        if len(value) > max_items:
            raise SchemaError("", "must have at most %d items" % (max_items,))
        for index, each in enumerate(value):
            _check(item, each, str(index))
        return value
    return check


def map_of(key: Schema, value_schema: Schema, max_items: int) -> Schema:
    """An object whose member names fit ``key`` and whose values fit ``value_schema``."""
    def check(value):
        if not isinstance(value, dict):
            raise SchemaError("", "must be an object")
        if len(value) > max_items:
            raise SchemaError("", "must have at most %d members" % (max_items,))
        for name, each in value.items():
            _check(key, name, name)
            _check(value_schema, each, name)
        return value
    return check


def record(required: Dict[str, Schema], optional: Optional[Dict[str, Schema]] = None) -> Schema:
    """An object with every ``required`` member and any of the ``optional`` ones, each fitting its schema."""
    optional = optional or {}

    def check(value):
        if not isinstance(value, dict):
            raise SchemaError("", "must be a JSON object")
        for name, schema in required.items():
            if name not in value:
                raise SchemaError(name, "is required")
            _check(schema, value[name], name)
        for name, schema in optional.items():
            if name in value:
                _check(schema, value[name], name)
        return value
    return check


def either(choose: Callable[[object], Schema]) -> Schema:
    """The schema ``choose(value)`` picks, for bodies of two shapes."""
    def check(value):
        return choose(value)(value)
    return check


def boolean(value):
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise SchemaError("", "must be true or false")
    return value


def version(value):
    """A version ``[wall_ms, counter, node_id]`` (:func:`~kvresponder.hlc.version_from_wire`)."""
    try:
        parsed = version_from_wire(value)
    except ValueError:
        raise SchemaError("", "must be a version [wall_ms, counter, node_id]")
    _check(NODE_ID, parsed[2], "2")
    return value


def json_text(value):
    """A stored value: the JSON text of one JSON value."""
    _ANY_TEXT(value)
    try:
        json.loads(value)
    except (ValueError, RecursionError):
        raise SchemaError("", "must be the JSON text of a value")
    return value


def bucket_id(value):
    """A bucket of the anti-entropy digest, as a member name: a decimal number below BUCKETS."""
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 3 \
            or not 0 <= int(value) < BUCKETS:
        raise SchemaError("", "must be a bucket id from 0 to %d" % (BUCKETS - 1,))
    return value


def digest(value):
    if not isinstance(value, str) or len(value) != 16 or not value.isascii() \
            or any(c not in "0123456789abcdef" for c in value):
        raise SchemaError("", "must be 16 lowercase hexadecimal digits")
    return value


_ANY_TEXT = text()
KEY = text(min_length=1, max_bytes=MAX_KEY_BYTES)
NODE_ID = text(min_length=1, pattern=NODE_ID_PATTERN)
ENTRY = record({"k": KEY, "v": nullable(json_text), "ver": version},
               {"exp": nullable(finite_number), "ttl": nullable(finite_number)})

#: The body of each internal route, by its path below ``/_internal``. ``/apply`` also takes a binary batch
#: (:func:`check_entries`); ``/copies`` takes no body at all.
SCHEMAS: Dict[str, Schema] = {
    "/apply": record({"entries": list_of(ENTRY, MAX_SYNC_KEYS)}),
    "/get": either(lambda body: record({"keys": list_of(KEY, MAX_SYNC_KEYS)}, {"partial": boolean})
                   if isinstance(body, dict) and "keys" in body else record({"key": KEY})),
    "/keys": record({}, {"prefix": text(max_bytes=MAX_KEY_BYTES), "after": nullable(KEY),
                         "limit": integer(1, MAX_KEYS_LIMIT)}),
    "/sync/buckets": record({"from": NODE_ID, "buckets": map_of(bucket_id, digest, BUCKETS)},
                            {"background": boolean}),
    "/sync/versions": record({"versions": map_of(KEY, version, MAX_SYNC_KEYS)}),
    "/sync/request": record({"from": NODE_ID}),
}


def check_body(route: str, body):
    """
    ``body`` if it fits the schema of ``route``.

    :raises SchemaError: naming what does not fit.
    """
    return SCHEMAS[route](body)


def check_entries(entries):
    """
    The entries of a binary batch (:func:`~kvresponder.wire.decode_batch` checked their framing, key length
    and UTF-8) if each version names a well-formed node id and each expiry is finite. Values are not parsed:
    a batch can hold thousands, on the write path.

    :raises SchemaError: naming the first entry that does not fit, or the batch if it holds more than
        :data:`MAX_SYNC_KEYS` entries (as the JSON form may): applied in one reactor turn, a frame of small
        tombstones could hold hundreds of thousands.
    """
    if len(entries) > MAX_SYNC_KEYS:
        raise SchemaError("entries", "at most %d entries a batch" % (MAX_SYNC_KEYS,))
    seen = set()
    for index, entry in enumerate(entries):
        node = entry.version[2]
        if node not in seen:
            _check(NODE_ID, node, "%d.ver.2" % (index,))
            seen.add(node)
        expires_at = entry.expires_at
        if expires_at is not None and not math.isfinite(expires_at):
            raise SchemaError("%d.exp" % (index,), "must be finite")
    return entries
