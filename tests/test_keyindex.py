"""
Tests for :mod:`kvresponder.keyindex`: the order of keys kept across changes for listing pages.
"""

from typing import List, Set

from hypothesis import given, settings, strategies as st

from kvresponder.keyindex import KeyIndex


class _Keys:
    """
    A store's key set, as the index sees it: ``every_key`` counts the full sorts it asks for.
    """

    def __init__(self, keys=()) -> None:
        self.held: Set[bytes] = set(keys)
        self.sorts = 0
        self.now = 0.0
        self.index = KeyIndex(self.every_key, lambda: self.now)

    def every_key(self) -> List[bytes]:
        self.sorts += 1
        return list(self.held)

    def add(self, key: bytes) -> None:
        if key not in self.held:
            self.held.add(key)
            self.index.added(key)

    def remove(self, key: bytes) -> None:
        if key in self.held:
            self.held.discard(key)
            self.index.removed()

    def page(self, start: bytes, inclusive: bool, limit: int) -> List[bytes]:
        found = []
        for key in self.index.since(start, inclusive):
            if len(found) >= limit:
                break
            if key in self.held:
                found.append(key)
        return found


KEY = st.binary(max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.sets(KEY, max_size=30),
       st.lists(st.tuples(st.sampled_from(["add", "remove", "page"]), KEY, st.booleans(), st.integers(1, 8)),
                max_size=80))
def test_a_page_holds_exactly_the_keys_held_from_its_start_in_order_whatever_changed_since_the_last(
        initial, steps):
    """
    If keys are added and removed between pages in any order (a key removed and added again, added after a
    page, removed before one), then each page holds exactly the held keys from its start on (or after it), in
    order, each once, up to its limit.
    """
    keys = _Keys(initial)
    for action, key, inclusive, limit in steps:
        if action == "add":
            keys.add(key)
        elif action == "remove":
            keys.remove(key)
        else:
            expected = [held for held in sorted(keys.held) if held > key or inclusive and held == key][:limit]
            assert keys.page(key, inclusive, limit) == expected


def test_overwrites_and_a_few_new_or_removed_keys_list_without_sorting_every_key_again():
    """
    If a store of 10,000 keys is listed, then a page after a few new keys or a few removed ones does not sort
    every key again: only the new ones are sorted, and removed ones are skipped.
    """
    keys = _Keys(b"k%05d" % (i,) for i in range(0, 20000, 2))
    assert keys.page(b"", True, 3) == [b"k00000", b"k00002", b"k00004"]
    for i in range(1, 201, 2):
        keys.add(b"k%05d" % (i,))
        keys.remove(b"k%05d" % (i + 1,))
        assert keys.page(b"k%05d" % (i - 1,), False, 2) == [b"k%05d" % (i,), b"k%05d" % (i + 3,)]
    assert keys.sorts == 1


def test_once_many_keys_are_new_or_gone_the_next_page_sorts_every_key_again():
    """
    If more than an eighth of the keys are new since the last full sort, or more than half are gone, then the
    next page sorts every key again (a side list or skipped keys that large would cost each page more than it
    saves).
    """
    keys = _Keys(b"k%05d" % (i,) for i in range(8000))
    keys.page(b"", True, 1)
    for i in range(8000, 9100):
        keys.add(b"k%05d" % (i,))
    keys.page(b"", True, 1)
    assert keys.sorts == 2
    for i in range(5000):
        keys.remove(b"k%05d" % (i,))
    assert keys.page(b"", True, 1) == [b"k05000"]
    assert keys.sorts == 3


def test_new_keys_past_an_eighth_drop_the_order_without_waiting_for_a_page():
    """
    If more than an eighth of the keys are new and no page comes, then the order is dropped at once rather than
    its side list growing with every new key (the keys it holds are outside the store's budget).
    """
    keys = _Keys(b"k%04d" % (i,) for i in range(1000))
    keys.page(b"", True, 1)
    for i in range(1000, 1000 + 1000 // 8 + 65):
        keys.add(b"k%04d" % (i,))
    assert keys.index._main is None and keys.index._unsorted == []
    assert keys.page(b"k1000", True, 2) == [b"k1000", b"k1001"] and keys.sorts == 2


def test_the_order_is_dropped_once_no_page_asked_for_it_for_a_minute():
    """
    If no page is listed for IDLE_SECONDS, then the copy of every key the order holds is dropped (the store's
    budget does not count it), and the next page sorts every key again; a page within that keeps it.
    """
    from kvresponder.keyindex import IDLE_SECONDS

    keys = _Keys(b"k%d" % (i,) for i in range(100))
    keys.page(b"", True, 1)
    keys.now += IDLE_SECONDS - 1
    keys.index.drop_if_idle()
    keys.page(b"", True, 1)
    keys.now += IDLE_SECONDS - 1
    keys.index.drop_if_idle()
    assert keys.sorts == 1 and keys.index._main is not None
    keys.now += 1
    keys.index.drop_if_idle()
    assert keys.index._main is None
    keys.add(b"k-new")
    assert keys.page(b"k-", True, 1) == [b"k-new"]
    assert keys.sorts == 2
