"""
The local store: versioned entries with TTLs, a byte-bounded LRU and tombstones.

The store is pure: it knows nothing of peers, HTTP or the reactor. Time comes from an injected ``seconds``
function and every decision depends only on the versions of the entries, so that applying the same entries in
any order leaves the same state (see :mod:`kvresponder.hlc`).

Inside, an entry is not kept as an :class:`Entry`: each live entry is one packed bytes object (a fixed
header, the key's UTF-8 bytes, then the value) filed in a dict under a slot number taken from the key's hash,
and :class:`Entry` objects are built when they are read. One small object per entry instead of five or six is
what keeps the memory per key low (see :data:`ENTRY_OVERHEAD`).
"""

import heapq
import struct
from itertools import islice
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from .hlc import Version
from .keyindex import KeyIndex

#: What one entry costs beyond its key and value bytes: its dict slot (with the spare room a dict keeps), the
#: slot number, and the packed bytes object of header, key and value, with the allocator's rounding. It keeps
#: the accounted size close to the real one, so that MAX_MEMORY bounds the process and not only the payload:
#: it sits above what bench/memory.py measures on both interpreters (docs/PERFORMANCE.md), including CPython's
#: regrowth of a dict that has deleted slots to three times its live keys, and the jumps of dict sizes, which are
#: powers of two.
ENTRY_OVERHEAD = 200

#: What an expiry adds to the cost of a live entry that has one: its item in the expiry heap (a tuple of the
#: expiry's float and the slot's int, and the heap's pointer to it: 88 bytes on CPython), and the items that
#: entries replaced, deleted or evicted before their expiry leave behind until the sweep rebuilds the heap, at
#: most half as many again (see :meth:`Store.sweep`). Without it, a store of small entries with a TTL held
#: far more than its accounted size once overwritten a few times.
EXPIRY_OVERHEAD = 136
#: The expiry heap's dead items are dropped all at once while the heap holds at most this many items; a larger
#: heap is compacted a few items a write and many a sweep, into a new one: all at once, a million items held the
#: reactor for seconds, in the write that passed the bound.
COMPACT_AT_ONCE = 4096
COMPACT_PER_WRITE = 4
COMPACT_PER_SWEEP = 4096
#: Expired entries, and tombstones past their grace, reclaimed at most by a write that passes the budget, before
#: it evicts anything.
EVICT_RECLAIM = 64

#: What one tombstone costs beyond its key bytes: the dict slot, the key and the packed header (measured the
#: same way, with room for what churn adds).
TOMBSTONE_OVERHEAD = 200

# The packed header: wall_ms, counter, the index of the node id in the store's table of node ids, a time (the
# expiry of a live entry, 0.0 for none: a live entry's expiry is always later than the time it was written,
# which is never before 0; or the time a tombstone was written, on the store's monotonic clock), and the
# length of the key that follows it. A
# live entry's key and then its value follow; a tombstone (key length 0: tombstones are filed under their
# key) is followed by its expiry if it has one.
#
# The key length's top bit (_LEAVES_TOMBSTONE) marks a live entry with an expiry that superseded an older
# version of its key on this store, and so leaves a tombstone of its version when it expires (Store.apply sets
# it, Store.sweep says why). It is local, never sent: what this replica held. Keys are at most 1024 bytes
# (wire.MAX_KEY_BYTES; the public API's cap is lower), so that bit is never part of a length, and the store
# refuses a key long enough to reach it rather than misread it. Of the spare bits it costs least: no version
# comparison reads this field (the node index is read by each), its few readers mask the bit off with one AND,
# and the other fields have none to spare (wall and counter take whatever a peer sends, and the sweep matches
# the time exactly).
_HEADER = struct.Struct("<QIIdH")
_HEADER_SIZE = _HEADER.size
_TIME = struct.Struct("<d")
_TIME_OFFSET = 16
_unpack = _HEADER.unpack_from
_unpack_time = _TIME.unpack_from
_LEAVES_TOMBSTONE = 0x8000
_KEY_LENGTH = 0x7FFF
# The mark as it sits in the packed bytes: the top bit of the little-endian key length's high byte.
_MARK_BYTE = 25
_MARK_BIT = 0x80

# The node index meaning "the version did not fit the header; the packed object holds it".
_WIDE = 0

# Accounted size of a live entry from its packed bytes (which hold its key).
_LIVE_EXTRA = ENTRY_OVERHEAD - _HEADER_SIZE

# Live entries are filed under 60 bits of their key's hash: an int key costs less than a bytes key (none at
# all in PyPy's int-keyed dicts, which keep their keys unboxed; on CPython, an int under 2**60 is as small
# as a 10-byte key's bytes object). The key inside the entry tells two keys of one slot apart, and a key
# whose slot another key holds is filed under its bytes in a second dict. The hash of bytes is salted per
# process, so no client can aim keys at one slot.
_SLOT_MASK = (1 << 60) - 1


def _holds(packed: bytes, bkey: bytes) -> bool:
    """
    Whether the live entry ``packed`` is the entry of ``bkey``.
    """
    # The key length, without the mark (see _HEADER).
    return packed[24] | (packed[25] & 0x7F) << 8 == len(bkey) and packed.startswith(bkey, _HEADER_SIZE)


def _another_write(bkey: bytes, existing: Optional[bytes], value: Optional[bytes]) -> bool:
    """
    Whether ``value``, stamped with the very version the store holds for ``bkey`` (``existing``, its live entry,
    or ``None`` for its tombstone), is another write's: a node issued one version twice (its clock set back
    across a restart, which starts its hybrid logical clock afresh). Answered as a newer version, so that the
    writer stamps its write again above it; taken as a copy already held, the write would be acknowledged and
    stored nowhere. (Expiries are not compared: a copy's is worked out again on each node.)
    """
    if existing is None:
        return value is not None
    # Compared in place: hand-offs send an owner many entries it holds already, values of up to MAX_VALUE_SIZE.
    return value is None or len(existing) != _HEADER_SIZE + len(bkey) + len(value) or not existing.endswith(value)


def _key_of(packed: bytes) -> bytes:
    return packed[_HEADER_SIZE:_HEADER_SIZE + (packed[24] | (packed[25] & 0x7F) << 8)]


def _leaves_tombstone(packed: bytes) -> bool:
    """
    Whether the live entry ``packed`` leaves a tombstone of its version when it expires.
    """
    return packed[_MARK_BYTE] & _MARK_BIT != 0


def _marked(packed: bytes) -> bytes:
    """
    The live entry ``packed`` with the mark set: the same bytes otherwise, and the same type (a wide version
    keeps its version).
    """
    marked = packed[:_MARK_BYTE] + bytes((packed[_MARK_BYTE] | _MARK_BIT,)) + packed[_MARK_BYTE + 1:]
    if type(packed) is _WideVersion:
        wide = _WideVersion(marked)
        wide.version = packed.version  # type: ignore
        return wide
    return marked


class Entry:
    """
    One version of one key, as stored and as replicated.

    :ivar str key: the key.
    :ivar value: the value as serialized JSON bytes, or ``None`` for a tombstone.
    :ivar version: the :data:`~kvresponder.hlc.Version` of the write.
    :ivar expires_at: absolute wall time in seconds after which the entry is gone, or ``None``.
    """

    __slots__ = ("key", "value", "version", "expires_at", "size")

    def __init__(self, key: str, value: Optional[bytes], version: Version,
                 expires_at: Optional[float] = None) -> None:
        self.key = key
        self.value = value
        self.version = version
        self.expires_at = expires_at
        key_bytes = len(key) if key.isascii() else len(key.encode("utf-8"))
        if value is None:
            self.size = key_bytes + TOMBSTONE_OVERHEAD
        else:
            self.size = key_bytes + len(value) + ENTRY_OVERHEAD
            if expires_at is not None:
                self.size += EXPIRY_OVERHEAD

    @property
    def is_tombstone(self) -> bool:
        return self.value is None

    def __repr__(self) -> str:
        return "Entry(%r, %r, %r, %r)" % (self.key, self.value, self.version, self.expires_at)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.key, self.value, self.version, self.expires_at) == (
            other.key, other.value, other.version, other.expires_at)


# Builds an Entry without running __init__, for entries whose size the store already knows.
_new_entry = object.__new__


class ApplyResult(NamedTuple):
    """
    :ivar applied: the entry was newer than what the store held, and is now the current version.
    :ivar had_live: the store held a live (unexpired, non-tombstone) value for the key before.
    :ivar newer: when the entry was not applied because the store holds a strictly newer version of the key
        (a live value or a tombstone), that version; else ``None``. A coordinator whose write lost to it
        stamps the write again above it (see :mod:`kvresponder.coordinator`).
    """
    applied: bool
    had_live: bool
    newer: Optional[Version] = None


# The answers of an applied entry, shared (they are immutable) rather than built for each entry of a batch.
_APPLIED_OVER_LIVE = ApplyResult(True, True)
_APPLIED_NEW = ApplyResult(True, False)


class EntryTooLarge(Exception):
    """
    The entry alone is larger than the whole memory budget.
    """


class _WideVersion(bytes):
    """
    A packed entry whose version does not fit the header (a wall time or counter out of range, which only a
    misbehaving peer sends): its header's node index is ``_WIDE`` and the version is kept here.
    """

    version: Version


class _NoEvents:
    def evicted(self, count: int) -> None:
        pass

    def tombstones_evicted(self, count: int) -> None:
        pass

    def expired(self, count: int) -> None:
        pass


class Store:
    """
    The entries one node holds.

    :param seconds: returns the current wall time in seconds.
    :param int max_bytes: the memory budget; the accounted size never exceeds it.
    :param float tombstone_grace: seconds a tombstone is kept before it may be collected.
    :param events: receives ``evicted(n)`` (live entries), ``tombstones_evicted(n)`` and ``expired(n)``, for
        metrics.
    :param monotonic: a clock that never steps, in seconds, that ages tombstones: on the wall clock a step
        forward would collect every tombstone at once (an older copy of a deleted value could then come back),
        and one stamped while the clock ran ahead would hold back the collection of every later one. By
        default ``seconds``.
    """

    def __init__(self, seconds: Callable[[], float], max_bytes: int,
                 tombstone_grace: float = 600.0, events=None,
                 monotonic: Optional[Callable[[], float]] = None) -> None:
        self._seconds = seconds
        self._monotonic = monotonic or seconds
        self.max_bytes = max_bytes
        self.tombstone_grace = tombstone_grace
        self._events = events if events is not None else _NoEvents()
        # Live entries by slot, least recently used first (a plain dict keeps insertion order; a use moves
        # the entry to the end); and the few whose slot another key holds, by their key's UTF-8 bytes.
        self._live: Dict[int, bytes] = {}
        self._spill: Dict[bytes, bytes] = {}
        # Tombstones in the order they were written.
        self._tombstones: Dict[bytes, bytes] = {}
        # The node ids of the stored versions, by the index their headers hold (index 0 is _WIDE).
        self._node_ids: List[Optional[str]] = [None]
        self._node_index: Dict[str, int] = {}
        # (expiry, slot) of the live entries that have an expiry; those filed by key are checked by sweep.
        self._expiries: List[Tuple[float, int]] = []
        # The heap before a compaction began, its items moved into ``_expiries`` in expiry order, the dead ones
        # left behind (empty between compactions). Sweeps reclaim what is due from both.
        self._draining: List[Tuple[float, int]] = []
        self._last_moved: Optional[Tuple[float, int]] = None
        # How many live entries have an expiry: the heaps hold an item for each, and those of the entries
        # dropped since they were last compacted.
        self._expiring = 0
        #: The keys in order, for listing pages.
        self._index = KeyIndex(self._live_keys, self._monotonic)
        self.bytes = 0
        self.evictions = 0
        #: Tombstones evicted: each a delete that a replica which missed it may undo (ARCHITECTURE.md).
        self.tombstone_evictions = 0
        self.expirations = 0
        #: Whether the last :meth:`sweep` stopped at its limit with more due.
        self.sweep_behind = False
        #: Counts every change to the stored entries, so that summaries of them can tell they are stale.
        self.changes = 0
        #: Bytes of entries dropped so far (replaced, deleted, evicted, expired, handed off).
        self.released_bytes = 0

    # -- reads ----------------------------------------------------------------------------------------

    def get(self, key: str) -> Optional[Entry]:
        """
        The live entry for ``key``, or ``None`` if it is absent, deleted or expired. A hit counts as a use
        for the LRU order.
        """
        try:
            bkey = key.encode()
        except UnicodeEncodeError:
            return None
        table = self._live
        filed = hash(bkey) & _SLOT_MASK
        # Taken out and put back at the end: a hit is a use, for the LRU order.
        packed = table.pop(filed, None)
        if packed is None or not _holds(packed, bkey):
            if packed is not None:
                # Another key's entry (a slot collision: about one pair in 2**60): back it goes.
                table[filed] = packed
            if not self._spill:
                return None
            table = self._spill
            filed = bkey
            packed = table.pop(bkey, None)
            if packed is None:
                return None
        wall, counter, index, expires_at, length = _unpack(packed)
        if expires_at and expires_at <= self._seconds():
            # Already taken out of its table above: only its tombstone, if it leaves one, is left to write.
            self._reclaim_expired(bkey, packed)
            return None
        table[filed] = packed
        return self._as_entry(key, packed, wall, counter, index, expires_at, length & _KEY_LENGTH)

    def _peek(self, key: str) -> Optional[Entry]:
        """
        :meth:`get`, leaving the entry's place in the LRU order alone.
        """
        try:
            bkey = key.encode()
        except UnicodeEncodeError:
            return None
        packed = self._find(bkey)
        if packed is None:
            return None
        wall, counter, index, expires_at, length = _unpack(packed)
        if expires_at and expires_at <= self._seconds():
            self._drop(bkey, packed)
            self._reclaim_expired(bkey, packed)
            return None
        return self._as_entry(key, packed, wall, counter, index, expires_at, length & _KEY_LENGTH)

    def _reclaim_expired(self, bkey: bytes, packed: bytes) -> None:
        """
        Reclaim and count ``bkey``'s expired live entry ``packed``, found by a read and taken out of its table.
        """
        self._expired(bkey, packed)
        self._index.removed()
        self.expirations += 1
        self._events.expired(1)

    def current(self, key: str, use: bool = True) -> Optional[Entry]:
        """
        The newest entry for ``key`` this store knows, tombstones included, for replicas to compare
        versions. An expired entry is reported as the tombstone it leaves, or as absent if it leaves none
        (see :meth:`sweep`).

        :param bool use: a live entry found counts as a use for the LRU order, as a :meth:`get` does: a
            client's read. ``False`` for the node's own bookkeeping (anti-entropy comparing versions, or
            sending what a peer lacks), which must not make the keys it looks at the last to be evicted.
        """
        entry = self.get(key) if use else self._peek(key)
        if entry is not None:
            return entry
        try:
            packed = self._tombstones.get(key.encode())
        except UnicodeEncodeError:
            return None
        return None if packed is None else self._tombstone_entry(key, packed)

    def __len__(self) -> int:
        return len(self._live) + len(self._spill)

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    def keys(self, prefix: str = "", after: Optional[str] = None, limit: int = 1000) -> List[str]:
        """
        Live keys in code point order that start with ``prefix`` and sort after ``after``, at most
        ``limit`` of them.
        """
        # UTF-8 bytes sort in code point order, and "surrogatepass" keeps a lone surrogate in its place too.
        bprefix = prefix.encode("utf-8", "surrogatepass")
        if after is not None and after >= prefix:
            ordered = self._index.since(after.encode("utf-8", "surrogatepass"), inclusive=False)
        else:
            ordered = self._index.since(bprefix, inclusive=True)
        now = self._seconds()
        result = []
        for bkey in ordered:
            if len(result) >= limit or not bkey.startswith(bprefix):
                break
            packed = self._find(bkey)
            if packed is None:
                continue
            expires_at = _unpack_time(packed, _TIME_OFFSET)[0]
            if expires_at and expires_at <= now:
                continue
            result.append(bkey.decode())
        return result

    def entries(self, include_tombstones: bool = True) -> Iterator[Entry]:
        """
        Every entry (live, and tombstones unless told otherwise), safe to consume while the store changes:
        the entries are those held when this is called, each read as the iteration reaches it. A live entry
        that is gone by then (deleted, evicted, handed off) is skipped, one that has expired and is not yet
        swept is yielded as the tombstone it leaves (skipped if it leaves none, or without tombstones), a key
        rewritten meanwhile is yielded as it is then, and each key is yielded at most once. (Under a slot
        collision, about one pair of keys in 2**60, a key that took an emptied slot may be yielded in the
        place of the one that left.)
        """
        # The slots held now (the dict's own int objects, not copies of the keys, and not the entries: an
        # entry dropped meanwhile is freed at once, even while a long rebalance pass is under way).
        slots = list(self._live)
        by_key = list(self._spill)
        if include_tombstones:
            by_key += list(self._tombstones)
        return self._entries_of(slots, by_key, include_tombstones)

    def _entries_of(self, slots: List[int], by_key: List[bytes],
                    include_tombstones: bool) -> Iterator[Entry]:
        live = self._live
        find = self._find
        tombstones = self._tombstones
        live_entry = self._live_entry
        for slot in slots:
            packed = live.get(slot)
            if packed is not None:
                entry = live_entry(packed, include_tombstones)
                if entry is not None:
                    yield entry
        for bkey in by_key:
            packed = find(bkey)
            if packed is not None:
                entry = live_entry(packed, include_tombstones)
                if entry is not None:
                    yield entry
            elif include_tombstones:
                packed = tombstones.get(bkey)
                if packed is not None:
                    yield self._tombstone_entry(bkey.decode(), packed)

    def _live_entry(self, packed: bytes, expired_as_tombstone: bool) -> Optional[Entry]:
        """
        The :class:`Entry` of a packed live entry. If it has expired: the tombstone it leaves when it is
        swept if ``expired_as_tombstone`` and it leaves one, else ``None``. (Read only: the sweep or a
        ``get`` writes the tombstone, and a rebalance pass that hands this one off and forgets the entry
        leaves none.)
        """
        wall, counter, index, expires_at, length = _unpack(packed)
        leaves_tombstone = length & _LEAVES_TOMBSTONE
        length &= _KEY_LENGTH
        if expires_at and expires_at <= self._seconds():
            if not (expired_as_tombstone and leaves_tombstone):
                return None
            return Entry(packed[_HEADER_SIZE:_HEADER_SIZE + length].decode(), None, self._version(packed))
        return self._as_entry(packed[_HEADER_SIZE:_HEADER_SIZE + length].decode(), packed, wall, counter, index,
                              expires_at, length)

    def _as_entry(self, key: str, packed: bytes, wall: int, counter: int, index: int, expires_at: float,
                  length: int) -> Entry:
        # Entry.__init__ would work out the size again: on a read its cost would double that of the read.
        entry = _new_entry(Entry)
        entry.key = key
        entry.value = packed[_HEADER_SIZE + length:]
        entry.version = (wall, counter, self._node_ids[index]) if index else packed.version  # type: ignore
        entry.expires_at = expires_at or None
        entry.size = len(packed) + _LIVE_EXTRA + (EXPIRY_OVERHEAD if expires_at else 0)
        return entry

    # -- writes ---------------------------------------------------------------------------------------

    def check_fits(self, key: str, value: bytes, ttl: Optional[float] = None) -> None:
        """
        :param ttl: the entry's TTL, if it has one (its expiry costs :data:`EXPIRY_OVERHEAD`).
        :raises EntryTooLarge: if an entry of this key and value could never fit in the budget.
        """
        # Entry's size, without building one: a bulk request checks each of its entries this way.
        key_bytes = len(key) if key.isascii() else len(key.encode("utf-8"))
        if key_bytes + len(value) + ENTRY_OVERHEAD + (0 if ttl is None else EXPIRY_OVERHEAD) > self.max_bytes:
            raise EntryTooLarge(key)

    def apply(self, entry: Entry) -> ApplyResult:
        """
        Make ``entry`` the current version of its key if it is newer than what the store holds; otherwise
        keep the newer one. Applying the same entries in any order gives the same state.

        An entry with an expiry stored over an older version of its key (a live value, a tombstone, or an
        expired entry that leaves one) is marked to leave a tombstone when it expires; so is one that an older
        version arrives for later, which this store refuses. Either order of arrival marks it (see
        :meth:`sweep`).

        :raises EntryTooLarge: if the entry alone exceeds the budget.
        :raises ValueError: if a value's key is longer than the packed header holds (see :data:`_HEADER`).
        """
        if entry.size > self.max_bytes:
            raise EntryTooLarge(entry.key)
        bkey = entry.key.encode()
        if len(bkey) > _KEY_LENGTH and entry.value is not None:
            # Before anything changes (_pack would refuse it too late: the older version would be gone).
            raise ValueError("a key is at most %d bytes" % (_KEY_LENGTH,))
        now = self._seconds()
        existing = self._find(bkey)
        if existing is not None:
            wall, counter, index, expires_at, length = _unpack(existing)
            had_live = not expires_at or expires_at > now
            # An expired entry not yet swept stands for what the sweep leaves of it: its tombstone, or nothing.
            held_older = had_live or length & _LEAVES_TOMBSTONE
            newest: Optional[Version] = (
                (wall, counter, self._node_ids[index]) if index else existing.version)  # type: ignore
            tomb = None
        else:
            had_live = False
            tomb = self._tombstones.get(bkey)
            held_older = tomb is not None
            newest = None if tomb is None else self._version(tomb)
        if newest is not None and entry.version <= newest:
            if entry.version < newest:
                if existing is not None and expires_at and not length & _LEAVES_TOMBSTONE:
                    self._mark(bkey, existing)
                return ApplyResult(False, had_live, newest)
            if _another_write(bkey, existing, entry.value):
                return ApplyResult(False, had_live, newest)
            return ApplyResult(False, had_live)

        self.changes += 1
        if existing is not None:
            self._drop(bkey, existing)
            # _released_live, with the expiry already unpacked above (an overwrite is the usual PUT).
            size = len(existing) + _LIVE_EXTRA
            if expires_at:
                size += EXPIRY_OVERHEAD
                self._expiring -= 1
            self._released(size)
        elif tomb is not None:
            del self._tombstones[bkey]
            self._released(len(bkey) + TOMBSTONE_OVERHEAD)

        value = entry.value
        expires_at = entry.expires_at
        if existing is not None and (value is None or expires_at is not None and expires_at <= now):
            # The key leaves the table (a tombstone takes its place).
            self._index.removed()
        if value is None:
            self._tombstones[bkey] = self._pack(entry.version, self._monotonic(), b"", b"" if expires_at is None
                                                else _TIME.pack(expires_at))
            self.bytes += len(bkey) + TOMBSTONE_OVERHEAD
        elif expires_at is not None and expires_at <= now:
            # A newer write that has already expired hides every older version, as a delete would: keep its
            # version as a tombstone, so an older write arriving later cannot bring the old value back.
            self._tombstones[bkey] = self._pack(entry.version, self._monotonic(), b"", b"")
            self.bytes += len(bkey) + TOMBSTONE_OVERHEAD
        else:
            slot = self._file(bkey, self._pack(entry.version, expires_at or 0.0, bkey, value,
                                               expires_at is not None and held_older))
            self.bytes += entry.size
            if existing is None:
                self._index.added(bkey)
            if expires_at is not None:
                # The slot's int is the dict's own key object: the heap item shares it.
                heapq.heappush(self._expiries, (expires_at, slot))
                self._expiring += 1
                if self._draining:
                    self._compact(COMPACT_PER_WRITE)
                elif self._expiries_overgrown():
                    # Overwrites of keys with a TTL leave an item each: a burst between two sweeps must not
                    # hold more than EXPIRY_OVERHEAD accounts for.
                    self._start_compaction()
        self._evict(tombstone_written=value is None or expires_at is not None and expires_at <= now)
        return ApplyResult(True, had_live)

    def apply_many(self, entries: List[Entry]) -> List[ApplyResult]:
        """
        :meth:`apply` each entry in turn: the same results, and the same state after. The common entry of a
        batch (a bulk write, a peer's batch), a value with no expiry for a key that holds a live value in its
        slot or nothing at all, is applied here without the five calls :meth:`apply` makes for it, which cost
        more than the work itself on CPython (PyPy inlines them). Any other entry goes through :meth:`apply`.

        :raises EntryTooLarge: if an entry alone exceeds the budget (the entries before it are applied).
        """
        live = self._live
        spill = self._spill
        tombstones = self._tombstones
        node_ids = self._node_ids
        max_bytes = self.max_bytes
        results = []
        append = results.append
        for entry in entries:
            value = entry.value
            if value is None or entry.expires_at is not None or spill or entry.size > max_bytes:
                append(self.apply(entry))
                continue
            bkey = entry.key.encode()
            slot = hash(bkey) & _SLOT_MASK
            existing = live.get(slot)
            if existing is None:
                if bkey in tombstones:
                    append(self.apply(entry))
                    continue
                had_live = False
            else:
                wall, counter, index, expires_at, _ = _unpack(existing)
                if not index or not _holds(existing, bkey):
                    # A version too wide for the header, or another key's entry in the slot: rare.
                    append(self.apply(entry))
                    continue
                had_live = not expires_at or expires_at > self._seconds()
                newest = (wall, counter, node_ids[index])
                version = entry.version
                if version <= newest:
                    if version < newest:
                        if expires_at and not _leaves_tombstone(existing):
                            # An older version exists: the entry leaves a tombstone (as apply does).
                            live[slot] = _marked(existing)
                        append(ApplyResult(False, had_live, newest))
                    elif _another_write(bkey, existing, value):
                        append(ApplyResult(False, had_live, newest))
                    else:
                        append(ApplyResult(False, had_live))
                    continue
                del live[slot]
                released = len(existing) + _LIVE_EXTRA
                if expires_at:
                    released += EXPIRY_OVERHEAD
                    self._expiring -= 1
                self.bytes -= released
                self.released_bytes += released
            packed = self._pack(entry.version, 0.0, bkey, value)
            self.changes += 1
            # The slot is empty now: the entry goes in last, as the most recently used (what _file does).
            live[slot] = packed
            self.bytes += entry.size
            if existing is None:
                self._index.added(bkey)
            if self.bytes > max_bytes:
                self._evict()
            append(_APPLIED_OVER_LIVE if had_live else _APPLIED_NEW)
        return results

    def forget(self, key: str, version: Version) -> bool:
        """
        Drop the local copy of ``key`` if it is still at ``version``, without leaving a tombstone: the copy
        now lives on other nodes (handoff). A newer local write is kept.
        """
        try:
            bkey = key.encode()
        except UnicodeEncodeError:
            return False
        packed = self._find(bkey)
        if packed is not None and self._version(packed) == version:
            self._drop(bkey, packed)
            self._released_live(packed)
            self._index.removed()
            self.changes += 1
            return True
        packed = self._tombstones.get(bkey)
        if packed is not None and self._version(packed) == version:
            del self._tombstones[bkey]
            self._released(len(bkey) + TOMBSTONE_OVERHEAD)
            return True
        return False

    def sweep(self, limit: Optional[int] = None) -> int:
        """
        Reclaim expired entries and tombstones past their grace period: up to ``limit`` of each in one call
        (``None``: all). A call that stopped at its limit leaves :attr:`sweep_behind` true, and the next goes on
        where it stopped: a bulk load of keys given one TTL expires in the same second, and reclaiming them all
        at once would hold the reactor (heartbeats, probes, peers' calls) for as long as that takes.

        An expired entry that superseded an older version of its key here (marked by :meth:`apply`) leaves a
        tombstone of its own version, kept for ``tombstone_grace`` as a delete's is: a replica or a hint that
        missed the write may still hold that older value, and only a version at least as new stops hint
        handoff and anti-entropy from bringing it back. A newer write still wins over it, an older one does
        not. Any other expired entry goes without a trace: it hid nothing on this store, and a TTL workload of
        new keys would otherwise hold a tombstone for each key it wrote in the last ``tombstone_grace``
        seconds, and evict live entries to keep them. (The copy on an owner that did hold an older value is
        marked there, and its tombstone repairs the replicas that missed the write.)

        :return: how many expired entries were reclaimed.
        """
        self._index.drop_if_idle()
        expired, behind = self._reclaim_due(limit)
        if self._draining:
            self._compact(COMPACT_PER_SWEEP)
        elif not behind and self._expiries_overgrown():
            self._start_compaction()
        # A compaction under way goes on in the sweeps that follow at once, as a backlog of expiries does.
        self.sweep_behind = behind or bool(self._draining)
        return expired

    def _reclaim_due(self, limit: Optional[int]) -> Tuple[int, bool]:
        """
        Reclaim up to ``limit`` expired entries and as many tombstones past their grace (:meth:`sweep`).

        :return: how many expired entries were reclaimed, and whether more are due.
        """
        now = self._seconds()
        expired = 0
        heap = self._expiries
        draining = self._draining
        live = self._live
        budget = -1 if limit is None else limit
        while budget:
            if heap and heap[0][0] <= now:
                due = heap
            elif draining and draining[0][0] <= now:
                due = draining
            else:
                break
            budget -= 1
            expires_at, slot = heapq.heappop(due)
            # The slot may hold another entry by now (replaced, or another key's): only one that expires at
            # this very time goes.
            packed = live.get(slot)
            if packed is not None and _unpack_time(packed, _TIME_OFFSET)[0] == expires_at:
                del live[slot]
                self._expired(_key_of(packed), packed)
                expired += 1
        if self._spill:
            # Entries filed by key are out of the heap's reach; there are rarely any.
            for bkey, packed in list(self._spill.items()):
                expires_at = _unpack_time(packed, _TIME_OFFSET)[0]
                if expires_at and expires_at <= now:
                    del self._spill[bkey]
                    self._expired(bkey, packed)
                    expired += 1
        if expired:
            self._index.removed(expired)
            self.expirations += expired
            self._events.expired(expired)
        behind = bool(heap) and heap[0][0] <= now or bool(draining) and draining[0][0] <= now
        cutoff = self._monotonic() - self.tombstone_grace
        stale = []
        for bkey, packed in self._tombstones.items():
            if _unpack_time(packed, _TIME_OFFSET)[0] > cutoff:
                break
            if limit is not None and len(stale) >= limit:
                behind = True
                break
            stale.append(bkey)
        for bkey in stale:
            del self._tombstones[bkey]
            self._released(len(bkey) + TOMBSTONE_OVERHEAD)
        return expired, behind

    def _expiries_overgrown(self) -> bool:
        """
        Whether the heaps hold more dead items than EXPIRY_OVERHEAD accounts for: half as many as the live ones.
        """
        return len(self._expiries) + len(self._draining) > self._expiring + self._expiring // 2 + 64

    def _start_compaction(self) -> None:
        """
        Drop the heap's dead items: replaced, deleted and evicted keys leave theirs behind. Begun once they are half
        as many as the live ones (which EXPIRY_OVERHEAD accounts for), by the sweep or by the write that passes that
        bound, so that the cost per write stays constant. From the heap, not the store: a store of many keys
        without a TTL and a few overwritten ones with one would otherwise be walked whole. A small heap is rebuilt
        at once; a large one is drained into a new one a few items at a time (:meth:`_compact`).
        """
        if len(self._expiries) > COMPACT_AT_ONCE:
            self._draining, self._expiries, self._last_moved = self._expiries, [], None
            self._compact(COMPACT_PER_WRITE)
            return
        live = self._live
        kept = set()
        for expires_at, slot in self._expiries:
            packed = live.get(slot)
            if packed is not None and _unpack_time(packed, _TIME_OFFSET)[0] == expires_at:
                kept.add((expires_at, slot))
        self._expiries = list(kept)
        heapq.heapify(self._expiries)

    def _compact(self, count: int) -> None:
        """
        Move up to ``count`` items of the heap being compacted into the current one, in expiry order: those of
        live entries that still expire then, each once (equal items come out next to each other).
        """
        draining, heap, live, last = self._draining, self._expiries, self._live, self._last_moved
        while draining and count:
            count -= 1
            item = heapq.heappop(draining)
            if item == last:
                continue
            last = item
            packed = live.get(item[1])
            if packed is not None and _unpack_time(packed, _TIME_OFFSET)[0] == item[0]:
                heapq.heappush(heap, item)
        self._last_moved = last if draining else None

    # -- internals ------------------------------------------------------------------------------------

    def _find(self, bkey: bytes) -> Optional[bytes]:
        """
        The packed live entry of ``bkey``, or ``None``; its place in the LRU order is left alone.
        """
        packed = self._live.get(hash(bkey) & _SLOT_MASK)
        if packed is not None and _holds(packed, bkey):
            return packed
        return self._spill.get(bkey) if self._spill else None

    def _file(self, bkey: bytes, packed: bytes) -> int:
        """
        File a live entry for ``bkey``, which holds none, as the most recently used. Another key's entry in
        its slot moves to the entries filed by key, so that the newest entry is always last in the slots'
        order, where eviction leaves it to the end.
        """
        live = self._live
        slot = hash(bkey) & _SLOT_MASK
        other = live.pop(slot, None)
        if other is not None:
            self._spill[_key_of(other)] = other
        live[slot] = packed
        return slot

    def _drop(self, bkey: bytes, packed: bytes) -> None:
        """
        Remove ``bkey``'s live entry ``packed`` (as :meth:`_find` returned it) from where it is filed.
        """
        slot = hash(bkey) & _SLOT_MASK
        if self._live.get(slot) is packed:
            del self._live[slot]
        else:
            del self._spill[bkey]

    def _live_keys(self) -> List[bytes]:
        return list(self._spill) + [_key_of(packed) for packed in self._live.values()]

    def _pack(self, version: Version, time: float, key: bytes, tail: bytes,
              leaves_tombstone: bool = False) -> bytes:
        """
        :param bool leaves_tombstone: the mark of a live entry that leaves a tombstone when it expires.
        """
        length = len(key)
        if length > _KEY_LENGTH:
            # Its top bit would read as the mark. Peers and clients never send such a key (MAX_KEY_BYTES).
            raise ValueError("a key is at most %d bytes" % (_KEY_LENGTH,))
        if leaves_tombstone:
            length |= _LEAVES_TOMBSTONE
        wall, counter, node = version
        index = self._node_index.get(node)
        if index is None:
            index = self._node_index[node] = len(self._node_ids)
            self._node_ids.append(node)
        try:
            return _HEADER.pack(wall, counter, index, time, length) + key + tail
        except (struct.error, OverflowError, TypeError, ValueError):  # PyPy raises some of the latter
            wide = _WideVersion(_HEADER.pack(0, 0, _WIDE, time, length) + key + tail)
            wide.version = version
            return wide

    def _version(self, packed: bytes) -> Version:
        wall, counter, index, _, _ = _unpack(packed)
        return (wall, counter, self._node_ids[index]) if index else packed.version  # type: ignore

    def _tombstone_entry(self, key: str, packed: bytes) -> Entry:
        return Entry(key, None, self._version(packed),
                     _unpack_time(packed, _HEADER_SIZE)[0] if len(packed) > _HEADER_SIZE else None)

    def _expired(self, bkey: bytes, packed: bytes) -> None:
        """
        Reclaim ``bkey``'s expired live entry ``packed``, already taken out of its table, and, if it is marked
        to leave one, write a tombstone of its version now. A key holds a live entry or a tombstone, never
        both, so the tombstone is new and goes last, in the order the sweep collects them. It is never larger
        than the entry (a key's bytes and the overhead, without the value), so the store stays within its
        budget without evicting. Not counted in :attr:`changes`, either way, as before tombstones were left:
        a key that keeps its version leaves a digest current, and one that goes only makes a bucket differ,
        which the key-level exchange settles.
        """
        self._released_live(packed)
        if _leaves_tombstone(packed):
            self._tombstones[bkey] = self._pack(self._version(packed), self._monotonic(), b"", b"")
            self.bytes += len(bkey) + TOMBSTONE_OVERHEAD

    def _mark(self, bkey: bytes, packed: bytes) -> None:
        """
        Mark ``bkey``'s live entry ``packed`` (as :meth:`_find` returned it) to leave a tombstone when it
        expires, in its place: the same key, size and expiry, so its LRU order, the byte count and the
        expiry heap stay as they are.
        """
        slot = hash(bkey) & _SLOT_MASK
        if self._live.get(slot) is packed:
            self._live[slot] = _marked(packed)
        else:
            self._spill[bkey] = _marked(packed)

    def _released_live(self, packed: bytes) -> None:
        """
        Account for the live entry ``packed`` as dropped.
        """
        size = len(packed) + _LIVE_EXTRA
        if _unpack_time(packed, _TIME_OFFSET)[0]:
            size += EXPIRY_OVERHEAD
            self._expiring -= 1
        self._released(size)

    def _released(self, size: int) -> None:
        self.bytes -= size
        self.released_bytes += size

    def _evict(self, tombstone_written: bool = False) -> None:
        """
        :param tombstone_written: the write just applied left a tombstone (a delete), which is then the write to
            keep: evicted, it would let an older copy of the value back, where a live entry evicted is still
            held by its other replicas.
        """
        if self.bytes <= self.max_bytes:
            return
        # What is due goes first, as the sweep would take it: an expired entry evicted as a live one would leave
        # no tombstone where it was marked to (an older copy could come back), and a live one or a tombstone
        # still in its grace would go while such entries held the memory.
        self._reclaim_due(EVICT_RECLAIM)
        if self.bytes <= self.max_bytes:
            return
        live = self._live
        evicted = 0
        # Entries filed by key (a slot collision moved them there; there are rarely any) go first, then the
        # least recently used of the others. The most recent entry, usually the one just written and
        # acknowledged, goes after the tombstones, unless the write was a delete.
        if self._spill:
            evicted += self._evict_oldest(self._spill, len(self._spill), True)
        if self.bytes > self.max_bytes:
            evicted += self._evict_oldest(live, len(live) - (0 if tombstone_written else 1), True)
        # Still over budget: the oldest tombstones go first. Never the one a delete just wrote: it is filed last,
        # fits the budget alone, and a batch is at most 1/64 of the table.
        tombstones = 0
        if self.bytes > self.max_bytes:
            tombstones = self._evict_oldest(self._tombstones, len(self._tombstones), False)
        if self.bytes > self.max_bytes and live:
            evicted += self._evict_oldest(live, 1, True)
        if evicted:
            self._index.removed(evicted)
            self.evictions += evicted
            self._events.evicted(evicted)
        if tombstones:
            self.tombstone_evictions += tombstones
            self._events.tombstones_evicted(tombstones)

    def _evict_oldest(self, table: Dict, candidates: int, live: bool) -> int:
        """
        Drop the oldest of the first ``candidates`` keys of ``table`` until the store is within its budget,
        and at least 1/64 of the table: a dict reuses none of the slots it deletes from its front until it
        is resized, so each walk from the front passes over every key dropped before. Dropping a batch per
        walk keeps steady eviction linear instead of quadratic.

        :param bool live: ``table`` holds live entries (accounted by their packed size), not tombstones
            (accounted by their key's).
        :return: how many keys were dropped.
        """
        if candidates <= 0:
            return 0
        excess = self.bytes - self.max_bytes
        batch = len(table) >> 6
        victims = []
        freed = 0
        for filed, packed in islice(table.items(), candidates):
            if freed >= excess and len(victims) >= batch:
                break
            victims.append(filed)
            if not live:
                freed += len(filed) + TOMBSTONE_OVERHEAD
            elif _unpack_time(packed, _TIME_OFFSET)[0]:
                freed += len(packed) + _LIVE_EXTRA + EXPIRY_OVERHEAD
                self._expiring -= 1
            else:
                freed += len(packed) + _LIVE_EXTRA
        for filed in victims:
            del table[filed]
        self._released(freed)
        return len(victims)
