"""
The only place that decides who holds a key.

Any node coordinates any request. A write is versioned here and sent in parallel to the first
REPLICATION_FACTOR live nodes of the key's preference list; an owner that fails is replaced at once by the
next node on the ring, which keeps the copy as a hint until the rebalancer hands it back (sloppy quorum,
hinted handoff). A read asks the same owners, fails over the same way, answers with the newest version and
repairs stale replicas.

The local node goes through the same logic, with a direct call in place of HTTP.
"""

from contextvars import Context, copy_context
from typing import AbstractSet, Callable, List, NamedTuple, Optional, Tuple

from attr import attrib, attrs
from eliot import current_action, write_failure, write_traceback
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from .batcher import Waiter
from .copystream import LEAVING_ERROR
from .deferreds import gather
from .hlc import HybridLogicalClock, format_version
from .log import DEBUG, INFO, emit, new_task_uuid, parse_task_id, task_id as serialized_task_id
from .log.replication import CLOCK_REJECTED, COORDINATE_READ, COORDINATE_WRITE, COPY_FAILED, HINTED, READ_REPAIR
from .log.store import STORE_APPLIED_LINE, STORE_APPLY, STORE_APPLY_BATCH
from .peers import PeerError
from .privateapi import continue_typed_task
from .ring import HashRing
from .store import ApplyResult, Entry, EntryTooLarge, Store
from .wire import MAX_KEY_BYTES


#: What :meth:`Coordinator.get_nowait` returns when only other nodes can answer.
REMOTE = object()


#: Times a write is stamped again, at most, when a replica holds a newer version of its key, before it is
#: acknowledged with what it has: past that, other writes to the key keep overlapping it, and last writer wins.
MAX_RESTAMPS = 3

#: Seconds between two lines about versions too far ahead to adopt (each counts the entries since the last).
CLOCK_REJECTED_EVERY = 10.0


class Unavailable(Exception):
    """
    Too few replicas answered to meet the write quorum, or to serve a read.
    """


class ClockSkewed(Exception):
    """
    This node's clock is too far from its peers' for it to stamp writes (see :mod:`kvresponder.clockskew`).

    :ivar float skew: its offset from the cluster's clocks, in seconds (positive: ahead); or, with ``versions``,
        how far the versions it issues are ahead of its own clock.
    :ivar float bound: ``MAX_CLOCK_OFFSET``.
    """

    def __init__(self, skew: float, bound: float, versions: bool = False) -> None:
        if versions:
            message = ("This node's versions are %.3f s ahead of its clock (its clock ran ahead and was set back), "
                       "past MAX_CLOCK_OFFSET (%g s): it takes no write until its clock reaches them (reads are "
                       "served); send the write to another node." % (skew, bound))
        else:
            message = ("This node's clock is %.3f s %s its peers' clocks, past MAX_CLOCK_OFFSET (%g s): it serves "
                       "no read or write of keys until its clock comes back; send the request to another node."
                       % (abs(skew), "ahead of" if skew > 0 else "behind", bound))
        Exception.__init__(self, message)
        self.skew = skew
        self.bound = bound


def witnessed_result(held: Entry, entry: Entry) -> ApplyResult:
    """
    What a previous owner holding ``held`` says of a write of ``entry`` it was asked about, not sent, as a
    replica's answer to a copy would: its version if newer, and whether that newer version is a live value. An
    older one says nothing: the owners may hold a newer tombstone.
    """
    if held.version > entry.version or held.version == entry.version and held.value != entry.value:
        # An equal version for another value is another write's, as a replica answers it (``Store.apply``).
        return ApplyResult(False, held.value is not None, held.version)
    return ApplyResult(False, False)


def newest_newer(stored) -> Optional[Tuple[int, int, str]]:
    """
    The newest of the versions that replicas reported holding instead of a write (``ApplyResult.newer``), or
    ``None`` if none did.
    """
    newest = None
    for _, result in stored:
        newer = result.newer
        if newer is not None and (newest is None or newer > newest):
            newest = newer
    return newest


class WriteResult(NamedTuple):
    entry: Entry
    created: bool
    copies: int


class DeleteResult(NamedTuple):
    existed: bool
    copies: int


class Coordinator:
    """
    :param store: this node's store.
    :param hlc: this node's clock of versions.
    :param ring: returns the current :class:`~kvresponder.ring.HashRing` of live members.
    :param peer_of: returns the membership :class:`~kvresponder.membership.Peer` for a node id, or ``None``.
    :param peers: a :class:`~kvresponder.peers.PeerClient`.
    :param int replicas: the replication factor.
    :param write_quorum: copies needed to acknowledge a write (``None``: the replication factor); always
        capped by the number of live nodes.
    :param seconds: wall time in seconds, for TTLs.
    :param log_policy: lets the hot path skip building actions that would not be written.
    :param ring_settling: whether the ring changed so recently that data may still be moving, or this node
        still holds entries waiting for hand-off.
    :param ring_changed_recently: the first part alone (by default ``ring_settling``): reads then also ask the
        keys' previous owners, and an owner's own copy does not answer alone.
    :param previous_rings: the rings in force since the ring last settled, before the current one (empty once it
        has settled): writes also ask the owners they named (:meth:`_witnesses`).
    :param takes_copies: whether this node still stores copies: not once it has begun leaving, when a write it
        coordinates that fails over to itself goes to the next node instead.
    :param clock_skew: a :class:`~kvresponder.clockskew.ClockOffsets`: while it says this node's clock is
        skewed, writes are refused with :class:`ClockSkewed`; or ``None``.
    :param traced: whether OpenTelemetry tracing is on (a write's context may then hold a span).
    """

    def __init__(self, store: Store, hlc: HybridLogicalClock, ring: Callable[[], HashRing], peer_of,
                 peers, replicas: int, write_quorum: Optional[int], seconds: Callable[[], float],
                 metrics, log_policy, ring_settling: Callable[[], bool] = lambda: False,
                 clock_skew=None, ring_changed_recently: Optional[Callable[[], bool]] = None,
                 traced: bool = False, leaving: Callable[[], List[str]] = lambda: [],
                 previous_rings: Callable[[], List[HashRing]] = lambda: [],
                 takes_copies: Callable[[], bool] = lambda: True,
                 unjoined: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        self._unjoined = unjoined
        self.hlc = hlc
        self._ring = ring
        self._peer_of = peer_of
        self._peers = peers
        self.replicas = replicas
        self.write_quorum = write_quorum
        self._seconds = seconds
        self._metrics = metrics
        self._log = log_policy
        self._ring_settling = ring_settling
        self._ring_changed_recently = ring_changed_recently if ring_changed_recently is not None else ring_settling
        self._leaving = leaving
        self._previous_rings = previous_rings
        self._takes_copies = takes_copies
        self._clock_skew = clock_skew
        self._traced = traced
        #: When a clock-rejected line was last logged (by ``seconds``), and the rejections since.
        self._rejected_logged_at: Optional[float] = None
        self._rejected_unlogged = 0
        self._rejected_last: Optional[Entry] = None
        self.node_id = hlc.node_id
        self._write_path = WritePath(
            node_id=self.node_id, targets=self._targets, apply_local=self.apply_local, peer_of=peer_of,
            send_copy=peers.send_copy,
            count=metrics.replication, restamped=self.restamped,
            log_writes=lambda: log_policy.enabled("replication", DEBUG), new_task=self._new_write_task,
            context=self._write_context, witnesses=self._witnesses, peek=self._peek, takes_copies=takes_copies,
            quorum_without=self.quorum_without)

    # -- local operations, shared with the internal routes ----------------------------------------------

    def apply_local(self, entry: Entry, task: Optional[Tuple[str, List[int]]] = None) -> ApplyResult:
        """
        Apply an entry to this node's store, and log it as one ``store:applied`` line (an action would be two):
        at ``task`` (a task id and level) if given, else in the current action or a task of its own.
        """
        if not self.hlc.observe(entry.version):
            self._clock_rejected(entry, 1)
        result = self.store.apply(entry)
        if self._log.enabled("store", INFO):
            STORE_APPLIED_LINE.emit(task, entry.key, format_version(entry.version), entry.value is None,
                                    result.applied, result.had_live)
        return result

    def _new_write_task(self) -> Optional[str]:
        """
        The id of a new task for a replicated write that runs outside any action, where the ``store`` area logs
        at info: each node that stores the write logs its ``store:applied`` line in it, so that a write is one
        tree across nodes at info without the actions around it (``None`` where there is an action to join,
        or nothing to log).
        """
        if current_action() is not None or not self._log.enabled("store", INFO):
            return None
        return new_task_uuid()

    def _write_context(self) -> Optional[Context]:
        """
        A copy of the context a replicated write starts in, for its failovers to run in; ``None`` where it holds
        nothing they need: no Eliot action, and no span (tracing off). The usual write then spares the copy.
        """
        if self._traced or current_action() is not None:
            return copy_context()
        return None

    def apply_copy(self, entry: Entry, task_id: bytes) -> ApplyResult:
        """
        Apply a copy of a write another node coordinates. ``task_id`` is that write's serialized Eliot task:
        the store action continues it, so it appears in the writer's tree as the replica's own node, with no
        ``peer-served`` action wrapped around it (two log lines per copy instead of four).
        """
        if not self._log.enabled("store", DEBUG):
            # At info, one line in the writer's task, at the level it was sent: not an action (two lines).
            return self.apply_local(entry, parse_task_id(task_id) if self._log.enabled("store", INFO) else None)
        try:
            action = continue_typed_task(STORE_APPLY, task_id, key=entry.key, version=format_version(entry.version),
                                         tombstone=entry.value is None)
        except ValueError:
            # A malformed task id: the copy is still stored, in a tree of its own.
            return self.apply_local(entry)
        if not self.hlc.observe(entry.version):
            self._clock_rejected(entry, 1)
        with action:
            result = self.store.apply(entry)
            action.add_success_fields(applied=result.applied, had_live=result.had_live)
        return result

    def apply_copies(self, entries: List[Entry], task_ids: List[bytes]) -> List[ApplyResult]:
        """
        Apply a batch of copies another node sent, over HTTP or its copy stream. With one task id an entry
        (``-`` for none), these are coalesced client writes, and each entry's store action joins its own
        writer's tree; a single entry is one write being replicated; anything else is bulk data (handoff,
        re-replication, anti-entropy), applied inside one action.

        :raises EntryTooLarge: if an entry exceeds this node's memory budget.
        """
        if task_ids and len(task_ids) == len(entries):
            return [self.apply_local(entry) if task_id == b"-" else self.apply_copy(entry, task_id)
                    for entry, task_id in zip(entries, task_ids)]
        if len(entries) == 1:
            return [self.apply_local(entries[0])]
        return self.apply_batch(entries)

    def apply_batch(self, entries: List[Entry], observe: bool = True) -> List[ApplyResult]:
        """
        Apply many entries (a bulk request's share, handoff, re-replication, anti-entropy) inside one action,
        not one per entry.

        :param observe: move this node's clock past the entries' versions (see
            :meth:`~kvresponder.hlc.HybridLogicalClock.observe`); ``False`` for versions it stamped itself.
        """
        with STORE_APPLY_BATCH(count=len(entries)) as action:
            rejected = None
            count = 0
            if observe:
                observe_version = self.hlc.observe
                for entry in entries:
                    if not observe_version(entry.version):
                        rejected = entry
                        count += 1
            results = self.store.apply_many(entries)
            if rejected is not None:
                self._clock_rejected(rejected, count)
            action.add_success_fields(applied=sum(1 for result in results if result.applied))
        return results

    def _clock_rejected(self, entry: Entry, count: int) -> None:
        """
        ``count`` entries (``entry`` the last of them) carried versions too far ahead of this node's clock for
        it to adopt: counted, and logged at most once every :data:`CLOCK_REJECTED_EVERY` seconds with how many
        since the last line; the entries themselves are stored by version order as always. Two nodes each within
        the bound of the cluster can be twice the bound apart, and the one behind then refuses the other's every
        version: a line a copy was a warning a write.
        """
        self._metrics.clock_rejected("entry", count)
        self._rejected_unlogged += count
        self._rejected_last = entry
        self.log_clock_rejected()

    def log_clock_rejected(self) -> None:
        """
        Log the versions too far ahead to adopt counted since the last line, if there are any and
        :data:`CLOCK_REJECTED_EVERY` seconds have passed since it (or the clock stepped back); called on each
        rejection and every second, so that the last of a burst shows too.
        """
        entry = self._rejected_last
        if entry is None:
            return
        now = self._seconds()
        last = self._rejected_logged_at
        if last is not None and last <= now < last + CLOCK_REJECTED_EVERY:
            return
        self._rejected_logged_at = now
        count, self._rejected_unlogged, self._rejected_last = self._rejected_unlogged, 0, None
        CLOCK_REJECTED.log(key=entry.key, version=format_version(entry.version), count=count)

    def _check_clock(self) -> None:
        """
        :raises Unavailable: while this node starts and has not heard its whole cluster (see ``unjoined``).
        :raises ClockSkewed: while this node's clock is too far from its peers' to stamp writes; nor does it
            serve reads then: such a node may have refused its peers' heartbeats and see none of them, and its
            own store alone would answer "absent" for keys the cluster holds.
        """
        skew = self._clock_skew
        if skew is not None and skew.skewed:
            # First: a node whose clock is far off hears no peer (it refuses their heartbeats, or they its), and
            # its skew is what the operator must be told of.
            raise ClockSkewed(skew.skew, skew.max_offset)
        if self._unjoined():
            # Starting, and no peer heard yet: alone in its ring, it would acknowledge a write with its one copy
            # (stamped below what the cluster may hold, so an earlier write wins over it) and answer "absent" for
            # keys the cluster holds. Or some heard, not all: the previous owners it would ask a key's version of
            # may miss where its earlier write sits. The first heartbeats' answers come within moments.
            raise Unavailable("This node is starting and has not heard from its cluster yet; retry in a moment.")

    def check_serving(self, writes: bool) -> None:
        """
        Whether this node serves requests of keys now, and, with ``writes``, stamps writes: what a request of many
        groups (``/bulk``) asks once, before its first.

        :raises ClockSkewed: see :meth:`_check_clock` and, with ``writes``, :meth:`_check_versions`.
        :raises Unavailable: see :meth:`_check_clock`.
        """
        self._check_clock()
        if writes:
            self._check_versions()

    def _check_versions(self) -> None:
        """
        :raises ClockSkewed: while the versions this node issues run further ahead of its clock than the bound
            (its clock ran ahead and was set back): every write it stamped would carry a version from the future.
            Looked at now, not at the last evaluation, which may be a second old. Reads are served.
        """
        skew = self._clock_skew
        if skew is not None:
            lead = skew.lead_now()
            if lead > skew.max_offset:
                raise ClockSkewed(lead, skew.max_offset, versions=True)

    # -- the preference list --------------------------------------------------------------------------

    def _targets(self, key: str) -> Tuple[List[str], List[str], int]:
        """
        The key's owners among live nodes, the nodes after them in ring order (for failover), and the
        number of copies a write needs.
        """
        ring = self._ring()
        ordered = ring.preference_list(key, len(ring))
        owners = ordered[:self.replicas]
        fallbacks = ordered[self.replicas:]
        return owners, fallbacks, self._quorum_for(len(ordered))

    def quorum(self) -> int:
        """
        The copies a write needs now (what :meth:`_targets` gives every key).
        """
        return self._quorum_for(len(self._ring()))

    def _quorum_for(self, nodes: int) -> int:
        """
        ``WRITE_QUORUM`` if set, else the replication factor, or ``nodes`` (the ring's size) if fewer.
        """
        if self.write_quorum is not None:
            # Asked for explicitly: a strict quorum, even when fewer nodes are alive (a minority side
            # of a partition then refuses writes instead of accepting them alone).
            return self.write_quorum
        return max(min(self.replicas, nodes), 1)

    def quorum_without(self, quorum: int, leavers: AbstractSet[str]) -> int:
        """
        The copies a write that fell short of ``quorum`` needs once ``leavers`` (nodes that refused its copies
        because they are leaving) are counted out: a write begun after their leave was heard would have
        needed no more (the quorum follows the live nodes), so one that overlapped the leave does not fail for
        it. An explicit ``WRITE_QUORUM`` stays as it is.
        """
        if self.write_quorum is not None or not leavers:
            return quorum
        staying = len(self._ring().nodes - leavers)
        return min(quorum, max(min(self.replicas, staying), 1))

    def is_local_only(self) -> bool:
        ring = self._ring()
        return len(ring) == 1 and self.node_id in ring

    def _peek(self, node: str, key: str) -> Deferred:
        """
        The newest entry ``node`` holds for ``key`` (tombstones included), or ``None``: a Deferred.
        """
        if node == self.node_id:
            return succeed(self.store.current(key))
        peer = self._peer_of(node)
        if peer is None:
            return fail(Unavailable("%s left" % (node,)))
        return self._peers.get_coalesced(peer, key)

    def _witnesses(self, key: str, owners: List[str]) -> List[str]:
        """
        The nodes that owned ``key`` under the rings of the last moments (see ``previous_rings``) and do not own
        it now: while the ring settles, an earlier write may still be on them alone. A join can replace every
        owner of a key (the new node's point can become the key's start), and then no current owner holds the
        earlier write yet; a write that asks these too hears of its newer version and is stamped above it, so
        that a later write still wins whatever the clocks say. They are asked for their version (a copy would be
        one more for the pass to hand on), but for a write that expires, which they are sent
        (``_ReplicatedWrite._tell``); one that fails is not replaced.
        """
        rings = self._previous_rings()
        if not rings:
            return []
        found: List[str] = []
        for ring in rings:
            # Not remembered: a node keeps up to eight rings from before, each of which would hold its own.
            for node in ring.preference_list(key, self.replicas, remember=False):
                if node not in owners and node not in found:
                    found.append(node)
        return found

    # -- writes ---------------------------------------------------------------------------------------

    def put(self, key: str, value: bytes, ttl: Optional[float]) -> Deferred:
        """
        Store ``value`` (serialized JSON) under ``key``.

        :return: a Deferred firing with a :class:`WriteResult`, or failing with :class:`Unavailable` or
            :class:`ClockSkewed`.
        """
        done: Deferred = Deferred()
        try:
            result = self.put_to(key, value, ttl, done)
        except Exception:
            return fail()
        return done if result is None else succeed(result)

    def put_to(self, key: str, value: bytes, ttl: Optional[float], waiter: Waiter) -> Optional[WriteResult]:
        """
        :meth:`put`, for a caller that waits on a :class:`~kvresponder.batcher.Waiter` of its own rather than a
        Deferred (the fast lane: a Deferred and its callbacks were a visible share of a replicated write).
        Where this node writes alone (alone in its ring), the write is done at once and its
        :class:`WriteResult` returned, ``waiter`` untouched; otherwise ``None``, and ``waiter`` is settled once
        with the result or an :class:`Unavailable`, possibly before this returns.

        :raises ClockSkewed: as :meth:`put` fails.
        """
        self._check_clock()
        self._check_versions()
        expires_at = None if ttl is None else self._seconds() + ttl
        entry = Entry(key, value, self.hlc.now(), expires_at)
        if self._writes_alone():
            return self._write_alone(entry, "put")
        _ReplicatedWrite(self._write_path, entry, "put", waiter).start()
        return None

    def delete(self, key: str) -> Deferred:
        """
        Write a tombstone for ``key``.

        :return: a Deferred firing with a :class:`DeleteResult`.
        """
        try:
            self._check_clock()
            self._check_versions()
        except (ClockSkewed, Unavailable):
            return fail()
        d = self._write_deferred(Entry(key, None, self.hlc.now(), None), "delete")
        return d.addCallback(lambda result: DeleteResult(result.created is False, result.copies))

    def restamped(self, entry: Entry, newer) -> Entry:
        """
        ``entry`` stamped again to order after ``newer``, a version a replica holds for its key: a write that
        started after that version was written must win over it whatever the clocks say. This node's clock
        does not move for it (:meth:`~kvresponder.hlc.HybridLogicalClock.above`), so a version a skewed node
        stamped in the future is passed over without this node's later writes following it into the future.
        """
        return Entry(entry.key, entry.value, self.hlc.above(newer), entry.expires_at)

    def _writes_alone(self) -> bool:
        return (self.write_quorum is None or self.write_quorum <= 1) and self.is_local_only()

    def _write_alone(self, entry: Entry, op: str) -> "WriteResult":
        # A single node: the write is local and synchronous, so spare it the coroutine. Its one copy is counted,
        # once stored, as a replicated write's copies are (and a bulk write's, alone: ``_write_here``).
        result = first = self.apply_local(entry)
        self._metrics.replication(op, "success")
        for _ in range(MAX_RESTAMPS):
            if result.newer is None:
                break
            entry = self.restamped(entry, result.newer)
            result = self.apply_local(entry)
        return WriteResult(entry, not first.had_live, 1)

    def _write_deferred(self, entry: Entry, op: str) -> Deferred:
        try:
            if self._writes_alone():
                return succeed(self._write_alone(entry, op))
            done: Deferred = Deferred()
            _ReplicatedWrite(self._write_path, entry, op, done).start()
            return done
        except Exception:
            return fail()

    async def _apply_on(self, node: str, entry: Entry) -> ApplyResult:
        if node == self.node_id:
            if not self._takes_copies():
                # Leaving (a read repair of a read begun before): it would leave with the process.
                raise Unavailable("this node is leaving")
            return self.apply_local(entry)
        peer = self._peer_of(node)
        if peer is None:
            raise Unavailable("%s left" % (node,))
        return await self._peers.apply_coalesced(peer, entry)

    # -- many at once (the bulk endpoint) ----------------------------------------------------------------

    async def write_many(self, entries: List[Entry], op: str) -> List[object]:
        """
        Write many entries with one call per node instead of one per entry. Each entry still gets its own
        owners, its own failover to the next nodes on the ring, and its own quorum.

        An entry that a replica answers with a newer version of its key is stamped again above it and
        written again, as a single write is (:class:`_ReplicatedWrite`).

        :return: for each entry, a :class:`WriteResult` or an :class:`Unavailable`.
        """
        entries = list(entries)
        results: List[object] = [None] * len(entries)
        had_live: List[Optional[bool]] = [None] * len(entries)
        todo = list(range(len(entries)))
        if (self.write_quorum is None or self.write_quorum <= 1) and self.is_local_only():
            return self._write_here(entries, op)
        for attempt in range(MAX_RESTAMPS + 1):
            plans = [self._targets(entries[i].key) for i in todo]
            leavers: set = set()
            write = self._fan_out(plans, lambda node, indices: self._apply_many_on(
                node, [entries[todo[i]] for i in indices], leavers), op, count_success=True)
            if self._previous_rings():
                stored, seen_by_item = await gather([write, self._witnessed_many(
                    [(entries[i], owners) for i, (owners, _, _) in zip(todo, plans)])])
            else:
                stored = await write
                seen_by_item = [[]] * len(todo)
            again = []
            for index, (_, _, quorum), copies, seen in zip(todo, plans, stored, seen_by_item):
                if had_live[index] is None:
                    had_live[index] = any(r.had_live for _, r in copies) or any(r.had_live for _, r in seen)
                if len(copies) < quorum and leavers:
                    quorum = self.quorum_without(quorum, leavers)
                if len(copies) < quorum:
                    results[index] = Unavailable("only %d of the %d copies needed could be stored"
                                                 % (len(copies), quorum))
                    continue
                newer = newest_newer(copies + seen)
                if newer is not None and attempt < MAX_RESTAMPS:
                    entries[index] = self.restamped(entries[index], newer)
                    again.append(index)
                    continue
                results[index] = WriteResult(entries[index], not had_live[index], len(copies))
            todo = again
            if not todo:
                break
        return results

    async def _witnessed_many(self, items: List[Tuple[Entry, List[str]]]) -> List[List[Tuple[str, ApplyResult]]]:
        """
        What the previous owners of each ``(entry, owners)`` say of it while the ring settles (``_witnesses``):
        for each item, the ``(node, ApplyResult)`` pairs that name a version newer than the entry's, as
        ``_ReplicatedWrite`` hears them. An entry that expires is sent to them (``_ReplicatedWrite._tell``); the
        others are asked for their version, and so is a previous owner that did not take the copy. No
        fallbacks, no quorum, and not counted as replica calls (a previous owner may well be gone).
        """
        witnesses = [self._witnesses(entry.key, owners) for entry, owners in items]
        tells = [entry.expires_at is not None for entry, _ in items]

        def ask(plans):
            return self._fan_out(plans, lambda node, indices: self._get_many_on(
                node, [items[i][0].key for i in indices]), "get", count_success=False, count_failure=False)

        told, held = await gather([
            self._fan_out([(nodes if tell else [], [], 0) for nodes, tell in zip(witnesses, tells)],
                          lambda node, indices: self._apply_many_on(node, [items[i][0] for i in indices]),
                          "put", count_success=False, count_failure=False),
            ask([([] if tell else nodes, [], 0) for nodes, tell in zip(witnesses, tells)])])
        missed = [[node for node in nodes if tell and node not in {n for n, _ in answered}]
                  for nodes, tell, answered in zip(witnesses, tells, told)]
        if any(missed):
            late = await ask([(nodes, [], 0) for nodes in missed])
            held = [first + then for first, then in zip(held, late)]
        seen = []
        for (entry, _), answered, heard in zip(items, told, held):
            found = [(node, result) for node, result in answered if result.newer is not None]
            found += [(node, witnessed_result(current, entry)) for node, current in heard if current is not None]
            seen.append(found)
        return seen

    async def _fan_out(self, plans, call, op: str, count_success: bool,
                       count_failure: bool = True) -> List[List[Tuple[str, object]]]:
        """
        Run ``call(node, indices)`` once per node for all the items that node owns, and give each item that
        a node failed to answer to that item's next fallback, until every item has its answers or has run
        out of nodes.

        :return: for each item, the ``(node, answer)`` pairs it got.
        """
        answers: List[List[Tuple[str, object]]] = [[] for _ in plans]
        pending: dict = {}
        for index, (owners, _, _) in enumerate(plans):
            for owner in owners:
                pending.setdefault(owner, []).append(index)
        while pending:
            batches = list(pending.items())
            results = await gather([call(node, indices) for node, indices in batches])
            pending = {}
            for (node, indices), result in zip(batches, results):
                if result is None:
                    if count_failure:
                        self._metrics.replication(op, "failure", len(indices))
                    for index in indices:
                        fallbacks = plans[index][1]
                        if fallbacks:
                            pending.setdefault(fallbacks.pop(0), []).append(index)
                    continue
                if count_success:
                    self._metrics.replication(op, "success", len(indices))
                for index, answer in zip(indices, result):
                    answers[index].append((node, answer))
        return answers

    def _write_here(self, entries: List[Entry], op: str) -> List[object]:
        """
        :meth:`write_many` when this node is the only one in its ring and a write needs one copy: the same
        answers, without a preference list for each key, a fan-out to await, or a list of answers an entry,
        which cost more than storing the entries.
        """
        results: List[object] = [None] * len(entries)
        had_live: List[bool] = []
        todo = range(len(entries))
        batch = entries
        for attempt in range(MAX_RESTAMPS + 1):
            try:
                applied = self._store_here(batch, own=True)
            except Exception:
                # As the fan-out takes a node that fails in an unexpected way: logged, and no copy.
                write_traceback()
                self._metrics.replication(op, "failure", len(batch))
                for index in todo:
                    results[index] = Unavailable("only 0 of the 1 copies needed could be stored")
                return results
            self._metrics.replication(op, "success", len(batch))
            if attempt == 0:
                had_live = [result.had_live for result in applied]
            again = []
            for index, result in zip(todo, applied):
                newer = result.newer
                if newer is not None and attempt < MAX_RESTAMPS:
                    entries[index] = self.restamped(entries[index], newer)
                    again.append(index)
                    continue
                results[index] = WriteResult(entries[index], not had_live[index], 1)
            if not again:
                break
            todo = again
            batch = [entries[index] for index in again]
        return results

    def _store_here(self, entries: List[Entry], own: bool = False) -> List[ApplyResult]:
        """
        Apply entries this node coordinates to its store: one ``store:apply-batch`` action for many, as a
        peer logs the batch this node sends it (a bulk write was two lines an entry of this node's share
        here, and most of what a bulk load allocated); a plain ``store:applied`` line for one.

        :param own: every entry carries a version this node's clock issued (:meth:`~HybridLogicalClock.now`
            or :meth:`~HybridLogicalClock.above`): the clock has nothing to learn from them.
        """
        if len(entries) == 1:
            return [self.apply_local(entries[0])]
        return self.apply_batch(entries, observe=not own)

    async def _apply_many_on(self, node: str, entries: List[Entry],
                             leavers: Optional[set] = None) -> Optional[List[ApplyResult]]:
        """
        :param leavers: where a node that refuses the copies because it is leaving is noted.
        """
        if node == self.node_id:
            if self._takes_copies():
                return self._store_here(entries)
            # Leaving, this node holds nothing it could keep: the next node takes it (as a peer's 503 would).
            if leavers is not None:
                leavers.add(node)
            return None
        peer = self._peer_of(node)
        if peer is None:
            return None
        try:
            return await self._peers.apply(peer, entries)
        except PeerError as error:
            if leavers is not None and refused_as_leaving(error):
                leavers.add(node)
            return None

    def put_many(self, items: List[Tuple[str, bytes, Optional[float]]]) -> Deferred:
        try:
            self._check_clock()
            self._check_versions()
        except (ClockSkewed, Unavailable):
            return fail()
        now = self._seconds()
        entries = [Entry(key, value, version, None if ttl is None else now + ttl)
                   for (key, value, ttl), version in zip(items, self.hlc.now_many(len(items)))]
        return ensureDeferred(self.write_many(entries, "put"))

    def delete_many(self, keys: List[str]) -> Deferred:
        try:
            self._check_clock()
            self._check_versions()
        except (ClockSkewed, Unavailable):
            return fail()
        entries = [Entry(key, None, version, None) for key, version in zip(keys, self.hlc.now_many(len(keys)))]
        return ensureDeferred(self.write_many(entries, "delete"))

    async def read_many(self, keys: List[str]) -> List[object]:
        """
        Read many keys with one call per node, by the rules of a single read (:meth:`_read_owners`): just after a
        ring change each key's previous owners are asked too, a key only fallbacks answered "none" for is
        unavailable, and a miss while the ring settles asks the rest of the ring and the nodes that are leaving
        it.

        :return: for each key, its live :class:`Entry`, ``None``, or an :class:`Unavailable`.
        """
        self._check_clock()
        plans = [self._targets(key) for key in keys]
        witnesses: Optional[List[List[str]]] = None
        if self._ring_changed_recently():
            # As a single read: each key's previous owners are asked too (:meth:`_previous_owners`), at once.
            witnesses = []
            for index, (key, (owners, fallbacks, quorum)) in enumerate(zip(keys, plans)):
                previous_owners, fallbacks = self._previous_owners(key, owners, fallbacks)
                witnesses.append(previous_owners)
                plans[index] = (owners, fallbacks, quorum)
        fan_out = self._fan_out(plans, lambda node, indices: self._get_many_on(
            node, [keys[i] for i in indices]), "get", count_success=True)
        if witnesses is None:
            answers = await fan_out
        else:
            previous: dict = {}
            for index, nodes in enumerate(witnesses):
                for node in nodes:
                    previous.setdefault(node, []).append(index)
            heard: List[list] = [[] for _ in keys]
            # Under way before the owners are asked, not after them.
            asking = ensureDeferred(self._ask_more(previous, keys, heard))
            answers = await fan_out
            await asking
            for answered, more in zip(answers, heard):
                answered.extend(more)
        missed = [index for index, answered in enumerate(answers)
                  if answered and all(entry is None for _, entry in answered)]
        leaving: List[str] = []
        if missed and self._ring_settling():
            leaving = self._leaving()
            wider: dict = {}
            for index in missed:
                owners, fallbacks, _ = plans[index]
                asked = set(owners) | set(fallbacks) | set(witnesses[index] if witnesses is not None else ())
                for node in list(fallbacks) + [node for node in leaving if node not in asked]:
                    wider.setdefault(node, []).append(index)
            await self._ask_more(wider, keys, answers)
            # Asked again, as a single read does (``_read_owners``): a previous holder may have dropped a key,
            # its owners having stored it, between their "absent" and its own.
            again: dict = {}
            for index in missed:
                if all(entry is None for _, entry in answers[index]):
                    owners, fallbacks, _ = plans[index]
                    for node in list(owners) + list(fallbacks):
                        again.setdefault(node, []).append(index)
            await self._ask_more(again, keys, answers)
        now = self._seconds()
        results: List[object] = []
        not_repaired = frozenset(leaving)
        for index, ((owners, _, _), answered) in enumerate(zip(plans, answers)):
            previous_owners = witnesses[index] if witnesses is not None else None
            try:
                newest = self._newest_known(owners, answered,
                                            not_repaired.union(previous_owners) if previous_owners else not_repaired)
            except Unavailable as error:
                results.append(error)
                continue
            live = newest is not None and newest.value is not None and (
                newest.expires_at is None or newest.expires_at > now)
            results.append(newest if live else None)
        return results

    async def _ask_more(self, asks: dict, keys: List[str], answers: List[list]) -> None:
        # ``asks``: node -> the indices of ``keys`` to ask it for, in one call each; its answers are added.
        batches = list(asks.items())
        results = await gather([self._get_many_on(node, [keys[i] for i in indices]) for node, indices in batches])
        for (node, indices), result in zip(batches, results):
            if result is not None:
                for index, entry in zip(indices, result):
                    answers[index].append((node, entry))

    async def _get_many_on(self, node: str, keys: List[str]) -> Optional[List[Optional[Entry]]]:
        if node == self.node_id:
            return [self.store.current(key) for key in keys]
        peer = self._peer_of(node)
        if peer is None:
            return None
        try:
            return await self._peers.get_many(peer, keys)
        except PeerError:
            return None

    # -- reads ----------------------------------------------------------------------------------------

    def get_nowait(self, key: str):
        """
        The answer to a read of ``key`` if this node can give it at once from its own store: the live
        :class:`~kvresponder.store.Entry`, or ``None``. :data:`REMOTE` if other nodes must be asked.
        """
        self._check_clock()
        ring = self._ring()
        if len(ring) == 1 and self.node_id in ring and not self._ring_changed_recently():
            return self.store.get(key)
        if self.node_id in ring.preference_list(key, self.replicas):
            # An owner holding the key answers from its own copy: every acknowledged write reached every
            # live owner (the default quorum is the replication factor), and what an owner missed while it
            # was unreachable comes back through hint handoff and anti-entropy. Only a miss asks the others.
            # Not just after a ring change: a change can make a node an owner of a key it holds an older
            # version of (it owned the key before, or was told a write as a previous owner), while the newer
            # one is still on its way from the owners it replaced.
            entry = self.store.get(key)
            if entry is not None and not self._ring_changed_recently():
                return entry
        return REMOTE

    def get(self, key: str) -> Deferred:
        """
        The live entry for ``key``, or ``None``.

        :return: a Deferred firing with an :class:`~kvresponder.store.Entry` or ``None``.
        """
        try:
            entry = self.get_nowait(key)
        except (ClockSkewed, Unavailable):
            return fail()
        if entry is not REMOTE:
            return succeed(entry)
        return ensureDeferred(self._read(key))

    async def _read(self, key: str) -> Optional[Entry]:
        owners, fallbacks, _ = self._targets(key)
        if self._log.enabled("replication", DEBUG):
            context = COORDINATE_READ(key=key, targets=owners)
        else:
            context = None
        if context is not None:
            with context:
                newest = await self._read_owners(key, owners, fallbacks)
                context.add_success_fields(found=newest is not None and newest.value is not None)
        else:
            newest = await self._read_owners(key, owners, fallbacks)
        if newest is None or newest.value is None:
            return None
        if newest.expires_at is not None and newest.expires_at <= self._seconds():
            return None
        return newest

    async def _read_owners(self, key: str, owners: List[str], fallbacks: List[str]) -> Optional[Entry]:
        witnesses, fallbacks = self._previous_owners(key, owners, fallbacks)
        answers = await gather([self._read_slot(owner, fallbacks, key) for owner in owners]
                               + [self._read_slot(node, [], key, count=False) for node in witnesses])
        answered = [answer for answer in answers if answer is not None]
        leaving: List[str] = []
        if answered and all(entry is None for _, entry in answered) and self._ring_settling():
            # The ring changed moments ago: the key may still sit on its previous holders, whose handoff
            # is under way. Ask the rest of the ring, and the nodes that are leaving it (this one too, if it
            # drains): they own nothing any more but hold what they have not yet handed off.
            asked = set(owners) | set(fallbacks) | set(witnesses)
            leaving = [node for node in self._leaving() if node not in asked]
            more = await gather([self._read_slot(node, [], key) for node in list(fallbacks) + leaving])
            answered.extend(answer for answer in more if answer is not None)
            if all(entry is None for _, entry in answered):
                # A previous holder drops its copy only once the key's owners (in its ring) have stored it,
                # and that can happen between the two asks: the owners answered "absent" before the copy
                # reached them, the holder after it dropped its own. Asked again, the ring's nodes have it.
                ring_nodes = list(owners) + list(fallbacks)
                again = await gather([self._read_slot(node, [], key) for node in ring_nodes])
                answered.extend(answer for answer in again if answer is not None)
        return self._newest_known(owners, answered, set(leaving).union(witnesses))

    def _previous_owners(self, key: str, owners: List[str], fallbacks: List[str]) -> Tuple[List[str], List[str]]:
        """
        The nodes a read of ``key`` asks besides its owners, and its fallbacks without them. Just after a ring
        change, its owners under the rings before (:meth:`_witnesses`): a change can replace the owners that
        hold a key's newest version by nodes that hold an older one, or none, until the handoff reaches them.
        Their copies answer the read and repair the owners, never themselves; their failures are no replica's
        (not counted). They are not fallbacks meanwhile: an owner that fails is replaced by a node not asked
        yet, which gets the newest as a hint.
        """
        if not self._ring_changed_recently():
            return [], fallbacks
        witnesses = self._witnesses(key, owners)
        if not witnesses:
            return witnesses, fallbacks
        return witnesses, [node for node in fallbacks if node not in witnesses]

    def _newest_known(self, owners: List[str], answered: List[Tuple[str, Optional[Entry]]],
                      leaving: AbstractSet[str]) -> Optional[Entry]:
        """
        The newest of a read's answers, repaired where stale (:meth:`_newest_and_repair`).

        :raises Unavailable: if nobody answered, or only nodes other than the owners answered, with nothing. A
            fallback that holds nothing says nothing of the key: only an owner's "none" is an answer. With
            every owner unreachable and no hint on a fallback, the read is unavailable, not a miss.
        """
        if not answered:
            raise Unavailable("no replica of this key answered")
        if all(entry is None for _, entry in answered) and not any(node in owners for node, _ in answered):
            raise Unavailable("no owner of this key answered")
        # A leaving node's copy answers the read and goes to the nodes that lack it, never back to it.
        return self._newest_and_repair(answered, not_repaired=leaving)

    def _newest_and_repair(self, answered: List[Tuple[str, Optional[Entry]]],
                           not_repaired: AbstractSet[str] = frozenset()) -> Optional[Entry]:
        """
        The newest of the replicas' answers (tombstones included); replicas that answered an older version,
        or nothing, are sent the newest (read repair), except the nodes in ``not_repaired``.
        """
        newest = None
        for _, entry in answered:
            if entry is not None and (newest is None or entry.version > newest.version
                                      or (entry.version == newest.version and _ends_sooner(entry, newest))):
                newest = entry
        if newest is not None:
            # By each node's newest answer: a read that asked again has two from some nodes.
            held: dict = {}
            for node, entry in answered:
                if entry is not None and (held.get(node) is None or entry.version > held[node].version):
                    held[node] = entry
                else:
                    held.setdefault(node, None)
            stale = [node for node, entry in held.items()
                     if (entry is None or entry.version < newest.version) and node not in not_repaired]
            if self.node_id in stale and not self._takes_copies():
                # Leaving: a copy would leave with the process (``_apply_on`` refuses it).
                stale.remove(self.node_id)
            if stale:
                self._repair(newest, stale)
        return newest

    async def _read_slot(self, owner: str, fallbacks: List[str], key: str,
                         count: bool = True) -> Optional[Tuple[str, Optional[Entry]]]:
        """
        :param count: count the calls (``replication`` metrics): not for a node that is no replica of the key.
        """
        node = owner
        while node is not None:
            try:
                if node == self.node_id:
                    answer = self.store.current(key)
                else:
                    peer = self._peer_of(node)
                    if peer is None:
                        raise Unavailable(node)
                    answer = await self._peers.get_coalesced(peer, key)
            except (PeerError, Unavailable):
                if count:
                    self._metrics.replication("get", "failure")
                node = fallbacks.pop(0) if fallbacks else None
                continue
            # Counted as a write's copies are, the coordinator's own included: the failure ratio divides the
            # failed calls by all of them.
            if count:
                self._metrics.replication("get", "success")
            return node, answer
        return None

    def _repair(self, newest: Entry, stale: List[str]) -> None:
        """
        Send the newest version to replicas that answered with an older one (or none). Fire and forget:
        the read does not wait, and anti-entropy catches what this misses.
        """
        READ_REPAIR.log(key=newest.key, peers=stale)

        async def repair_one(node):
            try:
                await self._apply_on(node, newest)
                self._metrics.replication("repair", "success")
            except (PeerError, Unavailable) as error:
                self._metrics.replication("repair", "failure")
                COPY_FAILED.log(key=newest.key, peer=node, reason=str(error))
            except EntryTooLarge:
                # This node's own budget is smaller than the value a peer took (their MAX_MEMORY differs).
                self._metrics.replication("repair", "failure")
                COPY_FAILED.log(key=newest.key, peer=node, reason="larger than the whole memory budget")

        for node in stale:
            ensureDeferred(repair_one(node)).addErrback(write_failure)

    # -- listing --------------------------------------------------------------------------------------

    async def list_keys(self, prefix: str, after: Optional[str], limit: int) -> Tuple[List[str], bool]:
        """
        Keys across the whole cluster, deduplicated and in code point order.

        :return: up to ``limit`` keys after ``after``, and whether more follow.
        """
        self._check_clock()
        if len(prefix.encode("utf-8")) > MAX_KEY_BYTES:
            # Longer than any key: nothing to list (and peers refuse to list it).
            return [], False
        ring = self._ring()
        want = limit + 1
        sources = [self.store.keys(prefix, after, want)]
        remote = [node for node in sorted(ring.nodes) if node != self.node_id]
        # And the nodes leaving the ring: out of it, they still hold what they have not handed off yet (with one
        # copy a key, its only copy). Not waited for as the ring's nodes are: one that has just exited would
        # otherwise fail every listing until its peers drop it.
        leaving = [node for node in sorted(set(self._leaving())) if node != self.node_id and node not in ring.nodes]

        async def from_peer(node):
            peer = self._peer_of(node)
            if peer is None:
                return None
            try:
                return await self._peers.keys(peer, prefix, after, want)
            except PeerError:
                return None

        answers = await gather([from_peer(node) for node in remote + leaving])
        missing = [node for node, answer in zip(remote, answers) if answer is None]
        if missing and self.replicas <= len(missing):
            # Every copy of some keys may sit on the nodes that did not answer.
            raise Unavailable("%d nodes did not answer the listing" % (len(missing),))
        sources.extend(answer for answer in answers if answer is not None)
        merged = sorted(set().union(*sources))
        return merged[:limit], len(merged) > limit


@attrs(frozen=True, slots=True)
class WritePath:
    """
    What a replicated write (:class:`_ReplicatedWrite`) needs from its coordinator, handed to it explicitly.

    :ivar node_id: this node's id.
    :ivar targets: ``targets(key)``: the key's owners, its fallbacks in ring order, and the quorum.
    :ivar apply_local: stores an entry on this node.
    :ivar peer_of: the membership peer of a node id, or ``None``.
    :ivar send_copy: ``send_copy(peer, entry, waiter, task_id=None)``: settles ``waiter`` (a
        :class:`~kvresponder.batcher.Waiter`) with the peer's ``ApplyResult``, or fails it; the peer logs its
        copy at the serialized ``task_id`` if given (else in the caller's current action).
    :ivar count: ``count(op, result, number=1)``: replica calls' outcomes, for metrics.
    :ivar restamped: the entry stamped again above a newer version a replica holds.
    :ivar log_writes: whether a write gets its own ``replication:write`` action (debug level).
    :ivar new_task: a new Eliot task id for a write's ``store:applied`` lines, or ``None`` (see
        :meth:`Coordinator._new_write_task`).
    :ivar context: a copy of the current context for the write's failovers to run in, or ``None`` where it
        holds nothing they need (see :meth:`Coordinator._write_context`).
    :ivar witnesses: ``witnesses(key, owners)``: the key's previous owners while the ring settles, asked too (sent
        a write that expires), so that the write hears of a newer version only they hold (see
        :meth:`Coordinator._witnesses`).
    :ivar peek: ``peek(node, key)``: a Deferred of the newest entry ``node`` holds for ``key``, or ``None``.
    :ivar quorum_without: ``quorum_without(quorum, leavers)``: the copies a write short of ``quorum`` needs with
        the nodes that refused it as leaving counted out (:meth:`Coordinator.quorum_without`).
    """
    node_id: str = attrib()
    targets: Callable = attrib()
    apply_local: Callable = attrib()
    peer_of: Callable = attrib()
    send_copy: Callable = attrib()
    count: Callable = attrib()
    restamped: Callable = attrib()
    log_writes: Callable = attrib()
    new_task: Callable = attrib(default=lambda: None)
    context: Callable = attrib(default=copy_context)
    witnesses: Callable = attrib(default=lambda key, owners: [])
    peek: Callable = attrib(default=None)
    takes_copies: Callable = attrib(default=lambda: True)
    quorum_without: Callable = attrib(default=lambda quorum, leavers: quorum)


def refused_as_leaving(error) -> bool:
    """
    Whether a copy failed because its node said it is leaving (it stores no copies while it drains).
    """
    return getattr(error, "error", None) == LEAVING_ERROR


class _ReplicatedWrite:
    """
    One client write on its way to the key's owners. Each owner's copy is sent at once, in parallel; an owner
    that fails is replaced by the next untried node on the ring, which keeps the copy as a hint. The write
    is acknowledged when every slot has stored its copy or run out of nodes, if at least the quorum did.

    Plain callbacks rather than coroutines, and plain objects rather than Deferreds (a waiter for each copy,
    and the caller's waiter for the write): this is the path of every replicated write, and a coroutine per
    copy (each step run in a copied context) cost more than the copy itself on PyPy. A failover runs in the
    context the write started in (a copy taken inside the caller's Eliot action, the client request's, and at
    debug level inside the write's own ``replication:write``), so
    the next attempt's actions and spans stay in the write's tree and trace (where that context held no action
    and tracing is off, in an empty one: no copy is taken for the usual write); the write's own result fires
    outside it, so that what the caller does next (answer the client, serve a pipelined request) is not logged
    inside a finished write. Whatever goes wrong unexpectedly in one slot is logged and counts as a missing
    copy, as the ``gather`` the coroutines used did; the write still settles its waiter, once.
    """

    __slots__ = ("_path", "_entry", "_op", "_fallbacks", "_quorum", "_waiting", "_stored", "_action",
                 "_context", "_entered", "_waiter", "_fired", "_outcome", "_tries", "_created", "_task", "_level",
                 "_witnessed", "_leavers")

    def __init__(self, path: WritePath, entry: Entry, op: str, waiter: Waiter, tries: int = MAX_RESTAMPS,
                 created: Optional[bool] = None, task: Optional[str] = None, level: int = 1) -> None:
        self._path = path
        self._entry = entry
        self._op = op
        #: Settled once with the write's :class:`WriteResult`, or failed with :class:`Unavailable`.
        self._waiter = waiter
        self._fired = False
        #: Times the write may still be stamped again above a newer version a replica reports.
        self._tries = tries
        #: Whether the key held no live value before the first attempt (``None``: this is the first).
        self._created = created
        self._stored: List[Tuple[str, ApplyResult]] = []
        #: What the previous owners (``WritePath.witnesses``) answered: versions to stay above.
        self._witnessed: List[Tuple[str, ApplyResult]] = []
        #: The nodes that refused a copy because they are leaving (``None``: none did).
        self._leavers: Optional[set] = None
        self._action = None
        #: At info outside any action: the write's own task, where each copy's line takes the next level from
        #: [2]. Level [1] is the write's root action, which only debug logs (as the request's): eliot-tree
        #: draws it as ``<unnamed>``, with every node's line under it (a line at [1] would end the task there).
        #: A write sent again goes on in the task of its first attempt, from the level it reached.
        self._task: Optional[str] = task
        self._level = level
        self._entered = False
        #: The write's result (a WriteResult or an Unavailable) once every slot is done.
        self._outcome = None

    def start(self) -> None:
        """
        Send the write's copies; its waiter is settled once they are done (possibly before this returns).
        """
        path = self._path
        owners, self._fallbacks, self._quorum = path.targets(self._entry.key)
        witnesses = path.witnesses(self._entry.key, owners)
        self._waiting = len(owners) + len(witnesses)
        if path.log_writes():
            self._action = COORDINATE_WRITE(key=self._entry.key, op=self._op,
                                            version=format_version(self._entry.version), targets=owners)
            with self._action.context():
                self._context = copy_context()
                self._sending(owners, witnesses)
        else:
            if self._task is None:
                self._task = path.new_task()
            self._context = path.context()
            self._sending(owners, witnesses)
        self._fire()

    def _sending(self, owners: List[str], witnesses: List[str]) -> None:
        """
        :meth:`_send`, marked as entered: a slot that settles at once (a local copy, a peer already gone) leaves
        the write's result for :meth:`start` to deliver, once out of the write's action.
        """
        entered, self._entered = self._entered, True
        try:
            self._send(owners, witnesses)
        finally:
            self._entered = entered

    def _send(self, owners: List[str], witnesses: List[str]) -> None:
        if not owners and not witnesses:
            self._finish()
        for owner in owners:
            self._attempt(owner, owner)
        if witnesses:
            tell = self._entry.expires_at is not None
            for node in witnesses:
                # A slot of no owner's: it has no fallback, and counts toward no quorum.
                if tell:
                    self._tell(node)
                else:
                    self._ask(node)

    def _tell(self, node: str) -> None:
        """
        Send a previous owner a write that expires, instead of asking it: the new owners may hold nothing for the
        key, so their copies leave no tombstone when they expire, and the previous owner's hand-off, if it
        arrived after that, would bring back the older value it holds. Told the write, it stores it over that
        value and marks it to leave a tombstone (``Store.apply``), and what it hands on is the write. Its answer
        says the same as a peek's would; one that fails (a node leaving refuses copies) is asked instead.
        """
        path = self._path
        try:
            if node == path.node_id:
                if path.takes_copies():
                    self.told(path.apply_local(self._entry, self._next_line()), node)
                else:
                    self._ask(node)
                return
            peer = path.peer_of(node)
            if peer is None:
                self._ask(node)
                return
            path.send_copy(peer, self._entry, _WitnessWaiter(self, node), _task_id_of(self._next_line()))
        except (PeerError, Unavailable):
            self._ask(node)
        except Exception:
            write_traceback()
            self._slot_done(None)

    def tell_failed(self, failure, node: str) -> None:
        """
        A previous owner did not take the copy :meth:`_tell` sent (a leaving node refuses copies): it is asked.
        """
        if not failure.check(PeerError, Unavailable):
            self._in_context(write_failure, failure)
        self._in_context(self._ask, node)
        # Its answer may have settled the write inside the write's context: delivered outside it.
        self._fire()

    def told(self, result: ApplyResult, node: str) -> None:
        """
        A previous owner's answer to a copy :meth:`_tell` sent, taken as its answer to a peek: only a version
        newer than the write's counts (what it held before, if older, may be older than the owners' newest).
        """
        if result.newer is not None:
            self._witnessed.append((node, result))
        self._witness_done()

    def _ask(self, node: str) -> None:
        try:
            d = self._path.peek(node, self._entry.key)
        except Exception:
            write_traceback()
            self._slot_done(None)
            return
        d.addCallbacks(self._heard, self._not_heard, callbackArgs=(node,))

    def _heard(self, entry: Optional[Entry], node: str) -> None:
        try:
            if entry is not None:
                self._witnessed.append((node, witnessed_result(entry, self._entry)))
        except Exception:
            write_traceback()
        self._witness_done()

    def _not_heard(self, failure) -> None:
        if not failure.check(PeerError, Unavailable):
            write_failure(failure)
        self._witness_done()

    def _witness_done(self) -> None:
        try:
            self._slot_done(None)
            self._fire()
        except Exception:
            write_traceback()

    def _attempt(self, owner: str, node: str) -> None:
        try:
            self._try(owner, node)
        except Exception:
            write_traceback()
            self._slot_done(None)

    def _try(self, owner: str, node: str) -> None:
        path = self._path
        line = self._next_line()
        if node == path.node_id:
            if not path.takes_copies():
                # This node began leaving after the write chose it: a copy here would leave with the process.
                self._left(node)
                self._failover(owner, node, "this node is leaving")
                return
            try:
                result = path.apply_local(self._entry, line)
            except Exception:
                write_traceback()
                self._slot_done(None)
                return
            self._slot_done((node, result))
            return
        peer = path.peer_of(node)
        if peer is None:
            self._failover(owner, node, "left the membership")
            return
        try:
            path.send_copy(peer, self._entry, _CopyWaiter(self, owner, node), _task_id_of(line))
        except (PeerError, Unavailable) as error:
            if refused_as_leaving(error):
                self._left(node)
            self._failover(owner, node, str(error))

    def copied(self, result: ApplyResult, node: str) -> None:
        """
        ``node`` stored the copy a :class:`_CopyWaiter` waited for.
        """
        self._slot_done((node, result))
        self._fire()

    def copy_failed(self, failure, owner: str, node: str) -> None:
        """
        ``node`` did not store the copy a :class:`_CopyWaiter` waited for (sent it for ``owner``): failed over.
        """
        if refused_as_leaving(failure.value):
            self._left(node)
        if failure.check(PeerError, Unavailable):
            self._in_context(self._failover, owner, node, str(failure.value))
        else:
            self._in_context(write_failure, failure)
            self._slot_done(None)
        self._fire()

    def _left(self, node: str) -> None:
        if self._leavers is None:
            self._leavers = set()
        self._leavers.add(node)

    def _in_context(self, function, *args) -> None:
        if self._entered:
            # Already inside the write's context: a failure that fired while an attempt was being sent.
            function(*args)
            return
        self._entered = True
        try:
            # A write that began in a context holding nothing of its own goes on in an empty one, not in
            # whatever action happens to settle its copy.
            (self._context or Context()).run(self._contained, function, *args)
        finally:
            self._entered = False

    def _contained(self, function, *args) -> None:
        try:
            function(*args)
        except Exception:
            write_traceback()

    def _failover(self, owner: str, failed: str, reason: str) -> None:
        try:
            self._path.count(self._op, "failure")
            emit(COPY_FAILED, self._next_line(), key=self._entry.key, peer=failed, reason=reason)
            node = self._fallbacks.pop(0) if self._fallbacks else None
            if node is not None:
                emit(HINTED, self._next_line(), key=self._entry.key, owner=owner, holder=node)
        except Exception:
            write_traceback()
            node = None
        if node is None:
            self._slot_done(None)
            return
        self._attempt(owner, node)

    def _next_line(self) -> Optional[Tuple[str, List[int]]]:
        """
        Where the write's next line goes: the next level of its own task, or (``None``) the current action.
        """
        if self._task is None:
            return None
        self._level += 1
        return self._task, [self._level]

    def _slot_done(self, outcome: Optional[Tuple[str, ApplyResult]]) -> None:
        if outcome is not None:
            self._stored.append(outcome)
        self._waiting -= 1
        if self._waiting == 0:
            self._finish()

    def _finish(self) -> None:
        """
        Every slot is done: close the write's action and settle its result, which :meth:`_fire` delivers
        once control is back outside the write's context.
        """
        stored = self._stored
        if stored:
            # Each stored copy is a replica call that succeeded: counted together, once a write.
            self._path.count(self._op, "success", len(stored))
        # Distinct nodes: a node holds one copy, even if a failover sent it a second.
        copies = len(stored)
        if copies == 2:
            copies = 1 if stored[0][0] == stored[1][0] else 2
        elif copies > 2:
            copies = len({node for node, _ in stored})
        if self._action is not None:
            self._action.add_success_fields(copies=copies)
            self._action.finish()
        created = self._created
        if created is None:
            created = not any(result.had_live for _, result in self._stored) and not any(
                result.had_live for _, result in self._witnessed)
        quorum = self._quorum
        if copies < quorum and self._leavers:
            quorum = self._path.quorum_without(quorum, self._leavers)
        if copies < quorum:
            self._outcome = Unavailable("only %d of the %d copies needed could be stored" % (copies, quorum))
            return
        newer = newest_newer(self._stored)
        if self._witnessed:
            heard = newest_newer(self._witnessed)
            if heard is not None and (newer is None or heard > newer):
                newer = heard
        if newer is not None and self._tries > 0:
            # A replica holds a newer version than this write's, though the write began after it was written
            # (or overlaps it): stamp the write again just above it and send it again, so that a write that
            # follows an acknowledged one wins whatever the clocks say.
            self._outcome = _Again(self._path.restamped(self._entry, newer), created)
            return
        self._outcome = WriteResult(self._entry, created, copies)

    def _fire(self) -> None:
        outcome = self._outcome
        if outcome is None or self._entered or self._fired:
            return
        self._fired = True
        if isinstance(outcome, Unavailable):
            self._waiter.errback(Failure(outcome))
        elif isinstance(outcome, _Again):
            # The same write, sent again, to settle the same waiter: its lines go on in the same task.
            again = _ReplicatedWrite(self._path, outcome.entry, self._op, self._waiter, self._tries - 1,
                                     outcome.created, self._task, self._level)
            again.start_in(self._context or Context())
        else:
            self._waiter.callback(outcome)

    def start_in(self, context: Context) -> None:
        """
        :meth:`start` in ``context`` (the context the first attempt began in, so that this one stays in the
        request's tree), marked as entered meanwhile, so that an attempt done at once settles the waiter only
        after, outside it.
        """
        self._entered = True
        try:
            context.run(self.start)
        except Exception:
            if self._waiter.called:
                write_traceback()
            else:
                self._waiter.errback(Failure())
            return
        finally:
            self._entered = False
        self._fire()


def _ends_sooner(entry: Entry, other: Entry) -> bool:
    """
    Of two answers for one version, whether ``entry`` says the write is over sooner: it has expired (a replica whose
    clock is right answers the tombstone it leaves) while the other is live, or it expires earlier. A replica whose
    clock was stepped back holds the same write live for longer, and which answer came first must not decide.
    """
    if entry.value is None:
        return other.value is not None
    if other.value is None:
        return False
    return entry.expires_at is not None and (other.expires_at is None or entry.expires_at < other.expires_at)


def _task_id_of(line: Optional[Tuple[str, List[int]]]) -> Optional[bytes]:
    """
    The serialized Eliot task id a peer logs a copy at, for a write's next line (``_next_line``), or ``None``.
    """
    if line is None:
        return None
    task, level = line
    return serialized_task_id(task, level[0])


@implementer(Waiter)
class _CopyWaiter:
    """
    One copy of a :class:`_ReplicatedWrite`, settled by the batch that carries it: in place of a Deferred a
    copy, the most frequent object of the write path. What goes wrong past the write's own handling is logged
    here, so that it cannot stop the batch from settling the other copies.
    """

    __slots__ = ("_write", "_owner", "_node", "called")

    def __init__(self, write: "_ReplicatedWrite", owner: Optional[str], node: str) -> None:
        self._write = write
        self._owner = owner
        self._node = node
        self.called = False

    def callback(self, result: ApplyResult) -> None:
        if self.called:
            return
        self.called = True
        try:
            self._settled(result)
        except Exception:
            write_traceback()

    def errback(self, error) -> None:
        if self.called:
            return
        self.called = True
        try:
            self._failed(error if isinstance(error, Failure) else Failure(error))
        except Exception:
            write_traceback()

    def _settled(self, result: ApplyResult) -> None:
        self._write.copied(result, self._node)

    def _failed(self, failure: Failure) -> None:
        self._write.copy_failed(failure, self._owner, self._node)


class _WitnessWaiter(_CopyWaiter):
    """
    A previous owner's copy of a :class:`_ReplicatedWrite` (see ``_ReplicatedWrite._tell``): it owns no slot.
    """

    __slots__ = ()

    def __init__(self, write: "_ReplicatedWrite", node: str) -> None:
        _CopyWaiter.__init__(self, write, None, node)

    def _settled(self, result: ApplyResult) -> None:
        self._write.told(result, self._node)

    def _failed(self, failure: Failure) -> None:
        self._write.tell_failed(failure, self._node)


class _Again(NamedTuple):
    """
    A write to send again, stamped anew, and whether its first attempt found no live value.
    """
    entry: Entry
    created: bool
