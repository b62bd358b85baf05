"""
Moving data when membership changes: handoff, re-replication, anti-entropy and the SIGTERM drain.

One mechanism serves all four. A *pass* walks the local entries once against the current ring:

- an entry this node does not own (a hint taken for a failed owner, a key whose range moved to a joining
  node, everything when the node is leaving) is sent to all its owners, and the local copy is dropped only
  after every owner has acknowledged it, and only if it was not rewritten meanwhile;
- for every entry it does own, it adds the entry to a digest per co-owner. Each co-owner is then compared
  with it bucket by bucket, then key by key in the buckets that differ, and sent what it lacks or holds at
  an older version (anti-entropy; after a death, this is what restores the replication factor).

A pass runs after every membership change (debounced), every ``ANTI_ENTROPY_INTERVAL``, when a joining node
asks for its share, and repeatedly during a drain. Passes never overlap; a request during a pass is served
by the next one. All work is batched, one batch in flight per peer, and yields to the reactor between
chunks; what is handed off is sent, and dropped, as the walk finds it, a batch at a time. So memory stays bounded
and the node keeps serving.
"""

from typing import Callable, Dict, List, Optional, Set, Tuple, Union

from attr import attrib, attrs
from eliot import write_traceback
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from .deferreds import gather
from .digest import blake2b_digest
from .hlc import Version
from .log.rebalance import DRAIN, HANDOFF, SCAN, SYNC
from .peers import PeerError
from .ring import HashRing
from .store import Entry, Store

BUCKETS = 256
#: Entries walked at most between two returns to the reactor.
CHUNK = 2000
#: Seconds a walk over the store may hold the reactor before it yields (checked every CHECK_EVERY entries): a
#: walk runs while the node serves, and a fixed number of entries of cold (not yet JIT-compiled) code could hold
#: it far longer than a request may wait.
SLICE = 0.005
#: The share of the reactor's time a background walk takes while it runs: the periodic anti-entropy pass's, and a
#: peer's digest for it. After each slice it rests three times as long. Yielding for one turn between slices
#: gave the walk nearly all of a loaded node's time: a replica answered one batch of copies a slice, and a
#: cluster's writes nearly stopped while the pass ran. Walks that move data after a membership change, and a
#: drain's, go at full speed: copies are missing until they finish.
BACKGROUND_SHARE = 0.25
#: A peer's periodic pass compares with the digest of this node's last pass, if the ring has not changed and that
#: pass is at most this many seconds old, however many writes came since. Under steady writes a fresh walk finds
#: the same buckets differing (the peer's digest is no fresher), and a walk for each peer's pass cost a loaded
#: node more than its own pass. An older digest does not hide an entry the peer must send, as this node's versions
#: only grow; what it dropped since (evicted, handed off) waits for its next pass's digest.
MAX_DIGEST_AGE = 60.0
#: The longest rest after one slice: a slice held up by a collection or by the JIT's compiling is not followed by
#: three times as long a rest.
MAX_REST = 0.05
CHECK_EVERY = 64


#: Anti-entropy leaves alone entries whose version's wall time is within this many milliseconds of this node's
#: clock, either side: their copies may still be on the way (the write path's job). Under steady writes, most
#: buckets differ only by such entries. A version further ahead of the clock is never left alone.
SETTLE_MS = 5000
#: Versions sent to a peer in one ``sync/versions`` call, at most (the peer takes up to 50000). The peer parses
#: the call, compares each version and answers in one reactor turn: a small call keeps that turn short for the
#: requests waiting behind it, at the cost of more round trips a pass.
VERSIONS_PER_CALL = 2000

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


#: ``hashlib.blake2b(digest_size=8)``, without hashlib's wrapper on PyPy: a pass hashes every key it walks.
_digest8 = blake2b_digest(8)


def key_hash(key: str) -> int:
    return int.from_bytes(_digest8(key.encode("utf-8")), "big")


def bucket_of(key: str) -> int:
    return key_hash(key) % BUCKETS


#: Node ids' hashes, as ``entry_digest`` mixes them in: a few a cluster (one a pod's life), emptied if it grows.
_NODE_HASHES: Dict[str, int] = {}
_NODE_HASHES_MAX = 4096


def _node_hash(node: str) -> int:
    found = _NODE_HASHES.get(node)
    if found is None:
        if len(_NODE_HASHES) >= _NODE_HASHES_MAX:
            _NODE_HASHES.clear()
        found = _NODE_HASHES[node] = key_hash(node)
    return found


def entry_digest(hashed_key: int, version: Version) -> int:
    """
    A 64-bit digest of one (key, version), cheap enough for every entry of every pass: the key's hash mixed
    with the version's wall time, counter and node id. The node id counts: versions that differ in it alone are
    common, as every re-stamp above one version takes that version's millisecond and the same counter
    (:meth:`~kvresponder.hlc.HybridLogicalClock.above`), and two replicas holding two such re-stamps must not
    look alike to anti-entropy.
    """
    return hashed_key ^ (((((version[0] << 20) ^ version[1] ^ _node_hash(version[2])) * _GOLDEN)) & _MASK)


#: The periodic pass's reason (``Node`` runs it every ANTI_ENTROPY_INTERVAL): the only one that walks in the
#: background and skips the entries written within SETTLE_MS.
ANTI_ENTROPY = "anti-entropy"

#: A background walk's rest for each second of work.
_REST_RATIO = (1.0 - BACKGROUND_SHARE) / BACKGROUND_SHARE


@attrs(slots=True)
class _QueuedPass:
    """
    A pass asked for while one runs: its reason (the most urgent asked) and who waits for it.
    """
    reason: str = attrib()
    waiters: List[Deferred] = attrib()


@attrs(slots=True, frozen=True)
class _DigestCache:
    """
    The bucket hashes the last pass made, by peer, and the ring, store change count and time it made them at.
    """
    ring: Optional[HashRing] = attrib()
    changes: int = attrib()
    made: float = attrib()
    hashes: Dict[str, Dict[int, str]] = attrib()


class _Slices:
    """
    Cuts a walk over the store into slices of at most :data:`SLICE` seconds of reactor time (and at most
    :data:`CHUNK` entries), so that requests keep being served during a pass.

    :param background: whether the walk takes :data:`BACKGROUND_SHARE` of the reactor's time, resting after
        each slice for as long as keeps it to that share (up to :data:`MAX_REST`); otherwise it yields for one turn
        only. A bool, or a callable asked at each pause (a background walk speeds up once its node starts
        draining).
    """

    def __init__(self, clock, background: Union[bool, Callable[[], bool]] = False) -> None:
        self._clock = clock
        self._count = 0
        self._since = clock.seconds()
        self._background = background if callable(background) else (lambda: background)

    def due(self) -> bool:
        """
        Whether the walk should yield now; call once per entry.
        """
        self._count += 1
        if self._count % CHUNK == 0:
            return True
        return self._count % CHECK_EVERY == 0 and self._clock.seconds() - self._since >= SLICE

    async def pause(self) -> None:
        worked = self._clock.seconds() - self._since
        rest = min(max(worked, 0.0) * _REST_RATIO, MAX_REST) if self._background() else 0.0
        await deferLater(self._clock, rest, lambda: None)
        self._since = self._clock.seconds()


@attrs(slots=True)
class _HandOff:
    """
    What one pass hands off: the entries found and not yet sent (``chunk``, each with its owners under ``ring``,
    the pass's), how many it found and dropped in all, and the owners that failed in it.
    """
    ring: HashRing = attrib()
    chunk: List[Tuple[Entry, List[str]]] = attrib(factory=list)
    chunk_bytes: int = attrib(default=0)
    found: int = attrib(default=0)
    dropped: int = attrib(default=0)
    failed: Set[str] = attrib(factory=set)

    def add(self, entry: Entry, owners: List[str], most_entries: int, most_bytes: int) -> bool:
        """
        Take ``entry`` in; whether the chunk is full, and due to be sent.
        """
        self.chunk.append((entry, owners))
        self.chunk_bytes += entry.size
        self.found += 1
        return len(self.chunk) >= most_entries or self.chunk_bytes >= most_bytes


class Digest:
    """
    The (key, version) pairs shared with one co-owner, grouped in buckets, with an XOR digest per bucket.
    """

    def __init__(self) -> None:
        self.buckets: Dict[int, Dict[str, Version]] = {}
        self.hashes: Dict[int, int] = {}

    def add(self, key: str, version: Version) -> None:
        hashed = key_hash(key)
        bucket = hashed % BUCKETS
        self.buckets.setdefault(bucket, {})[key] = version
        self.hashes[bucket] = self.hashes.get(bucket, 0) ^ entry_digest(hashed, version)

    def wire(self) -> Dict[int, str]:
        return {bucket: "%016x" % (value,) for bucket, value in self.hashes.items()}


class Rebalancer:
    """
    :param store: this node's store.
    :param ring: returns the current ring of live members.
    :param peer_of: returns the :class:`~kvresponder.membership.Peer` of a node id, or ``None``.
    :param peers: a :class:`~kvresponder.peers.PeerClient`.
    :param clock: ``IReactorTime``.
    :param int replicas: the replication factor.
    :param wall: the wall clock that stamps versions (seconds), for anti-entropy's settle window; by default
        the clock's ``seconds``.
    """

    def __init__(self, node_id: str, store: Store, ring: Callable[[], HashRing], peer_of, peers, clock,
                 replicas: int, metrics, batch_entries: int = 500, batch_bytes: int = 4 * 1024 * 1024,
                 debounce: float = 0.2, wall: Optional[Callable[[], float]] = None) -> None:
        self._wall = wall or clock.seconds
        self.node_id = node_id
        self.store = store
        self._ring = ring
        self._peer_of = peer_of
        self._peers = peers
        self._clock = clock
        self.replicas = replicas
        self._metrics = metrics
        self.batch_entries = batch_entries
        self.batch_bytes = batch_bytes
        self.debounce = debounce
        self.pending = 0
        self.passes = 0
        self._running: Optional[Deferred] = None
        self._again: Optional[_QueuedPass] = None
        self._scheduled = None
        self._scheduled_reason = ANTI_ENTROPY
        self._stopped = False
        self.leaving = False
        self._digest_cache = _DigestCache(None, 0, 0.0, {})
        self._running_ring: Optional[HashRing] = None
        self._current_waiters: List[Deferred] = []

    # -- scheduling -----------------------------------------------------------------------------------

    def trigger(self, reason: str) -> None:
        """
        Run a pass soon. Changes that arrive together (a node's join seen by several heartbeats, a rolling
        restart) share one pass.
        """
        if self._scheduled is not None and self._scheduled.active():
            return
        self._scheduled_reason = reason
        self._scheduled = self._clock.callLater(self.debounce, self.run_pass, reason)

    def run_pass(self, reason: str) -> Deferred:
        """
        Run a pass now, or right after the one running.

        :return: a Deferred that fires with the pass's counts once a pass that started after this call
            has finished. It never fails.
        """
        waiter: Deferred = Deferred()
        if self._scheduled is not None and self._scheduled.active():
            # This pass does what the debounced one would have, and as that one would: a membership change's pass
            # goes at full speed and leaves nothing out, even where the periodic tick happens to run it.
            self._scheduled.cancel()
            if reason == ANTI_ENTROPY:
                reason = self._scheduled_reason
        if self._running is not None:
            if self._again is None:
                self._again = _QueuedPass(reason, [])
            elif self._again.reason == ANTI_ENTROPY and reason != ANTI_ENTROPY:
                # The pass queued does what this one asks too: it goes at full speed and leaves nothing out
                # (a drain's, a membership change's, a joiner's), not as the periodic pass it was queued for.
                self._again.reason = reason
            self._again.waiters.append(waiter)
        else:
            self._start(reason, [waiter])
        return waiter

    def moving_under(self, ring: HashRing) -> bool:
        """
        Whether a pass is running under a ring of other members than ``ring``: it may still move entries onto
        nodes that ``ring`` does not make their owners.
        """
        running = self._running_ring
        return self._running is not None and running is not None and running.nodes != ring.nodes

    def stop(self) -> None:
        """
        Cancel the pass a change scheduled (see :meth:`trigger`), and the one queued behind a pass under way: a
        stopped node starts none. A pass under way ends by itself; what waited for the queued one gets its counts.
        """
        self._stopped = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None

    def share_for(self, node_id: str) -> Deferred:
        """
        Answer a joining node's request for its share: a pass over a ring that includes it. The pass under
        way serves if its ring already counts the joiner; otherwise a new one runs.
        """
        running_ring = self._running_ring
        if self._running is not None and running_ring is not None and node_id in running_ring:
            waiter: Deferred = Deferred()
            self._current_waiters.append(waiter)
            return waiter
        return self.run_pass("join:%s" % (node_id,))

    def _start(self, reason: str, waiters: List[Deferred]) -> None:
        self._running_ring = None
        self._current_waiters = waiters
        self._running = ensureDeferred(self._pass(reason))

        def done(result):
            self._running = None
            if isinstance(result, Failure):
                write_traceback(exc_info=(result.type, result.value, result.tb))
                # ``pending`` is the last finished pass's: ``failed`` says this one did not finish.
                result = {"handed_off": 0, "repaired": 0, "pending": self.pending, "failed": True}
            answered = waiters
            if self._again is not None:
                again, self._again = self._again, None
                if self._stopped:
                    answered = waiters + again.waiters
                else:
                    self._start(again.reason, again.waiters)
            for waiter in answered:
                waiter.callback(result)

        self._running.addBoth(done)

    # -- one pass -------------------------------------------------------------------------------------

    async def _pass(self, reason: str) -> dict:
        with SCAN(reason=reason) as action:
            ring = self._running_ring = self._ring()
            leaving = self.leaving
            if leaving and self.node_id in ring:
                ring = HashRing(ring.nodes - {self.node_id}, vnodes=ring.vnodes, probes=ring.probes)
            # What to hand off is sent a chunk at a time, as the walk finds it, and each chunk's entries dropped
            # once their owners have them: a drain hands off the whole store, and held until the walk's end (each
            # entry with a copy of its value) it took more memory again than the store itself, just as a node is
            # stopped, often for want of memory.
            handoff = _HandOff(ring)
            digests: Dict[str, Digest] = {}
            # The periodic pass walks in the background; not once the node is leaving (its drain waits for it).
            slices = _Slices(self._clock, background=lambda: reason == ANTI_ENTROPY and not self.leaving)
            for entry in self.store.entries():
                if slices.due():
                    await slices.pause()
                owners = ring.preference_list(entry.key, self.replicas, remember=False)
                if not leaving and self.node_id in owners:
                    for owner in owners:
                        if owner != self.node_id:
                            digest = digests.get(owner)
                            if digest is None:
                                digest = digests[owner] = Digest()
                            digest.add(entry.key, entry.version)
                elif owners:
                    if handoff.add(entry, owners, self.batch_entries, self.batch_bytes):
                        # Counted in the walk's slice: a background walk rests after it as after its own work.
                        await self._hand_off(handoff)
            await self._hand_off(handoff)
            sync_reason = ANTI_ENTROPY if reason == ANTI_ENTROPY else "re-replication"
            # Peers compare their digests with ours; keep just the bucket hashes (256 numbers a peer) so a
            # peer's sync request does not cost another walk over the store.
            self._digest_cache = _DigestCache(ring, self.store.changes, self._clock.seconds(),
                                              {node: digest.wire() for node, digest in digests.items()})
            # A sync that failed unexpectedly (logged by gather) counts as having sent nothing: the pass and
            # the other peers' counts must still stand.
            repaired = sum(sent or 0 for sent in await gather([self._sync(node, digest, sync_reason)
                                                                for node, digest in sorted(digests.items())]))
            self.pending = handoff.found - handoff.dropped
            self.passes += 1
            counts = {"handed_off": handoff.dropped, "repaired": repaired, "pending": self.pending}
            action.add_success_fields(**counts)
            return counts

    async def _hand_off(self, handoff: "_HandOff") -> None:
        """
        Send each entry of ``handoff``'s chunk to all its owners under the pass's ring; drop the local copy once
        all of them have it, and they are still its owners. An owner that failed once in this pass is sent
        nothing more in it (an unreachable one would cost each chunk a timeout).
        """
        chunk, handoff.chunk, handoff.chunk_bytes = handoff.chunk, [], 0
        if not chunk:
            return
        by_owner: Dict[str, List[Entry]] = {}
        for entry, owners in chunk:
            for owner in owners:
                if owner != self.node_id:
                    by_owner.setdefault(owner, []).append(entry)
        acked: Dict[Tuple[str, Version], int] = {}
        await gather([self._send_all(owner, entries, acked, handoff.failed) for owner, entries in by_owner.items()])
        # The ring may have changed while the copies were out (a peer left, a node joined): a key this node owns
        # again, or whose owners are others now, stays, for the pass that change starts. Dropped, a copy handed back
        # to this node as an owner meanwhile (the same version: its apply changed nothing) would go with it.
        now = self._ring()
        if self.leaving and self.node_id in now:
            now = HashRing(now.nodes - {self.node_id}, vnodes=now.vnodes, probes=now.probes)
        moved = now.nodes != handoff.ring.nodes
        for entry, owners in chunk:
            needed = len([owner for owner in owners if owner != self.node_id])
            if needed and acked.get((entry.key, entry.version), 0) >= needed:
                if moved and now.preference_list(entry.key, self.replicas, remember=False) != owners:
                    continue
                if self.store.forget(entry.key, entry.version):
                    handoff.dropped += 1

    async def _send_all(self, owner: str, entries: List[Entry], acked: Dict, failed: Set[str]) -> int:
        peer = None if owner in failed else self._peer_of(owner)
        if peer is None:
            failed.add(owner)
            self._metrics.handoff("failed", len(entries))
            return 0
        sent = refused = 0
        for batch in self._batches(entries):
            try:
                # The action fails with the call (the runbook looks for failed hand-offs).
                with HANDOFF(peer=owner, count=len(batch)):
                    await self._peers.apply(peer, batch, timeout=max(self._peers.timeout, 10.0))
            except PeerError as error:
                if error.code is not None and 400 <= error.code < 500:
                    # The peer answered, and refused this batch (an entry over its budget, say): the batches after
                    # it still go. Stopping here held back, pass after pass, every entry behind one it refuses.
                    self._metrics.handoff("failed", len(batch))
                    refused += len(batch)
                    continue
                failed.add(owner)
                self._metrics.handoff("failed", len(entries) - sent - refused)
                return sent
            for entry in batch:
                slot = (entry.key, entry.version)
                acked[slot] = acked.get(slot, 0) + 1
            sent += len(batch)
            self._metrics.handoff("sent", len(batch))
        return sent

    def _batches(self, entries: List[Entry]):
        batch: List[Entry] = []
        size = 0
        for entry in entries:
            batch.append(entry)
            size += entry.size
            if len(batch) >= self.batch_entries or size >= self.batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    async def _sync(self, node: str, digest: Digest, reason: str) -> int:
        """
        Bring one co-owner up to date with what this node holds for their shared keys.

        :return: how many entries were sent.
        """
        peer = self._peer_of(node)
        if peer is None:
            return 0
        background = reason == ANTI_ENTROPY
        with SYNC(peer=node, reason=reason) as action:
            # Entries sent so far, batch by batch: a round that fails midway still sent those.
            sent = [0]
            try:
                differing = await self._peers.differing_buckets(peer, self.node_id, digest.wire(), background)
                # The versions of the differing buckets, up to VERSIONS_PER_CALL a call rather than a call a
                # bucket. A periodic pass skips entries stamped within SETTLE_MS of now (the next pass covers
                # them); re-replication after a membership change sends everything.
                fresh = None
                if background:
                    now_ms = self._wall() * 1000
                    fresh = (now_ms - SETTLE_MS, now_ms + SETTLE_MS)
                versions: Dict[str, Version] = {}
                slices = _Slices(self._clock, lambda: background and not self.leaving)
                for bucket in differing:
                    for key, version in digest.buckets.get(bucket, {}).items():
                        if slices.due():
                            await slices.pause()
                        if fresh is not None and fresh[0] <= version[0] <= fresh[1]:
                            continue
                        versions[key] = version
                        if len(versions) >= VERSIONS_PER_CALL:
                            await self._send_wanted(peer, versions, sent)
                            versions = {}
                if versions:
                    await self._send_wanted(peer, versions, sent)
            except PeerError:
                # What was sent before the failure was still sent.
                if reason == ANTI_ENTROPY:
                    self._metrics.antientropy("failed", sent[0])
                else:
                    self._metrics.rereplication("failed")
                    if sent[0]:
                        self._metrics.rereplication("sent", sent[0])
                action.add_success_fields(sent=sent[0], failed=True)
                return sent[0]
            if reason == ANTI_ENTROPY:
                self._metrics.antientropy("ok", sent[0])
            elif sent[0]:
                self._metrics.rereplication("sent", sent[0])
            action.add_success_fields(sent=sent[0], failed=False)
            return sent[0]

    async def _send_wanted(self, peer, versions: Dict[str, Version], sent: List[int]) -> None:
        """
        Send ``peer`` the entries among ``versions`` it lacks or holds older, adding to ``sent[0]`` batch by batch.
        """
        wanted, lacking = await self._peers.wanted(peer, versions)
        # Not a use of them (nor is comparing versions, in ``wanted``): anti-entropy looks at most shared keys on
        # each pass, and would leave the LRU order that of its buckets, not that of the clients' reads.
        entries = [entry for entry in (self.store.current(key, use=False) for key in wanted) if entry is not None]
        # No tombstone to a peer that holds nothing of its key: there it hides nothing, and it would start a new
        # grace period. Two replicas that applied a delete further apart than a pass then sent it back and forth
        # for good, each to the other just after it had collected its own. (It still goes to one that holds an
        # older value, which it deletes.)
        entries = [entry for entry in entries if entry.value is not None or entry.key not in lacking]
        for batch in self._batches(entries):
            await self._peers.apply(peer, batch, timeout=max(self._peers.timeout, 10.0))
            sent[0] += len(batch)

    # -- the peer's side of anti-entropy ---------------------------------------------------------------

    async def shared_digest(self, sender: str, background: bool = False) -> Dict[int, str]:
        """
        The bucket hashes of the entries this node holds that it and ``sender`` both own: from the last
        pass if the ring has not changed since (a write since then only makes a bucket differ, which the
        key-level exchange settles), else from a fresh walk over the store.

        :param background: whether the sender asks for its periodic anti-entropy pass: the walk then takes
            :data:`BACKGROUND_SHARE` of the reactor's time, as that pass's own walk does.
        """
        ring = self._ring()
        cache = self._digest_cache
        if cache.ring is ring and not self.leaving and (
                self.store.changes - cache.changes <= max(1000, len(self.store) // 20)
                or (background and self._clock.seconds() - cache.made <= MAX_DIGEST_AGE)):
            return cache.hashes.get(sender, {})
        digest = Digest()
        slices = _Slices(self._clock, background)
        for entry in self.store.entries():
            if slices.due():
                await slices.pause()
            owners = ring.preference_list(entry.key, self.replicas, remember=False)
            if sender in owners and self.node_id in owners:
                digest.add(entry.key, entry.version)
        return digest.wire()

    def wanted(self, versions: Dict[str, Version]) -> Tuple[List[str], List[str]]:
        """
        The keys of ``versions`` this node lacks or holds at an older version; and of those, the ones it holds
        nothing of (no entry, no tombstone).
        """
        result = []
        lacking = []
        for key, version in versions.items():
            current = self.store.current(key, use=False)
            if current is None:
                result.append(key)
                lacking.append(key)
            elif current.version < version:
                result.append(key)
        return result, lacking

    # -- drain ----------------------------------------------------------------------------------------

    def drain(self, timeout: float) -> Deferred:
        """
        Hand every local entry to the owners it has without this node, retrying until the store is empty
        or ``timeout`` seconds have passed.

        :return: a Deferred firing with the number of entries that could not be handed off.
        """
        self.leaving = True
        return ensureDeferred(self._drain(timeout))

    async def _drain(self, timeout: float) -> int:
        deadline = self._clock.seconds() + timeout
        held = len(self.store) + self.store.tombstone_count
        with DRAIN(entries=held) as action:
            remaining = held
            while remaining and len(self._ring().nodes - {self.node_id}) > 0:
                await self.run_pass("drain")
                remaining = len(self.store) + self.store.tombstone_count
                # An empty store stays empty: a leaving node refuses its peers' copies (Node.takes_copies), so
                # nothing can arrive after the drain ends that the node would then take down with it.
                if remaining == 0 or self._clock.seconds() >= deadline:
                    break
                await deferLater(self._clock, min(0.5, max(0.0, deadline - self._clock.seconds())),
                                 lambda: None)
            action.add_success_fields(remaining=remaining)
            return remaining


__all__ = ["ANTI_ENTROPY", "Rebalancer", "Digest", "bucket_of"]
