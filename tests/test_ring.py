"""
Tests for :mod:`kvresponder.ring`.

The statistical properties run on a fixed sample of keys and with ``derandomize=True``: a share measured on
20000 keys carries a few per cent of sampling noise, and a random search over node names would, once in a
while, find a noisy sample rather than a bad ring.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import example, given, settings, strategies as st

from kvresponder.ring import HashRing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_KEYS = ["user:%d/%x" % (i, i * 2654435761 % 2 ** 32) for i in range(20000)]
#: Enough to measure a moved fraction to about half a per cent.
MOVE_KEYS = SAMPLE_KEYS[:8000]
NODE_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=24)
RING_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def ring_nodes(low: int, high: int):
    """
    Sets of ``low`` to ``high`` node names, the size drawn first so that large rings are as likely as small.
    """
    return st.integers(low, high).flatmap(lambda n: st.sets(NODE_NAME, min_size=n, max_size=n))


def owners(ring: HashRing, keys=SAMPLE_KEYS):
    return [ring.owner(key) for key in keys]


@RING_SETTINGS
@given(ring_nodes(2, 32))
@example({"pod-%d" % i for i in range(32)})
def test_every_node_owns_its_fair_share_within_15_percent(nodes):
    """
    If a ring has 2 to 32 nodes with arbitrary names, then every node is the primary owner of between 85 %
    and 115 % of its fair share of the key space, computed from the ring's arcs. (Counted over 20,000 keys,
    the count's own noise, up to 10 % of a 32-node ring's fair share, once took a node over the bound.)
    """
    ring = HashRing(nodes)
    shares = {node: share * len(nodes) for node, share in ring.shares().items()}
    assert set(shares) == set(nodes)
    assert abs(sum(shares.values()) - len(nodes)) < 1e-9
    assert all(0.85 <= share <= 1.15 for share in shares.values()), shares


@pytest.mark.parametrize("count, vnodes, tolerance", [(8, 128, 0.01), (4, 16, 0.03), (2, 4, 0.03)])
def test_the_computed_shares_are_the_shares_keys_land_in(count, vnodes, tolerance):
    """
    If the shares computed from the arcs are compared with 200,000 keys' owners, then they agree within
    the count's noise plus the model's error (a key's probes are an arithmetic progression, not independent).
    """
    nodes = ["pod-%d" % i for i in range(count)]
    ring = HashRing(nodes, vnodes=vnodes)
    keys = ["k%d" % i for i in range(200000)]
    counted = Counter(owners(ring, keys))
    shares = ring.shares()
    assert max(abs(counted[node] / len(keys) - shares[node]) * count for node in nodes) < tolerance
    assert abs(sum(shares.values()) - 1) < 1e-9


@RING_SETTINGS
@given(ring_nodes(3, 33))
def test_a_join_moves_about_one_nth_of_the_keys_and_only_to_the_new_node(nodes):
    """
    If a node joins a ring of N-1 nodes, then at most about 1/N of the keys change primary owner, and every
    key that moves moves to the new node.
    """
    newcomer = sorted(nodes)[0]
    before = owners(HashRing(nodes - {newcomer}), MOVE_KEYS)
    after = owners(HashRing(nodes), MOVE_KEYS)
    moved = [(old, new) for old, new in zip(before, after) if old != new]
    assert {new for _, new in moved} <= {newcomer}
    assert moved, "the new node owns no keys"
    assert len(moved) / len(MOVE_KEYS) <= 1.5 / len(nodes) + 0.01


@RING_SETTINGS
@given(ring_nodes(3, 33))
def test_a_leave_moves_about_one_nth_of_the_keys_and_only_from_the_leaving_node(nodes):
    """
    If a node leaves a ring of N nodes, then at most about 1/N of the keys change primary owner, and every
    key that moves belonged to the leaving node.
    """
    leaver = sorted(nodes)[-1]
    before = owners(HashRing(nodes), MOVE_KEYS)
    after = owners(HashRing(nodes - {leaver}), MOVE_KEYS)
    moved = [(old, new) for old, new in zip(before, after) if old != new]
    assert {old for old, _ in moved} == {leaver}
    assert leaver not in after
    assert len(moved) / len(MOVE_KEYS) <= 1.5 / len(nodes) + 0.01


@settings(max_examples=50, deadline=None)
@given(st.sets(NODE_NAME, min_size=1, max_size=12), st.integers(1, 16), st.text(max_size=30))
def test_preference_list_gives_min_of_n_and_ring_size_distinct_nodes(nodes, n, key):
    """
    If the preference list of any key is asked for ``n`` nodes, then it holds ``min(n, N)`` distinct ring
    members, starting with the key's owner.
    """
    ring = HashRing(nodes, vnodes=16)
    preference = ring.preference_list(key, n)
    assert len(preference) == min(n, len(nodes))
    assert len(set(preference)) == len(preference)
    assert set(preference) <= nodes
    assert preference[0] == ring.owner(key)


def _walked_preference(ring: HashRing, key: str, n: int):
    """The preference list walked from the key's point over the ring's points, as it was before the memo."""
    index, result = ring._start(key), []
    for step in range(len(ring._owners)):
        node = ring._owners[(index + step) % len(ring._owners)]
        if node not in result:
            result.append(node)
    return result[:n]


@settings(max_examples=30, deadline=None)
@given(ring_nodes(1, 20), st.lists(st.text(max_size=20), min_size=1, max_size=30), st.integers(-2, 21),
       st.integers(-2, 21))
def test_a_remembered_preference_list_is_the_one_a_walk_gives(nodes, keys, n, again):
    """
    If keys are looked up twice, for ``n`` nodes then for ``again`` nodes, on rings small enough to remember
    each point's successors (which they then do) and on larger ones that do not, then each lookup gives the
    list a walk over the points gives (none for ``n`` of 0 or less), and the caller's list is its own
    (changing it changes nothing the ring remembers).
    """
    ring = HashRing(nodes, vnodes=8)
    for key in keys:
        first = ring.preference_list(key, n)
        assert first == (_walked_preference(ring, key, n) if n > 0 else [])
        first.append("changed by the caller")
        assert ring.preference_list(key, again) == (_walked_preference(ring, key, again) if again > 0 else [])
    remembered = [successors for successors in ring._successors or () if successors is not None]
    assert bool(remembered) == (1 < len(nodes) <= 16 and max(n, again) > 0)


@settings(max_examples=30, deadline=None)
@given(ring_nodes(2, 20), st.lists(st.text(max_size=20), min_size=1, max_size=40), st.integers(1, 8),
       st.integers(1, 60))
def test_a_ring_remembers_at_most_placed_keys_and_places_every_key_alike_before_and_after(nodes, keys, most,
                                                                                          characters):
    """
    If more keys are looked up, some of them again, than the ring may remember (``PLACED_KEYS`` keys and
    ``PLACED_CHARACTERS`` characters, made small here), then it never remembers more keys than that, nor more
    characters than that and one key's, and every lookup, remembered, forgotten or not remembered at all, gives
    the list a walk over the points gives.
    """
    import kvresponder.ring as ring_module
    ring = HashRing(nodes, vnodes=8)
    original = ring_module.PLACED_KEYS, ring_module.PLACED_CHARACTERS
    ring_module.PLACED_KEYS, ring_module.PLACED_CHARACTERS = most, characters
    try:
        for key in keys + keys[::2] + keys:
            assert ring.preference_list(key, 3) == _walked_preference(ring, key, 3)
            assert len(ring._placed) <= most
            assert sum(len(placed) for placed in ring._placed) < characters + 20
            assert ring.preference_list(key, 2, remember=False) == _walked_preference(ring, key, 2)
    finally:
        ring_module.PLACED_KEYS, ring_module.PLACED_CHARACTERS = original
    assert ring._placed


def test_a_remembered_key_is_not_placed_again_and_a_full_ring_starts_remembering_again(monkeypatch):
    """
    If a key is looked up again, then the ring does not hash and probe it again; and once the ring has
    remembered as many keys as it may (``PLACED_KEYS``, made 3 here), or as many characters, it starts again
    empty and remembers the keys looked up after that, as many as before.
    """
    import kvresponder.ring as ring_module
    monkeypatch.setattr(ring_module, "PLACED_KEYS", 3)
    ring = HashRing(["n1", "n2", "n3"])
    placed = []
    start = ring._start
    monkeypatch.setattr(ring, "_start", lambda key: placed.append(key) or start(key))
    for key in ["a", "b", "a", "c", "b"]:
        ring.preference_list(key, 2)
    assert placed == ["a", "b", "c"]
    for key in ["d", "e", "f", "d", "e", "f"]:
        ring.preference_list(key, 2)
    assert placed == ["a", "b", "c", "d", "e", "f"]
    assert set(ring._placed) == {"d", "e", "f"}
    # The same for the characters remembered (``PLACED_CHARACTERS``, made 3).
    monkeypatch.setattr(ring_module, "PLACED_KEYS", 100)
    monkeypatch.setattr(ring_module, "PLACED_CHARACTERS", 3)
    ring = HashRing(["n1", "n2", "n3"])
    for key in ["g", "h", "i", "j", "k", "l"]:
        ring.preference_list(key, 2)
    assert set(ring._placed) == {"j", "k", "l"}


def test_a_key_looked_up_without_being_remembered_is_not_remembered():
    """
    If a key is placed with ``remember=False`` (a walk over the store), then the ring does not keep its place;
    a plain lookup does.
    """
    ring = HashRing(["n1", "n2", "n3"])
    ring.preference_list("walked", 2, remember=False)
    assert "walked" not in ring._placed
    ring.preference_list("asked", 2)
    assert "asked" in ring._placed


def test_preference_list_is_a_prefix_of_a_longer_one():
    """
    If the preference list is asked for fewer nodes, then it is the start of the longer list (replica i
    stays replica i when the replication factor grows).
    """
    ring = HashRing(["n%d" % i for i in range(8)])
    for key in SAMPLE_KEYS[:200]:
        assert ring.preference_list(key, 2) == ring.preference_list(key, 5)[:2]


def test_empty_ring_has_no_owner_and_an_empty_preference_list():
    """
    If the ring has no nodes, then ``owner`` raises ``LookupError`` and the preference list is empty.
    """
    ring = HashRing([])
    with pytest.raises(LookupError):
        ring.owner("k")
    assert ring.preference_list("k", 3) == []


def test_two_rings_over_the_same_nodes_agree_whatever_the_input_order():
    """
    If two rings are built from the same node ids in different orders (two nodes' views), then they assign
    every key the same preference list.
    """
    nodes = ["pod-%d" % i for i in range(7)]
    first = HashRing(nodes)
    second = HashRing(list(reversed(nodes)))
    for key in SAMPLE_KEYS[:2000]:
        assert first.preference_list(key, 3) == second.preference_list(key, 3)


#: Computed once with this ring; a change to the hashing, the point layout or the probe sequence breaks
#: compatibility with every node already running and must fail here.
KNOWN_NODES = ["alpha", "beta", "gamma", "delta", "epsilon"]
KNOWN_OWNERS = ["beta", "delta", "delta", "alpha", "delta", "gamma", "delta", "delta"]
KNOWN_PREFERENCE = ["alpha", "gamma", "epsilon"]


def test_ring_matches_known_answers():
    """
    If the ring is built over five fixed names, then it assigns the owners and preference list recorded
    when the ring was written.
    """
    ring = HashRing(KNOWN_NODES)
    assert [ring.owner("key-%d" % i) for i in range(8)] == KNOWN_OWNERS
    assert ring.preference_list("user:42", 3) == KNOWN_PREFERENCE


def test_ring_does_not_depend_on_python_hash_randomization():
    """
    If another interpreter with a different ``PYTHONHASHSEED`` builds the same ring, then it assigns every
    key the same owners as this one.
    """
    keys = SAMPLE_KEYS[:300]
    script = (
        "import json, sys\n"
        "from kvresponder.ring import HashRing\n"
        "keys = json.load(sys.stdin)\n"
        "ring = HashRing(%r)\n"
        "print(json.dumps([ring.preference_list(k, 2) for k in keys]))\n" % (KNOWN_NODES,)
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    for seed in ("1", "2"):
        env["PYTHONHASHSEED"] = seed
        completed = subprocess.run([sys.executable, "-c", script], input=json.dumps(keys), env=env,
                                   capture_output=True, text=True, check=True, timeout=60)
        results.append(json.loads(completed.stdout))
    ring = HashRing(KNOWN_NODES)
    expected = [ring.preference_list(key, 2) for key in keys]
    assert results[0] == results[1] == expected


def test_primary_share_is_the_members_computed_share():
    """
    If the gauge's share is asked for a member, then it is that node's computed share and close to the
    share measured on keys; for a non-member it is 0, and a lone node owns everything.
    """
    nodes = ["n%d" % i for i in range(4)]
    ring = HashRing(nodes)
    measured = Counter(owners(ring))["n0"] / len(SAMPLE_KEYS)
    assert ring.primary_share("n0") == ring.shares()["n0"]
    assert abs(ring.primary_share("n0") - measured) < 0.02
    assert ring.primary_share("stranger") == 0.0
    assert HashRing(["alone"]).primary_share("alone") == 1.0
    assert HashRing([]).shares() == {}


def _reference_start(ring: HashRing, key: str) -> int:
    """
    The multi-probe lookup written plainly, bisecting over every point: what the ring's sliced lookup
    must always agree with.
    """
    import struct
    from bisect import bisect_left
    from hashlib import blake2b

    a, b = struct.unpack(">QQ", blake2b(key.encode("utf-8"), digest_size=16).digest())
    b |= 1
    best_index, best_distance = 0, 1 << 64
    for _ in range(ring.probes):
        index = bisect_left(ring._points, a) % len(ring._points)
        distance = (ring._points[index] - a) % (1 << 64)
        if distance < best_distance:
            best_index, best_distance = index, distance
        a = (a + b) % (1 << 64)
    return best_index


@settings(max_examples=40, deadline=None)
@given(ring_nodes(1, 12), st.lists(st.text(min_size=0, max_size=40), min_size=1, max_size=50),
       st.sampled_from([1, 4, 128]))
def test_sliced_lookup_finds_the_same_point_as_a_full_bisection(nodes, keys, vnodes):
    """
    If a key is looked up, then the ring's slice-table lookup lands on the point a bisection over all the
    points finds, whatever the nodes, the keys and the number of points (down to one point per node, where
    most slices are empty, probes wrap past the last point, and gaps pass 2**63): the lookup's shifted,
    word-sized arithmetic gives what plain unsigned arithmetic gives.
    """
    ring = HashRing(nodes, vnodes=vnodes)
    for key in keys:
        assert ring._start(key) == _reference_start(ring, key)


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_key_digest_is_hashlib_blake2b_whichever_way_it_is_computed(data):
    """
    If a key's digest is taken the way this interpreter takes it (PyPy calls the BLAKE2b C functions
    directly), then it is byte for byte ``hashlib.blake2b(digest_size=16)``: nodes on either interpreter
    place every key alike.
    """
    from hashlib import blake2b

    from kvresponder.ring import _digest16

    assert _digest16(data) == blake2b(data, digest_size=16).digest()
