"""
A consistent-hash ring with virtual nodes.

Each node is placed on a 64-bit ring at ``vnodes`` points, hashed with BLAKE2b (stable across processes and
interpreters, unlike ``hash()``). A key belongs to the node whose point follows it clockwise.

With 128 random points per node, a node's share still varies by about 1/sqrt(128) ~ 9 %, so a 32-node ring
would usually have a node 20 % over its fair share. To tighten that without thousands of points, a key is
hashed to ``probes`` positions and takes the position closest to its next point (multi-probe consistent
hashing, Appleton & O'Reilly 2015). A join takes the first place only of the keys whose best probe now lands on
the new node's points, about 1/N of them; but the walk then starts from the new node's point, so some keys change
every owner (docs/ARCHITECTURE.md, "Join"), which the write and read paths allow for while the ring settles.
"""

import struct
from bisect import bisect_left
from hashlib import blake2b
from typing import Dict, Iterable, List, Optional, Tuple

from .digest import blake2b16

_RING = 1 << 64
_MASK = _RING - 1
_JUMP_BITS = 12
_JUMPS = 1 << _JUMP_BITS
_JUMP_SHIFT = 64 - _JUMP_BITS

# A lookup works on positions shifted down by 2**63 (the top bit flipped, read as signed), so that every number
# it handles fits a machine word: PyPy keeps an integer past 2**63 - 1 as a big integer, and arithmetic on
# those was most of a lookup's cost. Shifting keeps the order of positions and their differences, so keys land
# exactly where the plain unsigned arithmetic puts them (a test compares the two). Written as literals: a
# constant computed through a big integer stays one on PyPy, and would drag every operation with it.
_MAX = 0x7FFFFFFFFFFFFFFF
_MIN = -_MAX - 1
#: Rings of up to this many nodes remember each point's successors: at most ``vnodes * 16 * 16`` references (256 KiB
#: at 128 points a node), where a larger ring's would grow with the square of its size.
_MEMO_NODES = 16
#: Keys whose place a ring remembers, at most, and their characters in all: a cache's hot keys are written and
#: read again and again, and each lookup hashed the key and probed the ring anew (its BLAKE2b digest and its probes
#: were most of what a lookup cost). The characters bound the memory it holds outside ``MAX_MEMORY`` (a few MiB)
#: whatever the keys' length. When full, it starts again empty: a key not used since then is placed anew, at a
#: lookup's cost. A ring is rebuilt on every membership change, so what it remembers is never stale; the node
#: has the ring it replaces forget (``forget_places``), and looks keys up on the rings it keeps from before without
#: remembering them, so one ring a node remembers at a time.
PLACED_KEYS = 1 << 16
PLACED_CHARACTERS = 1 << 21
_unpack_signed = struct.Struct(">qq").unpack
_signed = struct.Struct(">q")
_unsigned = struct.Struct(">Q")


#: The key's 16-byte BLAKE2b digest, from which its probes are drawn.
_digest16 = blake2b16()


def _shifted(point: int) -> int:
    """
    ``point - 2**63``, computed without a big integer (see ``_MAX``).
    """
    return _signed.unpack(_unsigned.pack(point))[0] ^ _MIN


def _point(node_id: str, index: int) -> int:
    return int.from_bytes(blake2b(("%s#%d" % (node_id, index)).encode("utf-8"), digest_size=8).digest(), "big")


def members_digest(nodes: Iterable[str]) -> str:
    """
    A short name for a set of node ids: equal for equal sets, and, in practice, different for different ones.
    """
    return blake2b("\n".join(sorted(nodes)).encode("utf-8"), digest_size=8).hexdigest()


class HashRing:
    """
    An immutable ring over a set of node ids.

    :param nodes: the node ids.
    :param int vnodes: points per node.
    :param int probes: positions hashed per key.
    """

    def __init__(self, nodes: Iterable[str], vnodes: int = 128, probes: int = 8) -> None:
        self.nodes = frozenset(nodes)
        self.vnodes = vnodes
        self.probes = probes
        placed = sorted((_point(node, i), node) for node in self.nodes for i in range(vnodes))
        self._points: List[int] = [point for point, _ in placed]
        self._owners: List[str] = [node for _, node in placed]
        # Where each 1/4096th of the ring starts in the sorted points: a probe then bisects only the few
        # points of its own slice instead of all of them (a bisect over every point dominated a lookup on PyPy).
        self._jump: List[int] = [bisect_left(self._points, index << _JUMP_SHIFT) for index in range(_JUMPS + 1)]
        #: The points shifted down by 2**63, for lookups (see ``_MAX``).
        self._shifted: List[int] = [_shifted(point) for point in self._points]
        #: Each point's successors (every node, in the order met clockwise from it), kept once walked, in a
        #: ring of up to :data:`_MEMO_NODES` nodes; ``None`` for a larger one, which walks every time.
        self._successors: Optional[List[Optional[Tuple[str, ...]]]] = (
            [None] * len(self._points) if len(self.nodes) <= _MEMO_NODES else None)
        #: Where each recently looked-up key starts on the ring (:data:`PLACED_KEYS`).
        self._placed: Dict[str, int] = {}
        self._placed_characters = 0
        #: Names the members in heartbeats, where a joining node compares its peers' rings with its own.
        self.digest = members_digest(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self.nodes

    def _start(self, key: str) -> int:
        """
        The index of the point that owns ``key``: of its probes (its first 8 bytes, then steps of its next 8,
        odd, modulo 2**64), the one closest before a point. The arithmetic is on shifted positions (``_MAX``).
        """
        a, b = _unpack_signed(_digest16(key.encode("utf-8")))
        a ^= _MIN  # the first probe, shifted: the unsigned value minus 2**63
        b |= 1  # the step, as a signed word: the same modulo 2**64
        points = self._shifted
        jump = self._jump
        count = len(points)
        best_index = 0
        best_distance = -1  # none yet: distances are never negative
        for _ in range(self.probes):
            top = (a >> _JUMP_SHIFT) + (_JUMPS >> 1)
            index = jump[top]
            end = jump[top + 1]
            if index != end:
                # Most slices hold no point at all: the next point is then the first after the slice.
                index = bisect_left(points, a, index, end)
            if index == count:
                # Past the last point: the first one, across the top of the ring (2**64 - (a - first)).
                index = 0
                distance = (points[0] - _MIN) + (_MAX - a) + 1
            else:
                distance = points[index] - a
            if best_distance < 0 or distance < best_distance:
                best_distance = distance
                best_index = index
            # The next probe, a + b modulo 2**64, kept within a word on the way.
            if b >= 0:
                a = a + b if a <= _MAX - b else (a + (b + _MIN)) + _MIN
            else:
                a = a + b if a >= _MIN - b else (a + (b + _MAX)) + _MAX + 1
        return best_index

    def owner(self, key: str) -> str:
        """
        The node that owns ``key`` first.

        :raises LookupError: if the ring is empty.
        """
        if not self._points:
            raise LookupError("the ring is empty")
        return self._owners[self._start(key)]

    def preference_list(self, key: str, n: int, remember: bool = True) -> List[str]:
        """
        The first ``n`` distinct nodes clockwise from ``key``: its owners, in order of preference. Fewer
        than ``n`` when the ring has fewer nodes.

        :param remember: keep the key's place for its next lookup (:data:`PLACED_KEYS`). A walk over every stored
            key passes ``False``: it would push the keys in use out for keys it looks up once.
        """
        if not self._points or n <= 0:
            return []
        if len(self.nodes) == 1:
            return list(self.nodes)
        placed = self._placed
        index = placed.get(key)
        if index is None:
            index = self._start(key)
            if remember:
                if len(placed) >= PLACED_KEYS or self._placed_characters >= PLACED_CHARACTERS:
                    self.forget_places()
                placed[key] = index
                self._placed_characters += len(key)
        memo = self._successors
        if memo is None:
            return self._walk(index, min(n, len(self.nodes)))
        successors = memo[index]
        if successors is None:
            # Every lookup of a write walked the same few points again: once a point is enough.
            successors = memo[index] = tuple(self._walk(index, len(self.nodes)))
        return list(successors[:n])

    def forget_places(self) -> None:
        """
        Drop the places remembered for looked-up keys: for a ring that is no longer the one in force, which may
        still be kept (the rings before it, while the ring settles) but is not looked up in for every request.
        """
        self._placed.clear()
        self._placed_characters = 0

    def _walk(self, index: int, want: int) -> List[str]:
        """
        The first ``want`` distinct nodes met clockwise from the point at ``index``.
        """
        owners = self._owners
        count = len(owners)
        result: List[str] = []
        for step in range(count):
            node = owners[(index + step) % count]
            if node not in result:
                result.append(node)
                if len(result) == want:
                    break
        return result

    def shares(self) -> Dict[str, float]:
        """
        The fraction of the key space each node owns first, computed from the arcs between the ring's points
        rather than counted over sample keys (whose noise, a few per cent a node, hid the ring's own
        balance).

        A probe at distance ``t`` before a point wins when every other probe lies farther from its own next
        point. With ``k`` probes spread independently and uniformly, a probe lies within ``t`` of its next
        point with probability ``F(t) = sum(min(t, L) for every arc length L)``, so the arc of length ``L``
        wins with probability ``G(L) = integral from 0 to L of k (1 - F(t))^(k-1) dt``; ``F`` is linear between
        consecutive arc lengths, so each piece integrates in closed form. A node's share is the sum of
        ``G`` over the arcs ending at its points. A key's probes are an arithmetic progression rather than
        independent draws; counted over a million keys, the shares agree within the count's noise (0.2 % of a
        fair share) at 128 points a node, and within 2 % at 4 to 16 points.
        """
        points, owners, probes = self._points, self._owners, self.probes
        count = len(points)
        if count == 0:
            return {}
        if len(self.nodes) == 1:
            return {owners[0]: 1.0}
        # The arc ending at point i starts at the point before it (the last one, for the first point).
        arcs = [((points[i] - points[i - 1]) & _MASK) / _RING for i in range(count)]
        won = [0.0] * count
        total = 0.0
        shorter = 0.0
        start = 0.0
        longer = count
        for index in sorted(range(count), key=arcs.__getitem__):
            length = arcs[index]
            if length > start:
                # On [start, length], 1 - F(t) = 1 - shorter - t * longer, falling with slope -longer.
                before = max(0.0, 1.0 - shorter - start * longer)
                after = max(0.0, 1.0 - shorter - length * longer)
                total += (before ** probes - after ** probes) / longer
                start = length
            won[index] = total
            shorter += length
            longer -= 1
        result = dict.fromkeys(self.nodes, 0.0)
        for index in range(count):
            result[owners[index]] += won[index]
        return result

    def primary_share(self, node_id: str) -> float:
        """
        The fraction of keys ``node_id`` owns first (see :meth:`shares`); 0 for a node not in the ring. Used
        for the ``kv_ring_owned_ratio`` gauge.
        """
        return self.shares().get(node_id, 0.0)

