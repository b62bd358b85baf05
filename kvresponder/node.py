"""
One node: the store, the ring, membership, the coordinator and the rebalancer, wired together.

The node receives its clock and its HTTP client, so the same code runs on the reactor with treq in
production and on ``task.Clock`` with ``StubTreq`` in the in-memory cluster tests. It owns the lifecycle
states that readiness reports: ``starting`` → ``joining`` → ``ready`` → ``draining`` → ``stopped``.
"""

import os
import platform
import secrets
from typing import Callable, Dict, List, Optional, Tuple

from eliot import write_failure, write_traceback
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall, deferLater

from . import __version__
from .admin import AdminGuard
from .clockskew import ClockOffsets
from .coordinator import Coordinator
from .deferreds import gather
from .copystream import CopyStreams
from .discovery import derive_key
from .hlc import HybridLogicalClock
from .log import LogPolicy
from .log.discovery import JOIN_VIEW_UNMATCHED, PEER_CHANGED
from .log.service import CLUSTER_DISABLED, INSECURE
from .log.store import StoreEvents
from .membership import ALIVE, DEAD, GONE, JOINED, LEAVING, MOVED, RESTARTED, Heartbeat, Membership
from .metrics import Metrics
from .peers import PeerAuthenticator, PeerError
from .rebalance import ANTI_ENTROPY, Rebalancer
from .ring import HashRing, members_digest
from .settings import Settings
from .store import Store

STARTING, JOINING, READY, DRAINING, STOPPED = "starting", "joining", "ready", "draining", "stopped"
#: How long a join waits, past ``join_settle``, for every peer it heard to name the ring it has (in heartbeat
#: intervals), and how often it looks.
JOIN_WAIT_INTERVALS = 3
JOIN_POLL = 0.05
#: Not a lifecycle state: what readiness reports while this node's clock is too far from its peers'.
CLOCK_SKEW = "clock-skew"

#: Seconds after a ring change during which a read that finds nothing on a key's owners also asks the
#: other nodes, since the key may still be on its way from its previous holders, and a write asks the previous
#: owners too. The most the ring settles for: it settles sooner once every node says it has handed off what the
#: ring places elsewhere (``Heartbeat.settled``; see :meth:`Node.ring_settling`).
SETTLE_SECONDS = 30.0
#: Reason of the pass a node runs once every peer names its ring (see :meth:`Node._watch_settling`).
SETTLE_PASS = "settle"
#: How often a ready node looks whether its peers all name its ring (:meth:`Node._watch_settling`).
SETTLE_WATCH = 0.25
#: Rings kept from within one settling (the last settled one and the latest): bounded against a flapping peer or a
#: long rolling restart, whose changes keep the ring settling.
MAX_PREVIOUS_RINGS = 8
#: Peers this node timed out whose incarnations it keeps, to tell one cut off from it (heard again) from one
#: restarted.
MAX_TIMED_OUT = 256

#: Seconds without a change to the store after which the garbage of a burst of writes or deletes is given
#: back, if the burst took in and dropped at least an eighth of what the store holds (and 4 MiB): an idle
#: node's RSS then shows what it holds, not what its last writes left behind.
IDLE_RECLAIM_SECONDS = 2.0
#: Expired entries (and old tombstones) reclaimed in one reactor turn: a few milliseconds' work.
SWEEP_CHUNK = 4096

#: Seconds a drain may run past DRAIN_TIMEOUT before its guard stops waiting for it (the rebalancer's own limit is
#: checked between passes; a pass drops what it hands off batch by batch, so what a cut-off pass delivered is
#: gone from the node, and what it did not is counted). The Helm chart leaves this room in the grace period.
DRAIN_GUARD_SECONDS = 1.0


class Node:
    """
    :param settings: the validated :class:`~kvresponder.settings.Settings`.
    :param clock: ``IReactorTime``: timers, timeouts and TTLs.
    :param http: a treq ``HTTPClient`` (or ``StubTreq``) for peer calls.
    :param wall: wall time in seconds (versions, signatures); defaults to ``clock.seconds``.
    :param log_policy: the shared :class:`~kvresponder.log.LogPolicy`.
    :param tracing: a :class:`~kvresponder.tracing.Tracing` for peer-call spans, or ``None``.
    :param collect: gives freed memory back as the store turns over (:func:`kvresponder.reclaim.reclaimer`: a
        major collection on PyPy, in steps between requests; glibc's ``malloc_trim``); or ``None``.
    :param stream_endpoint: ``stream_endpoint(address, port)``, an ``IStreamClientEndpoint`` to a peer, for the
        copy streams (:mod:`kvresponder.copystream`); ``None`` sends every copy as an HTTP request.
    :param monotonic: a monotonic clock in seconds, to age the peers' clock samples and the store's tombstones;
        by default the clock's ``seconds``.
    :param end_of_turn: the :class:`~kvresponder.turn.EndOfTurn` the peer calls' batches leave from (the HTTP
        site's, so that one timer a turn serves both); by default one of the node's own.
    """

    def __init__(self, settings: Settings, clock, http, wall: Optional[Callable[[], float]] = None,
                 log_policy: Optional[LogPolicy] = None, tracing=None,
                 join_settle: Optional[float] = None, collect: Optional[Callable[[], object]] = None,
                 stream_endpoint=None, monotonic: Optional[Callable[[], float]] = None, end_of_turn=None) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.clock = clock
        self.wall = wall or clock.seconds
        self.incarnation = int(self.wall() * 1000) * 1000 + secrets.randbelow(1000)
        self.metrics = Metrics(settings.tenant)
        self.log_policy = log_policy or LogPolicy(settings.log_level)
        self.store = Store(self.wall, settings.max_memory, settings.tombstone_grace,
                           events=StoreEvents(self.metrics, self.log_policy, lambda: self.store.tombstone_count),
                           monotonic=monotonic or clock.seconds)
        self.hlc = HybridLogicalClock(self.wall, self.node_id, max_ahead=settings.max_clock_offset)
        self.membership = Membership(clock.seconds, self.node_id, settings.peer_timeout)
        #: The peers' clock offsets, and whether this node's own clock (or the versions it issues) is too far off
        #: to stamp writes.
        self.clock_offsets = ClockOffsets(monotonic or clock.seconds, settings.max_clock_offset,
                                          settings.peer_timeout, version_lead=self.hlc.lead)
        self.state = STARTING
        self._ring = HashRing([self.node_id], vnodes=settings.vnodes)
        self._owned_ratio = (None, 1.0)
        self.authenticator = None
        if settings.cluster_secret:
            self.authenticator = PeerAuthenticator(derive_key(settings.cluster_secret, "peer"), self.wall,
                                                   clock_allowance=2 * settings.max_clock_offset,
                                                   steady=clock.seconds)
        from .peers import PeerClient
        streams = None
        if stream_endpoint is not None and settings.replication_stream:
            streams = CopyStreams(clock, stream_endpoint, settings.tenant, self.authenticator, self.metrics,
                                  wall=self.wall)
        self.peers = PeerClient(http, clock, settings.tenant, settings.peer_request_timeout,
                                self.authenticator, self.metrics, tracing, self.log_policy, streams,
                                wall=self.wall, clock_offsets=self.clock_offsets, end_of_turn=end_of_turn,
                                max_header_bytes=settings.max_header_bytes)
        self.coordinator = Coordinator(self.store, self.hlc, self.ring, self.membership.peer, self.peers,
                                       settings.replicas, settings.write_quorum, self.wall, self.metrics,
                                       self.log_policy, self.ring_settling, clock_skew=self.clock_offsets,
                                       ring_changed_recently=self.ring_changed_recently,
                                       traced=tracing is not None and tracing.enabled, leaving=self.leaving_holders,
                                       previous_rings=self.previous_rings, takes_copies=self.takes_copies,
                                       unjoined=self.unjoined)
        self.rebalancer = Rebalancer(self.node_id, self.store, self.ring, self.membership.peer, self.peers,
                                     clock, settings.replicas, self.metrics, wall=self.wall)
        self.admin = AdminGuard(settings.admin_token, settings.insecure_admin)
        self.join_settle = join_settle if join_settle is not None else min(0.5, settings.heartbeat_interval)
        self.started_at = self.ring_changed_at = clock.seconds()
        #: When the ring's members last changed (``_rebuild_ring``), unlike ``ring_changed_at`` not moved by
        #: the join's end: a peer's claim counts if first heard after it.
        self._members_changed_at = self.ring_changed_at
        #: The rings in force since the ring last settled, oldest first: where data may still sit.
        self._previous_rings: List[HashRing] = []
        #: The digest of the ring under which this node has handed off all that ring places elsewhere, by a
        #: pass that began once every peer named it (see :meth:`_watch_settling`); said in heartbeats.
        self._handed_off: Optional[str] = None
        #: Whether this node's drain has ended: leaving, it takes no copies, so a store the drain left empty stays
        #: empty, and its heartbeats then say it has handed off under whatever ring it is on (:meth:`heartbeat`).
        self._drained = False
        #: The ring every peer was last seen to name, and since when (``None``: not every peer names it).
        self._converged: Optional[Tuple[str, float]] = None
        #: The digest of the ring a settling pass is running for.
        self._settle_pass_for: Optional[str] = None
        #: The ``ring_changed_at`` of the ring change after which the ring was found settled early: it stays
        #: settled until the next change (writes no longer ask the previous owners, which it has forgotten).
        self._settled_change: Optional[float] = None
        self._settled_listeners: List[Callable[[], None]] = []
        self._joining_ring: tuple = (None, [])
        #: Whether the join's wait for every peer to name this node's ring is over.
        self._join_waited = False
        self._loops = []
        #: The next turn's sweep, while expired entries are queued (see ``_sweep``).
        self._sweeping = None
        self._collect = collect
        self._released_at_collect = 0
        self._held_at_collect = 0
        self._changes_seen = 0
        self._changed_at = clock.seconds()
        #: The incarnations of the peers this node timed out, by id (at most :data:`MAX_TIMED_OUT`): heard again,
        #: such a peer was cut off from this node, not restarted, and its side likely dropped this node too.
        self._timed_out: Dict[str, int] = {}
        #: The peers among those that came back lately, by when (see :meth:`_membership_changed`).
        self._returned: Dict[str, float] = {}
        self.membership.subscribe(self._membership_changed)
        self.membership.subscribe_rings(self._peer_named_ring)
        self.metrics.register_live_gauges(self.gauges)
        self.metrics.register_clock(self.clock_offsets)

    # -- the ring -------------------------------------------------------------------------------------

    def ring(self) -> HashRing:
        return self._ring

    def ring_settling(self) -> bool:
        """
        Whether data may still be on its way to the owners the ring names: this node still holds entries
        waiting for hand-off; or the ring changed within the last :data:`SETTLE_SECONDS` (or twice
        ``MAX_CLOCK_OFFSET``, if longer), unless at least twice ``MAX_CLOCK_OFFSET`` has passed and every node
        has said since that it has handed off under this ring (:meth:`_cluster_handed_off`).

        A write the previous owners alone hold may carry a version up to twice the bound ahead of the time it was
        made (a clock ahead by the bound, and versions adopted from it): until that time has passed, or the write
        has reached the current owners (who then answer it), a later write must still ask the previous owners
        (``previous_rings``) to be stamped above it. That costs every write a round trip to them while the ring
        settles: ending the settling once every hand-off is done, rather than at a fixed time, shortens that
        after every membership change.
        """
        return self.rebalancer.pending > 0 or self.ring_changed_recently()

    def ring_changed_recently(self) -> bool:
        """
        :meth:`ring_settling` without this node's own entries waiting for hand-off (hints for an unreachable
        owner, which can wait for many minutes): whether the ring's latest change may still leave a key's owners
        without what its previous owners hold. Reads ask the previous owners while it does.
        """
        changed_at = self.ring_changed_at
        if self._settled_change == changed_at:
            return False
        bound = 2 * self.settings.max_clock_offset
        elapsed = self.clock.seconds() - changed_at
        if elapsed >= max(SETTLE_SECONDS, bound) or (elapsed >= bound and self._cluster_handed_off()):
            # Settled, for good: only a new change (a new ``ring_changed_at``) starts it again.
            self._settled_change = changed_at
            return False
        return True

    def _cluster_handed_off(self) -> bool:
        """
        Whether this node and every peer it knows (leaving ones too) have handed off under this node's ring: each
        peer began to say so (``settled``, the ring's digest) after this node's ring's members last changed (not
        after its join ended, which moves ``ring_changed_at``: peers that handed off while it joined count). A
        peer's claim from before does not count: this node's ring went elsewhere and came back (a peer it stopped
        hearing for a while), and its writes meanwhile went to owners of the other ring, which the peers' claims
        predate. A claim made after this change was made once every node named the ring, this one included. A
        peer older than the field never says so: the ring then settles after :data:`SETTLE_SECONDS`, as it did.
        """
        digest = self._ring.digest
        if self._handed_off != digest:
            return False
        changed_at = self._members_changed_at
        # A leaving peer says so only while its drain has left it empty (:meth:`heartbeat`): true whenever it
        # began to say so, so its claim counts even from before this change.
        return all(peer.settled == digest and (peer.settled_at > changed_at or peer.state == LEAVING)
                   for peer in self.membership.peers())

    def subscribe_settled(self, listener: Callable[[], None]) -> None:
        """
        Call ``listener()`` whenever this node has handed off under its ring: its heartbeats say so from then
        on, and the sooner its peers hear it the sooner their writes stop asking the previous owners (the
        service sends a heartbeat at once).
        """
        self._settled_listeners.append(listener)

    def _watch_settling(self) -> None:
        """
        Work toward a ready node's saying that it has handed off under its ring. Once every peer's heartbeat
        since the ring last changed names this node's ring, and no node is running a pass under a ring of other
        members (``moving``: such a pass may still hand entries to this node that its ring places elsewhere),
        and that has held for a margin (twice ``PEER_REQUEST_TIMEOUT``, for a client write's copy a peer sent under
        the ring before, to a node that owned the key then, to arrive: one held up longer lands after the pass,
        and the node's next pass hands it on), a pass runs;
        if it leaves nothing waiting for hand-off, and the ring is the same, the node has handed off under it.
        The pass that a ring change starts at once cannot serve: peers still on the previous ring may still be
        writing to the previous owners.
        """
        if self.state != READY:
            return
        ring = self._ring
        digest = ring.digest
        if self._handed_off == digest or self._settle_pass_for == digest:
            return
        now = self.clock.seconds()
        changed_at = self.ring_changed_at
        if self.rebalancer.moving_under(ring) or not all(
                peer.ring_digest == digest and peer.last_seen > changed_at and not peer.moving
                for peer in self.membership.peers()):
            self._converged = None
            return
        if len(ring) == 1 and not self.membership.peers():
            # Alone: the ring places every key here, so there is nothing to hand off, and no pass to walk the
            # store for (a walk copies every value out of it).
            self._settled(digest)
            return
        if self._converged is None or self._converged[0] != digest:
            self._converged = (digest, now)
            return
        if now - self._converged[1] < 2 * self.settings.peer_request_timeout:
            return
        self._settle_pass_for = digest
        self.rebalancer.run_pass(SETTLE_PASS).addCallback(self._settle_pass_done, digest, changed_at)

    def _settle_pass_done(self, counts: dict, digest: str, changed_at: float) -> None:
        if self._settle_pass_for == digest:
            self._settle_pass_for = None
        if (self.state != READY or self._ring.digest != digest or self.ring_changed_at != changed_at
                or counts.get("failed") or counts.get("pending") != 0 or self.rebalancer.pending):
            # The ring moved on, or something is left to hand off: the watch starts over.
            self._converged = None
            return
        self._settled(digest)

    def _settled(self, digest: str) -> None:
        self._handed_off = digest
        for listener in list(self._settled_listeners):
            try:
                listener()
            except Exception:
                write_traceback()

    def previous_rings(self) -> List[HashRing]:
        """
        While the ring settles, the rings in force since it last settled, before the current one: the last
        settled ring first. Their owners may still hold what the current owners have not yet been handed.
        Empty once it has settled.
        """
        if self._previous_rings and not self.ring_settling():
            self._previous_rings = []
        if self.state == JOINING:
            return self._rings_before_joining()
        return self._previous_rings

    def _ring_before_joining(self) -> List[HashRing]:
        """
        While this node joins, its peers' ring without it, as a list of at most one: the ring the peers name
        until they hear of this node.
        """
        return self._rings_before_joining()[:1]

    def _rings_before_joining(self) -> List[HashRing]:
        """
        While this node joins, the rings where the data it is about to be handed still sits: its peers' ring
        without it; and, when peers said in their heartbeats that they were joining too (an autoscaler adds pods
        in twos and threes), that ring without them too, as they were when this node's ring last changed.

        It keeps none of the rings it built while discovering them, but a write it coordinates meanwhile (kv
        requests are served while joining) must still hear of an earlier write to a key whose every owner its
        join replaced, or that write, stamped by a clock ahead, would win over this one once handed over. A node
        that joined with this one may be such an owner in the first ring and hold nothing yet: the earlier write
        is on the owners of the ring before both.
        """
        ring = self._ring
        cached_ring, before = self._joining_ring
        if cached_ring is not ring:
            others = ring.nodes - {self.node_id}
            before = []
            if others and len(others) < len(ring):
                before = [HashRing(others, vnodes=ring.vnodes, probes=ring.probes)]
                joined_with = {peer.node_id for peer in self.membership.peers()
                               if peer.joining and peer.node_id in others}
                if joined_with and len(joined_with) < len(others):
                    before.append(HashRing(others - joined_with, vnodes=ring.vnodes, probes=ring.probes))
            self._joining_ring = (ring, before)
        return before

    def leaving_holders(self) -> List[str]:
        """
        The nodes out of the ring that may still hold data they have not handed off: peers that announced
        they are leaving, and this node while it drains.
        """
        holders = [peer.node_id for peer in self.membership.peers() if peer.state == LEAVING]
        if self.state == DRAINING:
            holders.append(self.node_id)
        return holders

    def _rebuild_ring(self) -> None:
        include_self = self.state not in (DRAINING, STOPPED)
        ring = HashRing(self.membership.ring_members(include_self=include_self), vnodes=self.settings.vnodes)
        if ring.nodes != self._ring.nodes and self.state in (READY, DRAINING):
            # Not while joining: the rings a node builds as it discovers its peers placed no data.
            self._remember(self._ring)
        self.ring_changed_at = self._members_changed_at = self.clock.seconds()
        self._ring.forget_places()
        self._ring = ring
        # Even a ring of the same members again (a peer gone and back) needs another pass: the writes meanwhile
        # followed the other ring.
        self._handed_off = None
        self._converged = None

    def _remember(self, ring: HashRing) -> None:
        """
        Keep ``ring``, which the current one replaces, among :meth:`previous_rings`.
        """
        rings = self._previous_rings if self.ring_settling() else []
        if len(rings) >= MAX_PREVIOUS_RINGS:
            # The first is the ring in force when the ring last settled, where most data sits; after it, the
            # latest, which name the owners a rolling restart displaced last.
            del rings[1]
        rings.append(ring)
        self._previous_rings = rings

    def _left_out(self, members) -> None:
        """
        Other nodes have written, or write, under a ring of ``members`` without this node, while this node's ring
        held it: a partition, a stall, heartbeats lost one way. That ring's owners may hold writes this node's
        owners do not: it is kept among the previous rings, and the ring counts as changed now, so that reads and
        writes this node coordinates ask them (as a node that joins asks its peers' ring without it) until it
        settles.
        """
        if self.state != READY or not members or self.node_id in members:
            return
        ring = HashRing(members, vnodes=self._ring.vnodes, probes=self._ring.probes)
        if not self.ring_settling():
            # Kept from a change that has settled since: forgotten before this one is remembered.
            self._previous_rings = []
        if all(before.digest != ring.digest for before in self._previous_rings):
            self._remember(ring)
        self.ring_changed_at = self._members_changed_at = self.clock.seconds()
        self._handed_off = None
        self._converged = None

    def _peer_named_ring(self, peer, before: Optional[str]) -> None:
        """
        A peer's heartbeats name another ring: if it, or the one before, is this node's ring without this node,
        the peer wrote under a ring that left this node out (it stopped hearing it), or does now.
        """
        if self.state != READY or peer.joining:
            # A joining peer that has not heard this node yet names such a ring too: it holds nothing of it.
            return
        others = self._ring.nodes - {self.node_id}
        if others and len(others) < len(self._ring) and members_digest(others) in (peer.ring_digest, before):
            # Its ring is this node's without it: every other node, as far as this node knows.
            self._left_out(others)

    def _membership_changed(self, change: str, peer) -> None:
        with PEER_CHANGED(peer=peer.node_id, change=change, address="%s:%d" % (peer.address, peer.port),
                          incarnation=peer.incarnation):
            if change == GONE:
                # Out of the ring already (``left``): nothing moves, and nothing is kept about it. The ring is
                # not built again either: it would count as changed, and this node as unsettled until its next
                # pass, which nothing would start.
                self.peers.suspects.answered(peer)
                self.clock_offsets.forget(peer.node_id)
                return
            self._rebuild_ring()
            if change == DEAD:
                if len(self._timed_out) >= MAX_TIMED_OUT:
                    del self._timed_out[next(iter(self._timed_out))]
                self._timed_out[peer.node_id] = peer.incarnation
            elif change == JOINED and self._timed_out.pop(peer.node_id, None) == peer.incarnation:
                # Back after this node timed it out, as the same incarnation: cut off, not restarted. It wrote,
                # with the others this node timed out that are back by now, under a ring of theirs: this node
                # cannot hear which it was, but it held those that came back.
                now = self.clock.seconds()
                self._returned = {node: at for node, at in self._returned.items()
                                  if now - at < SETTLE_SECONDS and self.membership.peer(node) is not None}
                self._returned[peer.node_id] = now
                self._left_out(set(self._returned))
            elif change == JOINED:
                self._peer_named_ring(peer, None)
            if change in (JOINED, RESTARTED, MOVED):
                # A new incarnation, or one at a new address: whatever made a suspect of the old one is past.
                self.peers.suspects.answered(peer)
            if self.state in (JOINING, READY):
                self.rebalancer.trigger(change)

    def heartbeat(self) -> Heartbeat:
        """
        What this node says about itself in discovery datagrams.
        """
        state = LEAVING if self.state in (DRAINING, STOPPED) else ALIVE
        digest = self._ring.digest
        if self.state == READY:
            settled = digest if self._handed_off == digest else None
        else:
            # A drained node holds nothing to hand off under any ring: said, its peers' rings settle without
            # waiting for it to time out once it has gone (PEER_TIMEOUT).
            settled = digest if self._drained and self._store_empty() else None
        return Heartbeat(self.node_id, self.incarnation, self.settings.advertise_address,
                         self.settings.advertise_port, state, len(self._ring), digest,
                         self.state in (STARTING, JOINING), settled, self.rebalancer.moving_under(self._ring))

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """
        Start the timers and join: wait briefly for the peers' answers to our first announce, then ask every
        peer to hand over our share, then report ready.
        """
        self.state = JOINING
        # From now, not from when the node was built: the time in between (the process's start, its imports, a
        # loaded machine) heard no heartbeat, and would shorten the interval a node that hears no peer waits
        # before it takes itself for the first of its cluster (``_heard_whole_cluster``).
        self.started_at = self.ring_changed_at = self.clock.seconds()
        clustering = self.settings.clustering
        if clustering == "insecure":
            INSECURE.log(reason="--insecure-cluster without CLUSTER_SECRET: anyone who can reach this node's "
                                "ports can join its cluster and call its internal routes")
        elif clustering == "disabled":
            CLUSTER_DISABLED.log(reason="CLUSTER_SECRET is not set: this node serves alone, ignores heartbeats "
                                        "and refuses peer calls; set CLUSTER_SECRET (the same on every node) to "
                                        "cluster, or --insecure-cluster on a trusted network")
        if self.admin.mode == "insecure":
            INSECURE.log(reason="--insecure-admin: admin writes need no token")
        self._every(1.0, self._sweep)
        # Peers that fall silent leave the clock estimate, and with them perhaps this node's skew.
        self._every(1.0, self.clock_offsets.evaluate)
        self._every(1.0, self.coordinator.log_clock_rejected)
        self._every(SETTLE_WATCH, self._watch_settling)
        if self._collect is not None:
            self._every(0.25, self._reclaim)
        self._every(self.settings.anti_entropy_interval, lambda: self.rebalancer.run_pass(ANTI_ENTROPY),
                    now=False)
        ensureDeferred(self._join()).addErrback(write_failure)

    def _sweep(self) -> None:
        """
        Reclaim expired entries and old tombstones, :data:`SWEEP_CHUNK` at a time, in turns of their own until
        none is due: many keys given one TTL expire together.
        """
        if self._sweeping is not None and self._sweeping.active():
            return
        self._sweeping = None
        try:
            self.store.sweep(SWEEP_CHUNK)
        except Exception:
            # As ``_every`` guards the timer's own calls: logged, and the next second's sweep tries again.
            write_traceback()
            return
        if self.store.sweep_behind and self.state != STOPPED:
            self._sweeping = self.clock.callLater(0, self._sweep)

    def _reclaim(self) -> None:
        """
        On PyPy, run a major collection (in steps, between requests) once a good share of the budget has
        been dropped, or once the store has grown by a quarter since the last collection. PyPy keeps large
        byte strings outside its collected heap and does not count them towards its next major collection, so a cache
        that keeps replacing its values would otherwise grow without bound, and a store being filled would carry
        the garbage of every request that filled it (bench/results/HISTORY.md has the measurements). Also once
        the store has been left alone for IDLE_RECLAIM_SECONDS after taking in and dropping an eighth of what
        it holds: a burst of writes or deletes leaves its garbage behind until then. Then, on both
        interpreters, the C heap's free pages go back to the OS (:mod:`kvresponder.reclaim`).
        """
        store = self.store
        released = store.released_bytes
        held = store.bytes
        now = self.clock.seconds()
        if store.changes != self._changes_seen:
            self._changes_seen = store.changes
            self._changed_at = now
        dropped = released - self._released_at_collect
        # What the store took in since the last time (the growth of what it holds plus what it dropped) and
        # what it dropped: both leave garbage behind.
        turned_over = held - self._held_at_collect + 2 * dropped
        if (dropped >= max(store.max_bytes // 2, 4 * 1024 * 1024)
                or held - self._held_at_collect >= max(self._held_at_collect // 4, 16 * 1024 * 1024)
                or (now - self._changed_at >= IDLE_RECLAIM_SECONDS
                    and turned_over >= max(held // 8, 4 * 1024 * 1024))):
            # A reclaim still under way answers False: the baselines stay, so this one is asked for again.
            if self._collect() is not False:
                self._released_at_collect = released
                self._held_at_collect = held

    def _every(self, interval: float, function, now: bool = True) -> None:
        def safely():
            try:
                function()
            except Exception:
                write_traceback()
        loop = LoopingCall(safely)
        loop.clock = self.clock
        loop.start(interval, now=now)
        self._loops.append(loop)

    async def _join(self) -> None:
        await deferLater(self.clock, self.join_settle, lambda: None)
        # A heartbeat lost (UDP) leaves a peer unheard until its next one: wait for it a while, not forever (a
        # peer whose ring never matches, say one that refuses this node's clock, must not keep it joining).
        deadline = self.clock.seconds() + JOIN_WAIT_INTERVALS * self.settings.heartbeat_interval
        clusters = self.settings.clustering != "disabled"
        # And for every peer to count this node in its ring: a peer that has not heard it (its heartbeats lost)
        # would answer the request for its share below with a pass over a ring without it, which hands it nothing.
        while clusters and not self._counted_by_whole_cluster() and self.clock.seconds() < deadline:
            await deferLater(self.clock, JOIN_POLL, lambda: None)
        if clusters and not self._counted_by_whole_cluster():
            JOIN_VIEW_UNMATCHED.log(peers=sorted(set(self._unmatched_peers()) | set(self._peers_without_me())),
                                    ring=sorted(self._ring.nodes))
        # From here on, kv requests are served whatever the peers' rings say (see ``unjoined``).
        self._join_waited = True
        if self.state != JOINING:
            # Told to stop meanwhile (SIGTERM while starting): each peer would walk its whole store for a share
            # this node then refuses to take, as a leaving node does.
            return
        peers = self.membership.alive_peers()
        timeout = max(10.0, self.settings.drain_timeout)

        async def ask(peer):
            try:
                await self.peers.request_sync(peer, self.node_id, timeout)
            except PeerError:
                pass

        await gather([ask(peer) for peer in peers])
        if self.state == JOINING:
            # The peers' ring stays among the previous rings while the ring settles: a peer whose hand-off did
            # not reach this node (it failed, or the node never heard it) still holds its keys' earlier writes.
            self._previous_rings = list(self._rings_before_joining())
            # Settling from now: a long sync must not leave the previous rings expired the moment it ends.
            self.ring_changed_at = self.clock.seconds()
            self.state = READY

    def unjoined(self) -> bool:
        """
        Whether this node is starting and has not yet heard its whole cluster while it may cluster: with no peer
        heard its ring holds only itself, and it must not act as a cluster of one (see
        ``Coordinator._check_clock``); with some heard, one of them names a ring this node's does not match.
        A node that serves alone by configuration (no CLUSTER_SECRET) is never unjoined; the first node of a
        cluster is, until its join ends (a heartbeat interval: see ``_heard_whole_cluster``).
        """
        if self.state != JOINING or self.settings.clustering == "disabled":
            return False
        return len(self._ring) == 1 or not (self._join_waited or self._heard_whole_cluster())

    def _heard_whole_cluster(self) -> bool:
        """
        Whether every peer heard names the ring this node has, with or without this node in it. The answers to a
        joining node's first heartbeat come one by one: having heard one peer of three, its ring holds two nodes,
        and its peers' ring without it (:meth:`previous_rings`) would miss where a key's earlier write sits.
        """
        if self.clock.seconds() - self.started_at < self.settings.heartbeat_interval:
            # Every peer sends a heartbeat within an interval. Until one has passed, a node that heard none
            # cannot tell it is the first, nor can one that heard an older node, which names its ring by size
            # alone (a peer that has not heard this node yet counts one fewer, as a ring missing a peer would).
            if len(self._ring) == 1 or any(peer.ring_digest is None for peer in self.membership.alive_peers()):
                return False
        return not any(True for _ in self._unmatched_peers())

    def _counted_by_whole_cluster(self) -> bool:
        """
        :meth:`_heard_whole_cluster`, and every peer heard names the ring with this node in it.
        """
        return self._heard_whole_cluster() and not any(True for _ in self._peers_without_me())

    def _peers_without_me(self):
        """
        The alive peers whose heartbeats name a ring other than this node's own, this node included.
        """
        return self._peers_naming_other_rings({self._ring.digest}, lambda size: size < len(self._ring))

    def _unmatched_peers(self):
        """
        The alive peers whose heartbeats name a ring other than this node's, with or without it.
        """
        accepted = {self._ring.digest}
        accepted.update(before.digest for before in self._ring_before_joining())
        return self._peers_naming_other_rings(accepted, lambda size: size > len(self._ring))

    def _peers_naming_other_rings(self, accepted, size_differs):
        """
        The alive peers whose heartbeats name a ring (``members``) not in ``accepted``. An older node says only
        how many its ring holds: a mixed cluster (a rolling upgrade) is checked by size alone, by
        ``size_differs``.
        """
        for peer in self.membership.peers():
            if peer.state != ALIVE:
                continue
            if peer.ring_digest is None:
                if size_differs(peer.ring_size):
                    yield peer.node_id
            elif peer.ring_digest not in accepted:
                yield peer.node_id

    def takes_copies(self) -> bool:
        """
        Whether this node stores the entries its peers send it: a write's copy, a hand-off, a repair. Not from
        the moment it begins leaving. Its drain ends once its store is empty, and the process exits soon after,
        so a copy stored after that was acknowledged to its sender and then lost with the process. A copy stored
        during the drain would count towards a write's quorum on a node that holds it only until it can pass it
        on (within ``DRAIN_TIMEOUT``, if the owner answers), and would keep the drain going. Peers that have not
        yet heard this node's "leaving" heartbeat (it is in flight, or lost: UDP) still send it copies; refused,
        each fails over at once to the next node on the sender's ring, which stays.
        """
        return self.state not in (DRAINING, STOPPED)

    def begin_leaving(self) -> None:
        """
        Stop owning data: readiness fails, heartbeats say "leaving", the ring no longer counts this node, and
        peers' copies are refused (:meth:`takes_copies`).
        """
        if self.state in (DRAINING, STOPPED):
            return
        self.state = DRAINING
        self._rebuild_ring()

    def drain(self):
        """
        Leave, and hand every entry to its new owners within DRAIN_TIMEOUT.

        :return: a Deferred firing with the number of entries left behind.
        """
        self.begin_leaving()
        timeout = self.settings.drain_timeout
        d = self.rebalancer.drain(timeout)
        d.addTimeout(timeout + DRAIN_GUARD_SECONDS, self.clock)
        d.addErrback(lambda failure: len(self.store) + self.store.tombstone_count)
        d.addCallback(self._drain_ended)
        return d

    def _drain_ended(self, remaining: int) -> int:
        self._drained = True
        return remaining

    def _store_empty(self) -> bool:
        return len(self.store) == 0 and self.store.tombstone_count == 0

    def stop(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._sweeping is not None and self._sweeping.active():
            self._sweeping.cancel()
        self._sweeping = None
        self.rebalancer.stop()
        self.state = STOPPED

    # -- what users see -------------------------------------------------------------------------------

    def serving(self) -> bool:
        return self.state != STOPPED

    def owned_ratio(self) -> float:
        ring = self._ring
        cached_ring, ratio = self._owned_ratio
        if cached_ring is not ring:
            ratio = ring.primary_share(self.node_id)
            self._owned_ratio = (ring, ratio)
        return ratio

    def gauges(self) -> dict:
        # Reclaim what expired since the last sweep, so kv_store_keys does not count expired entries (but for
        # those still queued when many expire together: see ``_sweep``).
        self._sweep()
        return {
            "kv_store_keys": len(self.store),
            "kv_store_bytes": self.store.bytes,
            "kv_store_max_bytes": self.store.max_bytes,
            "kv_store_tombstones": self.store.tombstone_count,
            "kv_peers_count": len(self.membership.alive_peers()),
            "kv_ring_members": len(self._ring),
            "kv_replication_factor": self.settings.replicas,
            "kv_handoff_pending": self.rebalancer.pending,
            "kv_ring_owned_ratio": self.owned_ratio(),
        }

    def readiness(self) -> str:
        """
        What readiness reports: the lifecycle state, or ``clock-skew`` while a joining or ready node's clock is
        too far from its peers', or its versions from its clock (it coordinates no write then, so no client should
        be sent to it).
        """
        if self.state in (JOINING, READY) and (self.clock_offsets.skewed or self.clock_offsets.leading):
            return CLOCK_SKEW
        return self.state

    def health(self) -> dict:
        state = self.readiness()
        return {
            "status": "ok" if self.state in (JOINING, READY) else self.state,
            "state": state,
            "ready": state == READY,
            "tenant": self.settings.tenant,
            "node": self.node_id,
            "incarnation": self.incarnation,
            "uptime_s": round(self.clock.seconds() - self.started_at, 3),
            "keys": len(self.store),
            "peers": len(self.membership.alive_peers()),
            "ring_size": len(self._ring),
            "replicas": self.settings.replicas,
            "pending_handoffs": self.rebalancer.pending,
            "clock_skew_s": round(self.clock_offsets.skew, 6),
            "clock_version_lead_s": round(self.clock_offsets.lead, 6),
        }

    def diag(self) -> dict:
        import twisted
        security = []
        if self.settings.clustering == "insecure":
            security.append("--insecure-cluster without CLUSTER_SECRET: discovery and peer calls are not "
                            "authenticated.")
        if self.admin.mode == "insecure":
            security.append("--insecure-admin: admin writes need no token.")
        return {
            "version": __version__,
            "python": {"implementation": platform.python_implementation(),
                       "version": platform.python_version()},
            "twisted": twisted.__version__,
            "reactor": "%s.%s" % (type(self.clock).__module__, type(self.clock).__name__),
            "node": self.node_id,
            "incarnation": self.incarnation,
            "state": self.readiness(),
            "uptime_s": round(self.clock.seconds() - self.started_at, 3),
            "clock": self.clock_offsets.as_json(),
            "config": self.settings.redacted(),
            # What ``config`` leaves to the node (a null WRITE_QUORUM, LISTEN_ADDRESS): what it does now.
            "effective": {"listen": self.settings.listen_endpoint, "write_quorum": self.coordinator.quorum()},
            # The levels in force: ``config`` has the LOG_LEVEL the node started with, which the admin route changes.
            "log_levels": self.log_policy.levels(),
            "admin": self.admin.mode,
            "cluster_authenticated": self.authenticator is not None,
            "cluster": self.settings.clustering,
            "security_warnings": security,
            "store": {"keys": len(self.store), "bytes": self.store.bytes, "max_bytes": self.store.max_bytes,
                      "tombstones": self.store.tombstone_count, "evictions": self.store.evictions,
                      "tombstone_evictions": self.store.tombstone_evictions,
                      "expirations": self.store.expirations},
            "ring": {"members": sorted(self._ring.nodes), "vnodes": self._ring.vnodes,
                     "owned_ratio": round(self.owned_ratio(), 4)},
            "rebalance": {"passes": self.rebalancer.passes, "pending": self.rebalancer.pending,
                          "settling": self.ring_settling()},
            "open_connections": self.metrics.gauge("kv_open_connections"),
            "process": {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()},
        }


