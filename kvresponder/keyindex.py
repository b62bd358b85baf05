"""
The store's keys in code point order, for listing pages (:meth:`kvresponder.store.Store.keys`).

Sorting every key for each page would hold a large store's reactor for the whole sort, page after page, while writes
go on (bench/results/HISTORY.md, run 24, has the measurement); so the order is kept across changes instead. The first listing sorts every key.
After it:

- an overwrite changes nothing;
- a key that goes (deleted, expired, evicted, handed off) stays in the order, only counted: a page skips the
  keys the store no longer holds;
- a new key goes into a side list, sorted when a page next needs it (a sorted run and a few new keys: cheap),
  and a page walks both lists together.

Once the side list passes an eighth of the main one, or the keys gone do (a page walks past them), the next page
sorts every key again. So a page costs its own length, a few bisections, and at most an eighth of the keys gone,
and every key's share of a full sort is paid once for each eighth of the keys that is new or gone.

The order is a copy of every key, which the store's budget does not count: it is dropped once no page has
asked for it for :data:`IDLE_SECONDS`.
"""

from bisect import bisect_left, bisect_right
from typing import Callable, Iterator, List, Optional

#: Seconds without a page after which the order is dropped (the next page sorts every key again).
IDLE_SECONDS = 60.0


class KeyIndex:
    """
    :param every_key: returns every key the store holds, as UTF-8 bytes (in any order).
    :param seconds: the clock.
    """

    def __init__(self, every_key: Callable[[], List[bytes]], seconds: Callable[[], float]) -> None:
        self._every_key = every_key
        self._seconds = seconds
        self._used = 0.0
        #: Every key held when it was built, sorted; ``None`` until a page needs it.
        self._main: Optional[List[bytes]] = None
        #: Keys new since, sorted as of the last page, and those added after it.
        self._added: List[bytes] = []
        self._unsorted: List[bytes] = []
        #: Keys gone from the store since the main list was built.
        self._gone = 0

    def added(self, key: bytes) -> None:
        """
        ``key`` is new to the store (it held no entry for it).
        """
        main = self._main
        if main is not None:
            self._unsorted.append(key)
            if len(self._unsorted) > len(main) // 8 + 64:
                # Not kept for a page that may never come: the keys it holds are outside the store's budget.
                self._drop()

    def removed(self, count: int = 1) -> None:
        """
        ``count`` keys left the store.
        """
        if self._main is not None:
            self._gone += count

    def since(self, start: bytes, inclusive: bool) -> Iterator[bytes]:
        """
        Every key from ``start`` on (or after it), in order, each once; it may include keys the store no longer
        holds, which the caller skips.
        """
        main = self._current()
        self._used = self._seconds()
        added = self._added
        bisect = bisect_left if inclusive else bisect_right
        i, j = bisect(main, start), bisect(added, start)
        last = None
        while True:
            if i < len(main):
                key = main[i]
                if j < len(added) and added[j] < key:
                    key = added[j]
                    j += 1
                else:
                    i += 1
            elif j < len(added):
                key = added[j]
                j += 1
            else:
                return
            # A key gone and back is in both lists, and one added twice is twice in the side list.
            if key != last:
                last = key
                yield key

    def drop_if_idle(self) -> None:
        """
        Drop the order if no page asked for it for :data:`IDLE_SECONDS`.
        """
        if self._main is not None and self._seconds() - self._used >= IDLE_SECONDS:
            self._drop()

    def _drop(self) -> None:
        self._main = None
        self._added, self._unsorted, self._gone = [], [], 0

    def _current(self) -> List[bytes]:
        main = self._main
        if main is not None:
            if len(self._added) + len(self._unsorted) > len(main) // 8 + 64 or self._gone > len(main) // 8 + 64:
                main = None
            elif self._unsorted:
                self._added = sorted(self._added + self._unsorted)
                self._unsorted = []
        if main is None:
            main = self._main = sorted(self._every_key())
            self._added, self._unsorted, self._gone = [], [], 0
        return main
