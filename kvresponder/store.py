"""
The local store: versioned entries with TTLs, a byte-bounded LRU and tombstones.

The store is pure: it knows nothing of peers, HTTP or the reactor. Time comes from an injected ``seconds``
function and every decision depends only on the versions of the entries, so that applying the same entries in
any order leaves the same state (see :mod:`kvresponder.hlc`).
"""

import heapq
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from .hlc import Version

#: What one entry costs beyond its key and value bytes: the OrderedDict slot and link, the entry object,
#: the version tuple and its int, the str/bytes object headers. It keeps the accounted size close to the real
#: one, so that MAX_MEMORY bounds the process and not only the payload: bench/memory.py measured 383 bytes
#: on CPython 3.11 for 1M small entries (docs/PERFORMANCE.md), and a budget accounted at 200 let such a
#: workload hold 1.8x its MAX_MEMORY.
ENTRY_OVERHEAD = 400

#: What one tombstone costs beyond its key bytes (the entry, its version, and the (entry, time) pair).
TOMBSTONE_OVERHEAD = 300


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


class ApplyResult(NamedTuple):
    """
    :ivar applied: the entry was newer than what the store held, and is now the current version.
    :ivar had_live: the store held a live (unexpired, non-tombstone) value for the key before.
    """
    applied: bool
    had_live: bool


class EntryTooLarge(Exception):
    """
    The entry alone is larger than the whole memory budget.
    """


class _NoEvents:
    def evicted(self, count: int) -> None:
        pass

    def expired(self, count: int) -> None:
        pass


class Store:
    """
    The entries one node holds.

    :param seconds: returns the current wall time in seconds.
    :param int max_bytes: the memory budget; the accounted size never exceeds it.
    :param float tombstone_grace: seconds a tombstone is kept before it may be collected.
    :param events: receives ``evicted(n)`` and ``expired(n)``, for metrics.
    """

    def __init__(self, seconds: Callable[[], float], max_bytes: int,
                 tombstone_grace: float = 600.0, events=None) -> None:
        self._seconds = seconds
        self.max_bytes = max_bytes
        self.tombstone_grace = tombstone_grace
        self._events = events if events is not None else _NoEvents()
        self._live: "OrderedDict[str, Entry]" = OrderedDict()
        # Tombstones in the order they were written; each value is (entry, written_at).
        self._tombstones: Dict[str, Tuple[Entry, float]] = {}
        self._expiries: List[Tuple[float, str]] = []
        self._sorted_keys: Optional[List[str]] = None
        self.bytes = 0
        self.evictions = 0
        self.expirations = 0
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
        entry = self._live.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= self._seconds():
            self._drop_live(key, entry)
            self.expirations += 1
            self._events.expired(1)
            return None
        self._live.move_to_end(key)
        return entry

    def current(self, key: str) -> Optional[Entry]:
        """
        The newest entry for ``key`` this store knows, tombstones included, for replicas to compare
        versions. Expired entries are reported as absent.
        """
        entry = self.get(key)
        if entry is not None:
            return entry
        tomb = self._tombstones.get(key)
        return tomb[0] if tomb is not None else None

    def __len__(self) -> int:
        return len(self._live)

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    def keys(self, prefix: str = "", after: Optional[str] = None, limit: int = 1000) -> List[str]:
        """
        Live keys in code point order that start with ``prefix`` and sort after ``after``, at most
        ``limit`` of them.
        """
        if self._sorted_keys is None:
            self._sorted_keys = sorted(self._live)
        ordered = self._sorted_keys
        start = after if after is not None and after >= prefix else prefix
        index = bisect_right(ordered, start) if start == after else bisect_left(ordered, start)
        now = self._seconds()
        result = []
        live = self._live
        while index < len(ordered) and len(result) < limit:
            key = ordered[index]
            index += 1
            if not key.startswith(prefix):
                break
            entry = live.get(key)
            if entry is None or (entry.expires_at is not None and entry.expires_at <= now):
                continue
            result.append(key)
        return result

    def entries(self, include_tombstones: bool = True) -> Iterator[Entry]:
        """
        A snapshot of every entry (live, and tombstones unless told otherwise), safe to consume while the
        store changes. Expired entries are skipped.
        """
        now = self._seconds()
        snapshot = [e for e in self._live.values() if e.expires_at is None or e.expires_at > now]
        if include_tombstones:
            snapshot.extend(tomb for tomb, _ in self._tombstones.values())
        return iter(snapshot)

    # -- writes ---------------------------------------------------------------------------------------

    def check_fits(self, key: str, value: bytes) -> None:
        """
        :raises EntryTooLarge: if an entry of this key and value could never fit in the budget.
        """
        if Entry(key, value, (0, 0, "")).size > self.max_bytes:
            raise EntryTooLarge(key)

    def apply(self, entry: Entry) -> ApplyResult:
        """
        Make ``entry`` the current version of its key if it is newer than what the store holds; otherwise
        keep the newer one. Applying the same entries in any order gives the same state.

        :raises EntryTooLarge: if the entry alone exceeds the budget.
        """
        if entry.size > self.max_bytes:
            raise EntryTooLarge(entry.key)
        key = entry.key
        now = self._seconds()
        existing = self._live.get(key)
        had_live = existing is not None and (existing.expires_at is None or existing.expires_at > now)
        if existing is not None:
            newest = existing.version
        else:
            tomb = self._tombstones.get(key)
            newest = tomb[0].version if tomb is not None else None
        if newest is not None and entry.version <= newest:
            return ApplyResult(False, had_live)

        self.changes += 1
        if existing is not None:
            self._drop_live(key, existing)
        else:
            self._drop_tombstone(key)

        if entry.value is None:
            self._tombstones[key] = (entry, now)
            self.bytes += entry.size
        elif entry.expires_at is not None and entry.expires_at <= now:
            # A newer write that has already expired hides every older version, as a delete would: keep its
            # version as a tombstone, so an older write arriving later cannot bring the old value back.
            tomb = Entry(key, None, entry.version, None)
            self._tombstones[key] = (tomb, now)
            self.bytes += tomb.size
        else:
            self._live[key] = entry
            self.bytes += entry.size
            if self._sorted_keys is not None and existing is None:
                self._sorted_keys = None
            if entry.expires_at is not None:
                heapq.heappush(self._expiries, (entry.expires_at, key))
        self._evict()
        return ApplyResult(True, had_live)

    def forget(self, key: str, version: Version) -> bool:
        """
        Drop the local copy of ``key`` if it is still at ``version``, without leaving a tombstone: the copy
        now lives on other nodes (handoff). A newer local write is kept.
        """
        existing = self._live.get(key)
        if existing is not None and existing.version == version:
            self._drop_live(key, existing)
            self.changes += 1
            return True
        tomb = self._tombstones.get(key)
        if tomb is not None and tomb[0].version == version:
            self._drop_tombstone(key)
            return True
        return False

    def sweep(self) -> int:
        """
        Reclaim expired entries and tombstones past their grace period.

        :return: how many expired entries were reclaimed.
        """
        now = self._seconds()
        expired = 0
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            entry = self._live.get(key)
            if entry is not None and entry.expires_at == expires_at:
                self._drop_live(key, entry)
                expired += 1
        if expired:
            self.expirations += expired
            self._events.expired(expired)
        cutoff = now - self.tombstone_grace
        stale = []
        for key, (_, written_at) in self._tombstones.items():
            if written_at > cutoff:
                break
            stale.append(key)
        for key in stale:
            self._drop_tombstone(key)
        if len(heap) > 2 * len(self._live) + 64:
            # Replaced and deleted keys leave dead heap items behind; rebuild so the heap stays bounded.
            self._expiries = [(e.expires_at, k) for k, e in self._live.items() if e.expires_at is not None]
            heapq.heapify(self._expiries)
        return expired

    # -- internals ------------------------------------------------------------------------------------

    def _drop_live(self, key: str, entry: Entry) -> None:
        del self._live[key]
        self.bytes -= entry.size
        self.released_bytes += entry.size
        self._sorted_keys = None

    def _drop_tombstone(self, key: str) -> None:
        tomb = self._tombstones.pop(key, None)
        if tomb is not None:
            self.bytes -= tomb[0].size
            self.released_bytes += tomb[0].size

    def _evict(self) -> None:
        if self.bytes <= self.max_bytes:
            return
        evicted = 0
        live = self._live
        # The most recent entry, usually the one just written and acknowledged, goes after the tombstones.
        while self.bytes > self.max_bytes and len(live) > 1:
            key, entry = live.popitem(last=False)
            self.bytes -= entry.size
            self.released_bytes += entry.size
            evicted += 1
        # Still over budget: the oldest tombstones go first.
        while self.bytes > self.max_bytes and self._tombstones:
            self._drop_tombstone(next(iter(self._tombstones)))
        if self.bytes > self.max_bytes and live:
            key, entry = live.popitem(last=False)
            self.bytes -= entry.size
            self.released_bytes += entry.size
            evicted += 1
        if evicted:
            self._sorted_keys = None
            self.evictions += evicted
            self._events.evicted(evicted)

