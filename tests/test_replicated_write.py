"""
The coordinator's replicated write (``_ReplicatedWrite``) against peers whose answers the test controls: a copy
that is refused at once, one that fails before it returns, one that fails later, one that breaks in an
unexpected way. Each write answers exactly once, with the copies it really has, and its result is delivered
outside its own Eliot context.
"""

import unittest
from collections import namedtuple
from contextvars import ContextVar
from typing import Optional

from eliot import current_action, start_action
from eliot.testing import LoggedAction, LoggedMessage, capture_logging
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from kvresponder.batcher import Waiter
from kvresponder.coordinator import Coordinator, Unavailable, WriteResult
from kvresponder.hlc import HybridLogicalClock
from kvresponder.log import LogPolicy
from kvresponder.log.replication import COORDINATE_WRITE, COPY_FAILED, HINTED
from kvresponder.metrics import Metrics
from kvresponder.peers import PeerError
from kvresponder.ring import HashRing
from kvresponder.store import ApplyResult, Entry, Store

Peer = namedtuple("Peer", "node_id address port")
RING = HashRing(["n1", "n2", "n3"])
#: Something the caller's context holds, as a span would.
MARK: ContextVar = ContextVar("mark")


def key_owned_by(first: str, second: str) -> str:
    return next(key for key in ("k%d" % i for i in range(10000))
                if RING.preference_list(key, 3)[:2] == [first, second])


class _Peers:
    """
    ``apply_coalesced`` (and ``send_copy`` through it) answering per node: a value, an exception to raise at
    once, or a Deferred to return.
    """

    def __init__(self, answers) -> None:
        self.answers = answers
        self.calls = []
        self.task_ids = []

    def apply_coalesced(self, peer, entry, task_id=None):
        self.calls.append(peer.node_id)
        self.task_ids.append(task_id)
        answer = self.answers[peer.node_id]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, Deferred):
            return answer
        return succeed(answer)

    def send_copy(self, peer, entry, waiter, task_id=None):
        # As PeerClient.send_copy: the answer settles the write's waiter for this copy.
        self.apply_coalesced(peer, entry, task_id).addCallbacks(waiter.callback, waiter.errback)


def coordinator(answers, peer_of=None, level: str = "info", peers=None, metrics=None,
                traced: bool = False, ring: HashRing = RING, store: Store = None, settling: bool = False,
                leaving=(), previous_rings=(), changed: Optional[bool] = None,
                write_quorum: Optional[int] = None) -> Coordinator:
    clock = Clock()
    clock.advance(1000)
    store = store if store is not None else Store(clock.seconds, 1 << 24)
    return Coordinator(store, HybridLogicalClock(clock.seconds, "n1"), lambda: ring,
                       peer_of or (lambda node: Peer(node, "10.0.0.%s" % node[1:], 3000)), peers or _Peers(answers),
                       replicas=2, write_quorum=write_quorum, seconds=clock.seconds, metrics=metrics or Metrics("t"),
                       log_policy=LogPolicy(level), traced=traced, ring_settling=lambda: settling,
                       ring_changed_recently=None if changed is None else (lambda: changed),
                       leaving=lambda: list(leaving), previous_rings=lambda: list(previous_rings))


def outcome(d: Deferred):
    results = []
    d.addBoth(results.append)
    assert len(results) == 1, "the write has not answered"
    return results[0]


class ReplicatedWriteTests(unittest.TestCase):

    @capture_logging(None, encoder_=None)
    def test_a_copy_refused_at_once_fails_over_to_the_next_node(self, logger):
        key = key_owned_by("n2", "n3")
        c = coordinator({"n2": PeerError("n2 unreachable for apply: ConnectionRefusedError"),
                         "n3": ApplyResult(True, False)})
        result = outcome(c.put(key, b'"v"', None))
        self.assertIsInstance(result, WriteResult)
        self.assertEqual(result.copies, 2)
        self.assertEqual(c.store.get(key).value, b'"v"')
        [failed] = LoggedMessage.ofType(logger.messages, COPY_FAILED)
        self.assertEqual(failed.message["peer"], "n2")
        [hinted] = LoggedMessage.ofType(logger.messages, HINTED)
        self.assertEqual((hinted.message["owner"], hinted.message["holder"]), ("n2", "n1"))

    @capture_logging(None, encoder_=None)
    def test_a_copy_that_failed_before_returning_fails_over_to_the_next_node(self, logger):
        key = key_owned_by("n2", "n3")
        c = coordinator({"n2": fail(PeerError("n2 answered 503 to apply", 503)), "n3": ApplyResult(True, False)})
        result = outcome(c.put(key, b'"v"', None))
        self.assertEqual(result.copies, 2)
        self.assertEqual(c.store.get(key).value, b'"v"')

    @capture_logging(None, encoder_=None)
    def test_an_unexpected_failure_counts_as_a_missing_copy_and_the_write_still_answers(self, logger):
        key = key_owned_by("n2", "n3")
        c = coordinator({"n2": fail(RuntimeError("a bug")), "n3": ApplyResult(True, False)})
        result = outcome(c.put(key, b'"v"', None))
        self.assertTrue(result.check(Unavailable))
        self.assertIn("only 1 of the 2", str(result.value))
        self.assertEqual(len(logger.flushTracebacks(RuntimeError)), 1)
        # No failover for a failure that says nothing about the peer: the next node was not written.
        self.assertIsNone(c.store.get(key))

    @capture_logging(None, encoder_=None)
    def test_a_copy_whose_settling_breaks_does_not_stop_its_batch_from_settling_the_others(self, logger):
        """
        If settling one copy of a batch breaks unexpectedly, then the error is logged where it happened and
        the batch goes on to settle the other copies: another write carried by the same batch still answers.
        """
        class Held(_Peers):
            def send_copy(self, peer, entry, waiter, task_id=None):
                self.calls.append((entry.key, waiter))

        class Breaking(Metrics):
            break_next = False

            def replication(self, op, result, count=1):
                if self.break_next:
                    self.break_next = False
                    raise RuntimeError("a bug while counting")
                Metrics.replication(self, op, result, count)

        peers, metrics = Held({}), Breaking("t")
        c = coordinator({}, peers=peers, metrics=metrics)
        first, second = key_owned_by("n1", "n2"), next(
            key for key in ("j%d" % i for i in range(10000)) if RING.preference_list(key, 3)[:2] == ["n1", "n2"])
        writes = [c.put(first, b'"a"', None), c.put(second, b'"b"', None)]
        metrics.break_next = True
        for key, waiter in peers.calls:  # as the batch settles its items, in order
            waiter.callback(ApplyResult(True, False))
        self.assertEqual(len(logger.flushTracebacks(RuntimeError)), 1)
        self.assertIsInstance(outcome(writes[1]), WriteResult)

    @capture_logging(None, encoder_=None)
    def test_a_copy_its_batch_fails_with_an_exception_fails_over_to_the_next_node(self, logger):
        """
        If the batch carrying a copy fails it with a plain exception (as the batcher does, rather than a
        Failure), then the copy fails over to the next node and the write still stores its two copies.
        """
        class Held(_Peers):
            def send_copy(self, peer, entry, waiter, task_id=None):
                self.calls.append((peer.node_id, waiter))

        peers = Held({})
        key = key_owned_by("n1", "n2")
        d = coordinator({}, peers=peers).put(key, b'"v"', None)
        [(node, waiter)] = peers.calls
        self.assertEqual(node, "n2")
        waiter.errback(PeerError("n2 unreachable for apply: ConnectionRefusedError"))
        self.assertEqual([node for node, _ in peers.calls], ["n2", "n3"])
        peers.calls[1][1].callback(ApplyResult(True, False))
        self.assertEqual(outcome(d).copies, 2)
        [failed] = LoggedMessage.ofType(logger.messages, COPY_FAILED)
        self.assertEqual(failed.message["peer"], "n2")

    @capture_logging(None, encoder_=None)
    def test_a_membership_lookup_that_breaks_counts_as_a_missing_copy(self, logger):
        key = key_owned_by("n2", "n3")

        def peer_of(node):
            if node == "n2":
                raise KeyError(node)
            return Peer(node, "10.0.0.3", 3000)

        c = coordinator({"n3": ApplyResult(True, False)}, peer_of=peer_of)
        result = outcome(c.put(key, b'"v"', None))
        self.assertTrue(result.check(Unavailable))
        self.assertEqual(len(logger.flushTracebacks(KeyError)), 1)

    @capture_logging(None, encoder_=None)
    def test_the_result_is_delivered_outside_the_writes_own_context(self, logger):
        key = key_owned_by("n2", "n3")
        later = Deferred()
        c = coordinator({"n2": later, "n3": ApplyResult(True, False)}, level="debug")
        seen = []
        d = c.put(key, b'"v"', None)
        d.addCallback(lambda result: seen.append((result.copies, current_action())))
        self.assertEqual(seen, [])
        # The copy fails from outside any action (as a peer's answer arrives); the failover to n1 finishes
        # the write inside the write's context, but the caller hears of it only outside.
        later.errback(PeerError("n2 unreachable for apply: TimeoutError"))
        self.assertEqual(seen, [(2, None)])
        [write] = LoggedAction.ofType(logger.messages, COORDINATE_WRITE)
        inside = list(write.descendants())
        for message in LoggedMessage.ofType(logger.messages, COPY_FAILED) + LoggedMessage.ofType(
                logger.messages, HINTED):
            self.assertIn(message, inside)

    @capture_logging(None, encoder_=None)
    def test_a_write_stamped_again_at_once_is_delivered_outside_the_writes_own_context(self, logger):
        """
        If a replica's later answer reports a newer version and the write, stamped again, is then stored at
        once, then the caller hears of it outside the write's context (neither the caller's context variables
        nor an action), as a write that is not stamped again is.
        """
        class Newer(_Peers):
            def apply_coalesced(self, peer, entry, task_id=None):
                self.calls.append(entry.version)
                if len(self.calls) == 1:
                    self.later = Deferred()
                    return self.later
                return succeed(ApplyResult(True, True))

        class Watching:
            called = False

            def __init__(self):
                self.seen = []

            def callback(self, result):
                self.seen.append((result.copies, MARK.get(None), current_action()))

            def errback(self, error):
                self.seen.append(error)

        for level, traced in (("debug", False), ("info", True)):
            peers = Newer({})
            c = coordinator({}, peers=peers, level=level, traced=traced)
            waiter = Watching()
            with start_action(action_type="test:request"):
                token = MARK.set("the request's")
                try:
                    self.assertIsNone(c.put_to(key_owned_by("n1", "n2"), b'"v"', None, waiter))
                finally:
                    MARK.reset(token)
            self.assertEqual(waiter.seen, [])
            # The answer arrives from outside any context, naming a newer version: the write is stamped again
            # (in its own context) and stored at once.
            peers.later.callback(ApplyResult(False, True, (peers.calls[0][0] + 5000, 0, "n2")))
            self.assertEqual(len(peers.calls), 2)
            self.assertEqual(waiter.seen, [(2, None, None)], level)

    def failover_contexts(self, traced: bool):
        """
        A write started with ``MARK`` set and no Eliot action, whose first copy fails later from inside an
        unrelated action: what the failover's attempt sees of ``MARK`` and of the current action.
        """
        key = key_owned_by("n1", "n2")  # n2 fails over to n3, another node
        later = Deferred()
        seen = []

        class Watching(_Peers):
            def apply_coalesced(self, peer, entry, task_id=None):
                seen.append((peer.node_id, MARK.get(None), current_action()))
                return _Peers.apply_coalesced(self, peer, entry, task_id)

        c = coordinator({}, peers=Watching({"n2": later, "n3": ApplyResult(True, False)}), traced=traced)
        token = MARK.set("the request's")
        try:
            d = c.put(key, b'"v"', None)
        finally:
            MARK.reset(token)
        with start_action(action_type="test:unrelated"):
            later.errback(PeerError("n2 unreachable for apply: TimeoutError"))
        self.assertIsInstance(outcome(d), WriteResult)
        self.assertEqual([node for node, _, _ in seen], ["n2", "n3"])
        return seen[1][1:]

    @capture_logging(None, encoder_=None)
    def test_with_tracing_on_a_failover_runs_in_the_context_the_write_began_in(self, logger):
        """
        If tracing is on (the write's context may hold a span), then a later failover runs in a copy of the
        context the write began in, not in the one its copy's failure arrived in.
        """
        self.assertEqual(self.failover_contexts(traced=True), ("the request's", None))

    @capture_logging(None, encoder_=None)
    def test_with_no_action_and_tracing_off_a_failover_runs_in_an_empty_context(self, logger):
        """
        If a write begins in no Eliot action with tracing off, then its later failover runs in an empty
        context: not in the unrelated action its copy's failure arrived in (and no copy of the context is
        taken for the usual write, which holds nothing a failover needs).
        """
        self.assertEqual(self.failover_contexts(traced=False), (None, None))

    @capture_logging(None, encoder_=None)
    def test_at_info_a_later_failover_is_logged_in_the_callers_action_with_no_write_action(self, logger):
        key = key_owned_by("n2", "n3")
        later = Deferred()
        c = coordinator({"n2": later, "n3": ApplyResult(True, False)})
        seen = []
        with start_action(action_type="test:request"):
            d = c.put(key, b'"v"', None)
        d.addCallback(lambda result: seen.append((result.copies, current_action())))
        later.errback(PeerError("n2 unreachable for apply: TimeoutError"))
        self.assertEqual(seen, [(2, None)])
        self.assertEqual(LoggedAction.ofType(logger.messages, COORDINATE_WRITE), [])
        [request] = LoggedAction.ofType(logger.messages, "test:request")
        inside = list(request.descendants())
        failovers = LoggedMessage.ofType(logger.messages, COPY_FAILED) + LoggedMessage.ofType(logger.messages, HINTED)
        self.assertEqual(len(failovers), 2)
        for message in failovers:
            self.assertIn(message, inside)

    @capture_logging(None, encoder_=None)
    def test_at_info_a_failover_outside_any_action_is_logged_in_the_writes_own_task(self, logger):
        from kvresponder.log.store import STORE_APPLIED

        key = key_owned_by("n1", "n2")
        peers = _Peers({"n2": PeerError("n2 unreachable for apply: ConnectionRefusedError"),
                        "n3": ApplyResult(True, False)})
        result = outcome(coordinator({}, peers=peers).put(key, b'"v"', None))
        self.assertEqual(result.copies, 2)
        lines = [m for m in logger.messages if m.get("key") == key]
        self.assertEqual(sorted(m["message_type"] for m in lines), sorted([
            STORE_APPLIED.message_type, COPY_FAILED.message_type, HINTED.message_type]))
        self.assertEqual(len({m["task_uuid"] for m in lines}), 1)
        # Each line at a level of its own, from [2] (the refused copy to n2 took one too); the copy to n3 was
        # sent the level after the last line.
        levels = sorted(m["task_level"][0] for m in lines)
        self.assertEqual(len(set(levels)), 3)
        self.assertGreaterEqual(levels[0], 2)
        self.assertEqual(peers.task_ids[-1], b"%s@/%d" % (lines[0]["task_uuid"].encode(), levels[-1] + 1))

    @capture_logging(None, encoder_=None)
    def test_at_info_a_write_stamped_again_goes_on_in_its_own_task(self, logger):
        from kvresponder.log.store import STORE_APPLIED

        class Newer(_Peers):
            # The replica holds a newer version the first time, and takes the write stamped above it after.
            def apply_coalesced(self, peer, entry, task_id=None):
                self.task_ids.append(task_id)
                if len(self.task_ids) == 1:
                    self.newer = (entry.version[0] + 5000, 0, "n2")
                    return succeed(ApplyResult(False, True, self.newer))
                return succeed(ApplyResult(True, True))

        peers = Newer({})
        key = key_owned_by("n1", "n2")
        result = outcome(coordinator({}, peers=peers).put(key, b'"v"', None))
        self.assertEqual(len(peers.task_ids), 2)
        lines = [m.message for m in LoggedMessage.ofType(logger.messages, STORE_APPLIED)]
        self.assertEqual(len(lines), 2)
        [task] = {line["task_uuid"] for line in lines}
        self.assertTrue(all(task_id.startswith(task.encode() + b"@/") for task_id in peers.task_ids))
        levels = [line["task_level"] for line in lines] + [[int(t.rsplit(b"/", 1)[1])] for t in peers.task_ids]
        self.assertEqual(len({level[0] for level in levels}), 4)
        self.assertGreater(result.entry.version, peers.newer)

    @capture_logging(None, encoder_=None)
    def test_a_write_short_of_its_quorum_answers_unavailable_and_keeps_the_copy_it_stored(self, logger):
        key = key_owned_by("n2", "n3")
        c = coordinator({"n2": PeerError("down"), "n3": PeerError("down")}, level="debug")
        result = outcome(c.put(key, b'"v"', None))
        self.assertTrue(result.check(Unavailable))
        self.assertIn("only 1 of the 2", str(result.value))
        # n2 failed over to n1 (this node), which kept the copy; n3 had no node left to fail over to.
        self.assertEqual(c.store.get(key).value, b'"v"')
        self.assertEqual(sorted(m.message["peer"] for m in LoggedMessage.ofType(logger.messages, COPY_FAILED)),
                         ["n2", "n3"])
        [write] = LoggedAction.ofType(logger.messages, COORDINATE_WRITE)
        self.assertEqual(write.endMessage["copies"], 1)


class _Waiter:
    """A caller's own waiter for a write (the fast lane's, through KVOperations): what settled it, in order."""

    def __init__(self) -> None:
        self.called = False
        self.settled = []

    def callback(self, result) -> None:
        self.called = True
        self.settled.append(("result", result))

    def errback(self, error) -> None:
        self.called = True
        self.settled.append(("error", error))


class WaiterTests(unittest.TestCase):
    """
    ``Coordinator.put_to``: a replicated write settles the caller's own waiter, once, when its copies are
    done, and a node alone in its ring answers at once without touching it.
    """

    @capture_logging(None, encoder_=None)
    def test_a_write_settles_the_callers_waiter_once_when_its_last_copy_answers(self, logger):
        key = key_owned_by("n2", "n3")
        later = Deferred()
        c = coordinator({"n2": ApplyResult(True, False), "n3": later})
        waiter = _Waiter()
        self.assertIsNone(c.put_to(key, b'"v"', None, waiter))
        self.assertEqual(waiter.settled, [])
        later.callback(ApplyResult(True, False))
        [(kind, result)] = waiter.settled
        self.assertEqual((kind, result.copies, result.created), ("result", 2, True))

    @capture_logging(None, encoder_=None)
    def test_a_write_short_of_its_quorum_fails_the_callers_waiter_with_unavailable(self, logger):
        key = key_owned_by("n2", "n3")
        c = coordinator({"n2": PeerError("down"), "n3": PeerError("down")})
        waiter = _Waiter()
        self.assertIsNone(c.put_to(key, b'"v"', None, waiter))
        [(kind, failure)] = waiter.settled
        self.assertEqual(kind, "error")
        self.assertTrue(failure.check(Unavailable))

    @capture_logging(None, encoder_=None)
    def test_a_write_stamped_again_settles_the_same_waiter_once(self, logger):
        class Newer(_Peers):
            def apply_coalesced(self, peer, entry, task_id=None):
                self.calls.append(entry.version)
                if len(self.calls) == 1:
                    return succeed(ApplyResult(False, True, (entry.version[0] + 5000, 0, "n2")))
                return succeed(ApplyResult(True, True))

        peers = Newer({})
        waiter = _Waiter()
        self.assertIsNone(coordinator({}, peers=peers).put_to(key_owned_by("n1", "n2"), b'"v"', None, waiter))
        [(kind, result)] = waiter.settled
        self.assertEqual(kind, "result")
        self.assertEqual(len(peers.calls), 2)
        self.assertEqual(result.entry.version, peers.calls[1])

    def test_a_node_alone_answers_at_once_and_leaves_the_waiter_alone(self):
        clock = Clock()
        alone = Coordinator(Store(clock.seconds, 1 << 24), HybridLogicalClock(clock.seconds, "n1"),
                            lambda: HashRing(["n1"]), lambda node: None, _Peers({}), replicas=2,
                            write_quorum=None, seconds=clock.seconds, metrics=Metrics("t"),
                            log_policy=LogPolicy("warning"))
        waiter = _Waiter()
        result = alone.put_to("k", b'"v"', None, waiter)
        self.assertEqual((result.copies, result.created), (1, True))
        self.assertEqual(waiter.settled, [])


class ReplicaCopyTests(unittest.TestCase):

    @capture_logging(None, encoder_=None)
    def test_a_copy_with_a_malformed_task_id_is_still_stored(self, logger):
        from kvresponder.store import Entry

        c = coordinator({})
        for counter, task_id in enumerate((b"no-at-sign", b"abc@not/a/level", b"\xff@1")):
            result = c.apply_copy(Entry("copied", b'"v%d"' % counter, (2000000, counter, "n2")), task_id)
            self.assertTrue(result.applied)
        self.assertEqual(c.store.get("copied").value, b'"v2"')

    @capture_logging(None, encoder_=None)
    def test_at_info_a_copy_is_one_line_in_the_writers_task_at_the_level_it_was_sent(self, logger):
        from eliot import start_action

        from kvresponder.log.store import STORE_APPLIED, STORE_APPLY
        from kvresponder.store import Entry

        c = coordinator({})
        with start_action(action_type="test:writer") as writer:
            task_id = writer.serialize_task_id()
        c.apply_copy(Entry("copied", b'"v"', (2000000, 0, "n2")), task_id)
        self.assertEqual(LoggedAction.ofType(logger.messages, STORE_APPLY), [])
        [line] = [m.message for m in LoggedMessage.ofType(logger.messages, STORE_APPLIED)]
        self.assertEqual((line["task_uuid"], line["task_level"]), (writer.task_uuid, [2]))
        self.assertEqual((line["key"], line["applied"]), ("copied", True))

    @capture_logging(None, encoder_=None)
    def test_a_copy_with_a_malformed_task_id_is_still_stored_and_logged_in_a_task_of_its_own(self, logger):
        from kvresponder.log.store import STORE_APPLIED
        from kvresponder.store import Entry

        c = coordinator({})
        for bad in (b"no-at-sign", b"uuid@", b"uuid@/x", b"@/1", b"uuid@/0", b"\xff@/1", b"uuid@/1", b"uuid@/+2",
                    b"uu id@/2", b"uuid@/2/"):
            result = c.apply_copy(Entry("copied-" + bad.hex(), b'"v"', (2000000, 0, "n2")), bad)
            self.assertTrue(result.applied)
        lines = [m.message for m in LoggedMessage.ofType(logger.messages, STORE_APPLIED)]
        self.assertEqual(len(lines), 10)
        self.assertTrue(all(line["task_level"] == [1] for line in lines))

    @capture_logging(None, encoder_=None)
    def test_at_debug_a_copy_continues_the_writers_task_as_its_store_action(self, logger):
        from eliot import start_action

        from kvresponder.log.store import STORE_APPLY
        from kvresponder.store import Entry

        c = coordinator({}, level="debug")
        with start_action(action_type="test:writer") as writer:
            task_id = writer.serialize_task_id()
        c.apply_copy(Entry("copied", b'"v"', (2000000, 0, "n2")), task_id)
        [apply] = LoggedAction.ofType(logger.messages, STORE_APPLY)
        self.assertEqual(apply.startMessage["task_uuid"], writer.task_uuid)
        self.assertEqual(apply.startMessage["key"], "copied")
        self.assertTrue(apply.endMessage["applied"])

    @capture_logging(None, encoder_=None)
    def test_at_info_a_write_outside_any_action_is_one_task_whose_lines_each_node_logs(self, logger):
        from kvresponder.log.store import STORE_APPLIED

        peers = _Peers({"n2": ApplyResult(True, False)})
        c = coordinator({}, peers=peers)
        key = key_owned_by("n1", "n2")
        result = outcome(c.put(key, b'"v"', None))
        self.assertEqual(result.copies, 2)
        [line] = [m.message for m in LoggedMessage.ofType(logger.messages, STORE_APPLIED)]
        [sent] = peers.task_ids
        # The coordinator's own line and the copy's task id name one task, at two levels.
        self.assertEqual(sent, b"%s@/%d" % (line["task_uuid"].encode(), 5 - line["task_level"][0]))
        self.assertIn(line["task_level"], ([2], [3]))


class _BatchPeers:
    """
    ``apply`` (a bulk write's batch for one node) storing every entry as new.
    """

    def __init__(self) -> None:
        self.batches = {}

    def apply(self, peer, entries):
        self.batches[peer.node_id] = [entry.key for entry in entries]
        return succeed([ApplyResult(True, False) for _ in entries])

    def send_copy(self, peer, entry, waiter, task_id=None):
        raise AssertionError("a bulk write sent a copy of a single write")


class BulkWriteLoggingTests(unittest.TestCase):

    def bulk_coordinator(self):
        clock = Clock()
        clock.advance(1000)
        peers = _BatchPeers()
        c = Coordinator(Store(clock.seconds, 1 << 24), HybridLogicalClock(clock.seconds, "n1"), lambda: RING,
                        lambda node: Peer(node, "10.0.0.%s" % node[1:], 3000), peers, replicas=2,
                        write_quorum=None, seconds=clock.seconds, metrics=Metrics("t"),
                        log_policy=LogPolicy("info"))
        return c, peers

    @capture_logging(None, encoder_=None)
    def test_a_bulk_writes_local_share_is_one_store_action(self, logger):
        """
        If a bulk write puts many keys, then this node stores its share inside one ``store:apply-batch``
        action (as each peer does with the batch it is sent), not one ``store:apply`` an entry, and every
        key is still stored on its two owners.
        """
        from kvresponder.log.store import STORE_APPLY, STORE_APPLY_BATCH

        c, peers = self.bulk_coordinator()
        keys = ["bulk%d" % i for i in range(60)]
        results = outcome(c.put_many([(key, b'"v"', None) for key in keys]))
        self.assertEqual([result.copies for result in results], [2] * len(keys))
        local = [key for key in keys if "n1" in RING.preference_list(key, 2)]
        self.assertGreater(len(local), 1)
        self.assertEqual(sorted(local), sorted(key for key in keys if c.store.get(key) is not None))
        [batch] = LoggedAction.ofType(logger.messages, STORE_APPLY_BATCH)
        self.assertEqual((batch.startMessage["count"], batch.endMessage["applied"]), (len(local), len(local)))
        self.assertEqual(LoggedAction.ofType(logger.messages, STORE_APPLY), [])
        for node in ("n2", "n3"):
            self.assertEqual(sorted(peers.batches[node]),
                             sorted(key for key in keys if node in RING.preference_list(key, 2)))

    @capture_logging(None, encoder_=None)
    def test_a_bulk_write_of_one_local_entry_is_a_plain_store_line(self, logger):
        from kvresponder.log.store import STORE_APPLIED, STORE_APPLY_BATCH

        c, _ = self.bulk_coordinator()
        key = key_owned_by("n1", "n2")
        [result] = outcome(c.put_many([(key, b'"v"', None)]))
        self.assertEqual(result.copies, 2)
        self.assertEqual(len(LoggedMessage.ofType(logger.messages, STORE_APPLIED)), 1)
        self.assertEqual(LoggedAction.ofType(logger.messages, STORE_APPLY_BATCH), [])


# -- reads while nodes leave -----------------------------------------------------------------------------------


class _StorePeers:
    """
    Each peer a store of its own (a node missing from ``stores`` is unreachable): reads, single and bulk, and
    copies, single and bulk. ``asked`` and ``sent`` record the peers read from and written to.
    """

    def __init__(self, stores) -> None:
        self.stores = stores
        self.sent = []
        self.asked = []
        #: Peers that refuse copies but answer reads, as a leaving node does.
        self.refused = set()

    def get_coalesced(self, peer, key):
        return self.get_many(peer, [key]).addCallback(lambda entries: entries[0])

    def get_many(self, peer, keys):
        self.asked.append(peer.node_id)
        store = self.stores.get(peer.node_id)
        if store is None:
            return fail(PeerError("%s unreachable" % (peer.node_id,)))
        return succeed([store.current(key) for key in keys])

    def apply_coalesced(self, peer, entry, task_id=None):
        return self.apply(peer, [entry]).addCallback(lambda results: results[0])

    def send_copy(self, peer, entry, waiter, task_id=None):
        self.apply_coalesced(peer, entry, task_id).addCallbacks(waiter.callback, waiter.errback)

    def apply(self, peer, entries, timeout=None, task_ids=None):
        self.sent.append(peer.node_id)
        store = self.stores.get(peer.node_id)
        if store is None:
            return fail(PeerError("%s unreachable" % (peer.node_id,)))
        if peer.node_id in self.refused:
            return fail(PeerError("%s is leaving" % (peer.node_id,)))
        return succeed([store.apply(entry) for entry in entries])


def _reader(node_id: str, ring: HashRing, stores, settling: bool, leaving):
    peers = _StorePeers(stores)
    store = stores.setdefault(node_id, Store(lambda: 1000.0, 1 << 24))
    return coordinator(None, peers=peers, ring=ring, store=store, settling=settling, leaving=leaving), peers


def _version_on(stores, node_id: str, key: str, value: bytes, wall: float) -> Entry:
    """
    ``key`` stored on ``node_id`` as ``value``, stamped by that node at ``wall`` seconds.
    """
    entry = Entry(key, value, HybridLogicalClock(lambda: wall, node_id).now(), None)
    stores.setdefault(node_id, Store(lambda: 1000.0, 1 << 24)).apply(entry)
    return entry


def _entry_on(stores, node_id: str, key: str) -> Entry:
    return _version_on(stores, node_id, key, b'"held"', 1000.0)


def _single_read(reader, key):
    found = outcome(reader.get(key))
    if isinstance(found, Failure):
        found.raiseException()
    return found


def _bulk_read(reader, key):
    """
    A read of ``key`` in a bulk get: its result, an :class:`Unavailable` raised as a single read's failure is.
    """
    found = outcome(ensureDeferred(reader.read_many([key])))[0]
    if isinstance(found, Unavailable):
        raise found
    return found


class LeavingReadTests(unittest.TestCase):
    """
    A node that leaves drops out of every ring at once, and hands its entries to their new owners after: in
    between, a read must still find what it holds.
    """

    RING = HashRing(["n1", "n2", "n3"])
    read = staticmethod(_single_read)

    def _key(self) -> str:
        return next(key for key in ("k%d" % i for i in range(1000))
                    if self.RING.preference_list(key, 3)[:2] == ["n2", "n3"])

    @capture_logging(None, encoder_=None)
    def test_while_the_ring_settles_a_key_only_a_leaving_peer_holds_is_read_from_it_and_copied_to_its_owners(
            self, logger):
        stores = {}
        key = self._key()
        held = _entry_on(stores, "n4", key)
        for node in ("n2", "n3"):
            stores.setdefault(node, Store(lambda: 1000.0, 1 << 24))
        reader, peers = _reader("n1", self.RING, stores, settling=True, leaving=["n4"])
        found = self.read(reader, key)
        self.assertEqual((found.value, found.version), (b'"held"', held.version))
        self.assertIn("n4", peers.asked)
        # Read repair: the owners get the copy; the leaving node is not sent its own back.
        self.assertEqual(stores["n2"].current(key).version, held.version)
        self.assertEqual(stores["n3"].current(key).version, held.version)

    @capture_logging(None, encoder_=None)
    def test_a_draining_node_reads_what_it_still_holds_itself(self, logger):
        stores = {}
        key = self._key()
        held = _entry_on(stores, "n1", key)
        for node in ("n2", "n3"):
            stores.setdefault(node, Store(lambda: 1000.0, 1 << 24))
        # n1 drains: its ring no longer has it, and it counts itself among the leaving.
        reader, _ = _reader("n1", HashRing(["n2", "n3"]), stores, settling=True, leaving=["n1"])
        found = self.read(reader, key)
        self.assertEqual(found.version, held.version)

    @capture_logging(None, encoder_=None)
    def test_a_key_handed_off_between_the_owners_answer_and_the_leaving_holders_is_still_found(self, logger):
        """
        If a leaving node hands a key to its owners and drops its own copy just after they answered the read
        "absent" and just before it is asked itself (so every answer is "absent"), then the read asks the ring
        again and finds the key, instead of answering a miss for a key the cluster holds.
        """
        stores = {}
        key = self._key()
        held = _entry_on(stores, "n4", key)
        for node in ("n2", "n3"):
            stores.setdefault(node, Store(lambda: 1000.0, 1 << 24))

        class _HandsOffWhenAsked(_StorePeers):
            def get_many(self, peer, keys):
                if peer.node_id == "n4" and key in keys and stores["n4"].current(key) is not None:
                    # Its pass: the owners store the key, then it forgets its own copy (as it does only once
                    # they have it).
                    for owner in ("n2", "n3"):
                        stores[owner].apply(held)
                    stores["n4"].forget(key, held.version)
                return _StorePeers.get_many(self, peer, keys)

        peers = _HandsOffWhenAsked(stores)
        store = stores.setdefault("n1", Store(lambda: 1000.0, 1 << 24))
        reader = coordinator(None, peers=peers, ring=self.RING, store=store, settling=True, leaving=["n4"])
        found = self.read(reader, key)
        self.assertIsNotNone(found)
        self.assertEqual((found.value, found.version), (b'"held"', held.version))
        # The owners answered it the second time: no read repair is sent them for their first "absent".
        self.assertEqual([node for node in peers.sent if node in ("n2", "n3")], [])

    @capture_logging(None, encoder_=None)
    def test_once_the_ring_has_settled_leaving_peers_are_not_asked(self, logger):
        stores = {}
        key = self._key()
        _entry_on(stores, "n4", key)
        for node in ("n2", "n3"):
            stores.setdefault(node, Store(lambda: 1000.0, 1 << 24))
        reader, peers = _reader("n1", self.RING, stores, settling=False, leaving=["n4"])
        self.assertIsNone(self.read(reader, key))
        self.assertNotIn("n4", peers.asked)


class UnreachableOwnersReadTests(unittest.TestCase):
    """
    A read of a key whose owners are all unreachable: the fallback that answers instead (here the coordinator
    itself) holds a hint if a write failed over to it, and nothing otherwise.
    """

    RING = HashRing(["n1", "n2", "n3"])
    read = staticmethod(_single_read)

    def _key(self) -> str:
        return next(key for key in ("k%d" % i for i in range(1000))
                    if self.RING.preference_list(key, 3) == ["n2", "n3", "n1"])

    @capture_logging(None, encoder_=None)
    def test_with_every_owner_unreachable_and_no_hint_a_read_is_unavailable_not_a_miss(self, logger):
        reader, peers = _reader("n1", self.RING, {}, settling=False, leaving=[])
        with self.assertRaises(Unavailable):
            self.read(reader, self._key())
        self.assertEqual(sorted(peers.asked), ["n2", "n3"])

    @capture_logging(None, encoder_=None)
    def test_with_every_owner_unreachable_a_hint_on_the_fallback_answers_the_read(self, logger):
        stores = {}
        key = self._key()
        held = _entry_on(stores, "n1", key)
        reader, _ = _reader("n1", self.RING, stores, settling=False, leaving=[])
        found = self.read(reader, key)
        self.assertEqual(found.version, held.version)

    @capture_logging(None, encoder_=None)
    def test_one_owner_answering_none_is_a_miss(self, logger):
        stores = {"n2": Store(lambda: 1000.0, 1 << 24)}
        reader, _ = _reader("n1", self.RING, stores, settling=False, leaving=[])
        self.assertIsNone(self.read(reader, self._key()))


class ExpiredOnItsWayReadTests(unittest.TestCase):
    """
    A value an owner answers as live (by its clock, or before the answer came back) whose expiry this
    coordinator's clock has passed is a miss: what the client is told follows the coordinator's clock.
    """

    RING = HashRing(["n1", "n2", "n3"])
    read = staticmethod(_single_read)

    def test_a_value_expired_by_the_coordinators_clock_is_a_miss(self):
        key = next(key for key in ("k%d" % i for i in range(1000))
                   if "n1" not in self.RING.preference_list(key, 2))
        clock = Clock()
        clock.advance(995)
        version = HybridLogicalClock(clock.seconds, "n2").now()
        # The owners' clocks are 5 s behind the coordinator's (1000): the value is live by theirs until 998.
        stores = {node: Store(clock.seconds, 1 << 24) for node in ("n2", "n3")}
        for store in stores.values():
            store.apply(Entry(key, b'"v"', version, 998.0))
        reader, peers = _reader("n1", self.RING, stores, settling=False, leaving=[])
        self.assertIsNone(self.read(reader, key))
        self.assertTrue(peers.asked)
        # One still live by the coordinator's clock is answered.
        for store in stores.values():
            store.apply(Entry(key, b'"w"', HybridLogicalClock(lambda: 995.5, "n2").now(), 1001.0))
        self.assertEqual(self.read(reader, key).value, b'"w"')


class BulkExpiredOnItsWayReadTests(ExpiredOnItsWayReadTests):
    read = staticmethod(_bulk_read)


class BulkLeavingReadTests(LeavingReadTests):
    """
    The same reads, of a key in a bulk get: the same answers as a single read's.
    """

    read = staticmethod(_bulk_read)


class BulkUnreachableOwnersReadTests(UnreachableOwnersReadTests):
    """
    The same reads, of a key in a bulk get: the same answers as a single read's (a key only a fallback answered
    "none" for is unavailable, not a miss).
    """

    read = staticmethod(_bulk_read)


class SettlingReadTests(unittest.TestCase):
    """
    A membership change can make a node an owner of a key it holds an older version of (it owned the key
    before, or was told a write as a previous owner), while the newer version is on the owners it replaced,
    or on its co-owner, until the handoff reaches it. While the ring settles, a read takes the newest of them.
    """

    RING = HashRing(["n1", "n2", "n3"])
    read = staticmethod(_single_read)

    def _key(self, ring: HashRing, owners) -> str:
        return next(key for key in ("k%d" % i for i in range(10000))
                    if ring.preference_list(key, 2) == list(owners))

    @capture_logging(None, encoder_=None)
    def test_while_the_ring_settles_an_owner_holding_an_older_copy_than_its_co_owner_answers_the_newer(self, logger):
        stores = {}
        key = self._key(self.RING, ["n1", "n2"])
        _version_on(stores, "n1", key, b'"older"', 1000.0)
        newer = _version_on(stores, "n2", key, b'"newer"', 1001.0)
        reader, peers = _reader("n1", self.RING, stores, settling=True, leaving=[])
        found = self.read(reader, key)
        self.assertEqual((found.value, found.version), (b'"newer"', newer.version))
        self.assertIn("n2", peers.asked)
        # Read repair: the owner that answered the older version gets the newer one.
        self.assertEqual(stores["n1"].current(key).version, newer.version)

    @capture_logging(None, encoder_=None)
    def test_while_the_ring_settles_a_key_newer_on_a_previous_owner_than_on_its_owners_is_read_from_it(
            self, logger):
        """
        If a join replaced an owner that holds a key's newest version (the other holds an older one, the
        joiner nothing), then a read while the ring settles asks the previous owner too and answers its
        version; the owners are repaired with it, the previous owner is not sent a copy.
        """
        before = self.RING
        after = HashRing(["n1", "n2", "n3", "n4"])
        key = self._moved_key(before, after)
        owners = after.preference_list(key, 2)
        [older_holder] = [node for node in owners if node != "n4"]
        [previous] = set(before.preference_list(key, 2)) - set(owners) - {"n1"}
        stores = {"n4": Store(lambda: 1000.0, 1 << 24)}
        _version_on(stores, older_holder, key, b'"older"', 1000.0)
        newer = _version_on(stores, previous, key, b'"newer"', 1001.0)
        peers = _StorePeers(stores)
        store = stores.setdefault("n1", Store(lambda: 1000.0, 1 << 24))
        reader = coordinator(None, peers=peers, ring=after, store=store, settling=True, previous_rings=[before])
        found = self.read(reader, key)
        self.assertEqual((found.value, found.version), (b'"newer"', newer.version))
        self.assertIn(previous, peers.asked)
        for node in owners:
            self.assertEqual(stores[node].current(key).version, newer.version)

    def _moved_key(self, before: HashRing, after: HashRing) -> str:
        # A key whose owners a join of n4 changed, n1 (the coordinator) among neither.
        return next(key for key in ("k%d" % i for i in range(10000))
                    if "n4" in after.preference_list(key, 2) and "n1" not in after.preference_list(key, 2)
                    and set(before.preference_list(key, 2)) - set(after.preference_list(key, 2)) - {"n1"})

    @capture_logging(None, encoder_=None)
    def test_a_previous_owner_holding_an_older_version_is_asked_but_not_sent_the_newer(self, logger):
        before, after = self.RING, HashRing(["n1", "n2", "n3", "n4"])
        key = self._moved_key(before, after)
        owners = after.preference_list(key, 2)
        [previous] = set(before.preference_list(key, 2)) - set(owners) - {"n1"}
        stores = {"n1": Store(lambda: 1000.0, 1 << 24)}
        _version_on(stores, previous, key, b'"older"', 1000.0)
        newer = _version_on(stores, owners[0], key, b'"newer"', 1001.0)
        stores.setdefault(owners[1], Store(lambda: 1000.0, 1 << 24)).apply(newer)
        peers = _StorePeers(stores)
        reader = coordinator(None, peers=peers, ring=after, store=stores["n1"], settling=True, previous_rings=[before])
        self.assertEqual(self.read(reader, key).version, newer.version)
        self.assertIn(previous, peers.asked)
        # It owns the key no more: a copy would be one more for its pass to hand on.
        self.assertNotIn(previous, peers.sent)
        self.assertEqual(stores[previous].current(key).value, b'"older"')

    @capture_logging(None, encoder_=None)
    def test_a_previous_owner_gone_from_the_membership_counts_no_failed_replica_read(self, logger):
        """
        If a previous owner has gone (timed out: no peer any more), then the reads that ask it while the ring
        settles count no failure: it is no replica of the key, and the alert on failed replica calls must not
        fire for every read of a key it owned.
        """
        before = HashRing(["n1", "n2", "n3", "n9"])
        key = next(key for key in ("k%d" % i for i in range(10000))
                   if self.RING.preference_list(key, 2)[0] == "n1" and "n9" in before.preference_list(key, 2))
        stores = {}
        for node in self.RING.preference_list(key, 2):
            _version_on(stores, node, key, b'"v"', 1000.0)
        metrics = Metrics("t")
        reader = coordinator(None, peers=_StorePeers(stores), ring=self.RING, store=stores["n1"], settling=True,
                             previous_rings=[before], metrics=metrics,
                             peer_of=lambda node: None if node == "n9" else Peer(node, "10.0.0.1", 3000))
        for _ in range(5):
            self.assertEqual(self.read(reader, key).value, b'"v"')
        self.assertEqual(metrics._stats.replication.get(("get", "failure"), 0), 0)

    @capture_logging(None, encoder_=None)
    def test_an_owner_that_fails_is_replaced_by_a_node_not_asked_yet_which_gets_the_newest_as_a_hint(self, logger):
        """
        If an owner fails while the ring settles and its first fallback is a previous owner (asked anyway), then
        the failed owner's slot goes to the next fallback instead, which gets the newest version as a hint; the
        previous owner is asked once.
        """
        after = HashRing(["n1", "n2", "n3", "n4", "n5"])
        for key in ("k%d" % i for i in range(20000)):
            ordered = after.preference_list(key, 5)
            if "n1" in ordered[:4]:
                continue
            failed, stand_in, next_in_line = ordered[1], ordered[2], ordered[3]
            before = HashRing(set(after.nodes) - {failed})
            if stand_in in before.preference_list(key, 2):
                break
        else:
            self.fail("no key")
        stores = {}
        newest = _version_on(stores, ordered[0], key, b'"v"', 1000.0)
        for node in ("n1", stand_in, next_in_line):
            stores.setdefault(node, Store(lambda: 1000.0, 1 << 24))
        peers = _StorePeers(stores)  # ``failed`` has no store: unreachable
        reader = coordinator(None, peers=peers, ring=after, store=stores["n1"], settling=True, previous_rings=[before])
        self.assertEqual(self.read(reader, key).value, b'"v"')
        self.assertEqual(peers.asked.count(stand_in), 1, peers.asked)
        self.assertIn(next_in_line, peers.asked)
        self.assertEqual(stores[next_in_line].current(key).version, newest.version)


    @capture_logging(None, encoder_=None)
    def test_a_node_left_alone_by_a_change_asks_the_previous_owner_that_holds_the_newer_version(self, logger):
        """
        If a change leaves the coordinator alone in its ring (its only peer drains), then while the ring settles
        a read still asks the previous owner, which holds a newer version than the coordinator's own copy.
        """
        before, alone = HashRing(["n1", "n2"]), HashRing(["n1"])
        key = "k1"
        stores = {}
        _version_on(stores, "n1", key, b'"older"', 1000.0)
        newer = _version_on(stores, "n2", key, b'"newer"', 1001.0)
        peers = _StorePeers(stores)
        reader = coordinator(None, peers=peers, ring=alone, store=stores["n1"], settling=True, previous_rings=[before])
        self.assertEqual(self.read(reader, key).version, newer.version)
        self.assertIn("n2", peers.asked)


class OwnCopyReadTests(unittest.TestCase):
    """
    A single read through an owner that holds the key answers from its own copy, once the ring has not changed
    recently (a bulk read asks every owner, settled or not).
    """

    RING = SettlingReadTests.RING
    read = staticmethod(_single_read)
    _key = SettlingReadTests._key

    @capture_logging(None, encoder_=None)
    def test_once_the_ring_has_settled_an_owner_answers_from_its_own_copy_without_asking(self, logger):
        stores = {}
        key = self._key(self.RING, ["n1", "n2"])
        _version_on(stores, "n1", key, b'"own"', 1000.0)
        _version_on(stores, "n2", key, b'"other"', 1001.0)
        reader, peers = _reader("n1", self.RING, stores, settling=False, leaving=[])
        self.assertEqual(self.read(reader, key).value, b'"own"')
        self.assertEqual(peers.asked, [])

    @capture_logging(None, encoder_=None)
    def test_entries_waiting_for_hand_off_alone_leave_an_owner_answering_from_its_own_copy(self, logger):
        """
        If the ring settles only because this node holds entries waiting for hand-off (hints for an unreachable
        owner, for minutes), not because the ring changed, then an owner still answers from its own copy.
        """
        stores = {}
        key = self._key(self.RING, ["n1", "n2"])
        _version_on(stores, "n1", key, b'"own"', 1000.0)
        _version_on(stores, "n2", key, b'"other"', 1001.0)
        peers = _StorePeers(stores)
        reader = coordinator(None, peers=peers, ring=self.RING, store=stores["n1"], settling=True, changed=False)
        self.assertEqual(self.read(reader, key).value, b'"own"')
        self.assertEqual(peers.asked, [])



class BulkSettlingReadTests(SettlingReadTests):
    """
    The same reads, of a key in a bulk get (which asks every owner, settled or not).
    """

    read = staticmethod(_bulk_read)


class PreviousOwnersWriteTests(unittest.TestCase):
    """
    A join can replace every owner of a key: the new node's point becomes the key's start on the ring, and the
    walk from it meets other nodes. Until the handoff has run, an earlier acknowledged write is then on the
    previous owners alone, and a later write stamped by a clock behind the earlier one's must still win.
    """

    BEFORE = HashRing(["n1", "n2", "n3"])
    AFTER = HashRing(["n1", "n2", "n3", "n4"])

    def setUp(self) -> None:
        # Owned by n2 and n3 before n4 joined, by n1 (this coordinator) and n4 after.
        self.key = next(key for key in ("key-%d" % i for i in range(100000))
                        if set(self.BEFORE.preference_list(key, 2)) == {"n2", "n3"}
                        and set(self.AFTER.preference_list(key, 2)) == {"n1", "n4"})
        # The earlier write, stamped by n3's clock 0.4 s ahead of n1's (within any sane MAX_CLOCK_OFFSET).
        clock = Clock()
        clock.advance(1000.4)
        self.earlier = Entry(self.key, b'"earlier"', HybridLogicalClock(clock.seconds, "n3").now(), None)
        self.stores = {node: Store(lambda: 1000.0, 1 << 24) for node in ("n2", "n3", "n4")}
        for node in ("n2", "n3"):
            self.stores[node].apply(self.earlier)
        self.store = Store(lambda: 1000.0, 1 << 24)

    def writer(self, previous) -> Coordinator:
        self.peers = _StorePeers(self.stores)
        return coordinator(None, peers=self.peers, ring=self.AFTER, store=self.store, settling=True,
                           previous_rings=previous)

    def test_a_later_write_is_stamped_above_an_earlier_one_only_the_previous_owners_hold(self):
        result = outcome(self.writer([self.BEFORE]).put(self.key, b'"later"', None))
        self.assertGreater(result.entry.version, self.earlier.version)
        self.assertFalse(result.created, "the key held a live value: a replacement, 200")
        self.assertEqual(result.copies, 2)
        for store in (self.store, self.stores["n4"]):
            self.assertEqual((store.current(self.key).value, store.current(self.key).version),
                             (b'"later"', result.entry.version))

    def test_a_bulk_write_is_stamped_above_an_earlier_one_only_the_previous_owners_hold(self):
        [result] = outcome(self.writer([self.BEFORE]).put_many([(self.key, b'"later"', None)]))
        self.assertGreater(result.entry.version, self.earlier.version)
        self.assertFalse(result.created)
        self.assertEqual(result.copies, 2)
        self.assertEqual(self.stores["n4"].current(self.key).version, result.entry.version)

    def test_one_previous_owner_holding_the_earlier_write_is_enough(self):
        del self.stores["n2"]
        result = outcome(self.writer([self.BEFORE]).put(self.key, b'"later"', None))
        self.assertGreater(result.entry.version, self.earlier.version)
        self.assertEqual(result.copies, 2)

    def test_previous_owners_are_asked_for_their_version_and_not_sent_a_copy(self):
        """
        A copy on a previous owner would be one more for the next pass to hand on: they are only asked.
        """
        result = outcome(self.writer([self.BEFORE]).put(self.key, b'"later"', None))
        # Asked again by the write stamped above what they said.
        self.assertEqual(sorted(self.peers.asked), ["n2", "n2", "n3", "n3"])
        self.assertEqual(self.peers.sent, ["n4", "n4"])
        for node in ("n2", "n3"):
            self.assertEqual(self.stores[node].current(self.key).version, self.earlier.version)
        self.assertEqual(result.copies, 2)

    def _expiring_stores(self):
        """
        The previous owners' stores on a clock the test turns, holding the earlier write.
        """
        now = [1000.0]
        self.stores = {node: Store(lambda: now[0], 1 << 24) for node in ("n2", "n3", "n4")}
        for node in ("n2", "n3"):
            self.stores[node].apply(self.earlier)
        return now

    def _assert_previous_owners_leave_the_tombstone_of(self, version, now):
        """
        The previous owners hold the write at ``version`` in place of the earlier one and, once it has expired,
        its tombstone.
        """
        for node in ("n2", "n3"):
            self.assertEqual(self.stores[node].current(self.key).version, version)
        now[0] += 10
        for node in ("n2", "n3"):
            tombstone = self.stores[node].current(self.key)
            self.assertEqual((tombstone.value, tombstone.version), (None, version))

    def test_previous_owners_are_sent_a_write_that_expires_and_leave_its_tombstone(self):
        """
        New owners that held nothing leave no tombstone when a write with a TTL expires, so a previous owner's
        hand-off arriving after that would bring back the older value it holds: they are sent the write, which
        replaces that value there and leaves its tombstone.
        """
        now = self._expiring_stores()
        result = outcome(self.writer([self.BEFORE]).put(self.key, b'"short"', 1.0))
        self.assertGreater(result.entry.version, self.earlier.version)
        self.assertEqual(self.peers.asked, [])
        self._assert_previous_owners_leave_the_tombstone_of(result.entry.version, now)

    def test_previous_owners_are_sent_an_entry_of_a_bulk_write_that_expires(self):
        now = self._expiring_stores()
        [result] = outcome(self.writer([self.BEFORE]).put_many([(self.key, b'"short"', 1.0)]))
        self.assertGreater(result.entry.version, self.earlier.version)
        self.assertEqual(self.peers.asked, [])
        self._assert_previous_owners_leave_the_tombstone_of(result.entry.version, now)

    def test_a_previous_owner_that_refuses_a_write_that_expires_is_asked_for_its_version(self):
        """
        A node that is leaving refuses copies, but still answers reads: the write hears of the earlier write's
        version from it all the same, single or bulk.
        """
        for write in (lambda c: c.put(self.key, b'"short"', 1.0),
                      lambda c: c.put_many([(self.key, b'"short"', 1.0)])):
            self.stores["n3"] = Store(lambda: 1000.0, 1 << 24)
            writer = self.writer([self.BEFORE])
            self.peers.refused = {"n2"}
            result = outcome(write(writer))
            if isinstance(result, list):
                [result] = result
            self.assertGreater(result.entry.version, self.earlier.version)
            self.assertIn("n2", self.peers.asked)
            self.assertEqual(self.stores["n2"].current(self.key).version, self.earlier.version)

    def test_unreachable_previous_owners_neither_count_nor_are_replaced(self):
        """
        Previous owners are asked, not relied on: with both unreachable the write is acknowledged on its owners
        as before, and no fallback is sent a hint in their place.
        """
        del self.stores["n2"], self.stores["n3"]
        result = outcome(self.writer([self.BEFORE]).put(self.key, b'"later"', None))
        self.assertEqual(result.copies, 2)
        self.assertEqual(sorted(self.peers.asked), ["n2", "n3"])
        self.assertEqual(self.peers.sent, ["n4"])

    def test_a_previous_owner_holding_an_older_value_does_not_make_a_new_key_a_replacement(self):
        """
        A version older than the write's says nothing of whether the key held a value: the owners may hold a
        newer tombstone. Only a newer live version makes the write a replacement (200).
        """
        clock = Clock()
        clock.advance(900)
        stale = Entry(self.key, b'"stale"', HybridLogicalClock(clock.seconds, "n3").now(), None)
        self.stores = {node: Store(lambda: 1000.0, 1 << 24) for node in ("n2", "n3", "n4")}
        self.stores["n3"].apply(stale)
        result = outcome(self.writer([self.BEFORE]).put(self.key, b'"new"', None))
        self.assertTrue(result.created)
        [result] = outcome(self.writer([self.BEFORE]).put_many([(self.key + "-bulk", b'"new"', None)]))
        self.assertTrue(result.created)

    def test_unreachable_previous_owners_of_a_bulk_write_are_not_counted_as_failed_replica_calls(self):
        del self.stores["n2"], self.stores["n3"]
        metrics = Metrics("t")
        self.peers = _StorePeers(self.stores)
        writer = coordinator(None, peers=self.peers, ring=self.AFTER, store=self.store, settling=True,
                             previous_rings=[self.BEFORE], metrics=metrics)
        [result] = outcome(writer.put_many([(self.key, b'"later"', None)]))
        self.assertEqual(result.copies, 2)
        self.assertEqual(sorted(self.peers.asked), ["n2", "n3"])
        failed = [line for line in metrics.exposition().decode("utf-8").splitlines()
                  if line.startswith("kv_replication_operations_total{") and 'result="failure"' in line]
        self.assertTrue(failed)
        self.assertEqual([float(line.rsplit(" ", 1)[1]) for line in failed], [0.0] * len(failed))

    @capture_logging(None, encoder_=None)
    def test_a_write_settled_by_a_previous_owner_at_once_is_delivered_outside_its_own_action(self, logger):
        """
        If every slot settles at once and the last is a previous owner (one already gone, one that answers at
        once), then the caller still hears of the write only outside the write's own action.
        """
        seen = []

        @implementer(Waiter)
        class Caller:
            called = False

            def callback(self, result):
                seen.append(current_action())

            def errback(self, failure):
                seen.append(failure)

        self.stores["n3"] = Store(lambda: 1000.0, 1 << 24)
        self.peers = _StorePeers(self.stores)
        writer = coordinator(None, peers=self.peers, ring=self.AFTER, store=self.store, settling=True,
                             previous_rings=[self.BEFORE], level="debug",
                             peer_of=lambda node: None if node == "n2" else Peer(node, "10.0.0.%s" % node[1:], 3000))
        self.assertIsNone(writer.put_to(self.key, b'"later"', None, Caller()))
        self.assertEqual(seen, [None])

    def test_once_the_ring_has_settled_only_the_owners_are_written(self):
        result = outcome(self.writer([]).put(self.key, b'"later"', None))
        self.assertEqual(self.peers.sent, ["n4"])
        self.assertEqual(self.peers.asked, [])
        self.assertEqual(result.copies, 2)


class LeavingCoordinatorTests(unittest.TestCase):
    """
    A node that begins leaving stores no copies (its drain ends and the process exits): a write it coordinates
    that fails over to itself goes to the next node instead.
    """

    RING = HashRing(["n1", "n2", "n3", "n4"])

    def test_a_write_failing_over_to_a_leaving_coordinator_goes_to_the_next_node(self):
        key = next(key for key in ("k%d" % i for i in range(10000))
                   if self.RING.preference_list(key, 4)[:3] == ["n2", "n3", "n1"])
        stores = {node: Store(lambda: 1000.0, 1 << 24) for node in ("n3", "n4")}
        store = Store(lambda: 1000.0, 1 << 24)
        clock = Clock()
        clock.advance(1000)
        writer = Coordinator(store, HybridLogicalClock(clock.seconds, "n1"), lambda: self.RING,
                             lambda node: Peer(node, "10.0.0.%s" % node[1:], 3000), _StorePeers(stores),
                             replicas=2, write_quorum=None, seconds=clock.seconds, metrics=Metrics("t"),
                             log_policy=LogPolicy("info"), takes_copies=lambda: False)
        result = outcome(writer.put(key, b'"v"', None))
        self.assertEqual(result.copies, 2)
        self.assertIsNone(store.current(key))
        self.assertIsNotNone(stores["n4"].current(key))
        [result] = outcome(writer.put_many([(key, b'"w"', None)]))
        self.assertEqual(result.copies, 2)
        self.assertIsNone(store.current(key))


class _RefusingPeers(_Peers):
    """
    ``_Peers`` whose bulk ``apply`` answers per node too: a list of results a batch, or an exception; with
    ``later``, a copy's exception fails its Deferred instead of being raised (as a batch's answer does).
    """

    def __init__(self, answers, later: bool = False) -> None:
        _Peers.__init__(self, answers)
        self.later = later

    def apply_coalesced(self, peer, entry, task_id=None):
        answer = self.answers[peer.node_id]
        if self.later and isinstance(answer, Exception):
            return fail(answer)
        return _Peers.apply_coalesced(self, peer, entry, task_id)

    def apply(self, peer, entries):
        answer = self.answers[peer.node_id]
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed([answer for _ in entries])


def _leaving_refusal(node: str) -> PeerError:
    # As a draining peer answers a copy (copystream's and the internal route's 503 "leaving").
    return PeerError("%s answered 503 to apply" % (node,), 503, "leaving")


class LeavingPeerQuorumTests(unittest.TestCase):
    """
    A write that overlapped a peer's leave, whose copy that peer refused as leaving, with no node left to fail
    over to (a cluster of two): it needs no more copies than a write begun after the leave was heard.
    """

    PAIR = HashRing(["n1", "n2"])

    def writes(self, c, key):
        single = outcome(c.put(key, b'"v"', None))
        [bulk] = outcome(c.put_many([(key, b'"w"', None)]))
        return single, bulk

    def test_a_write_whose_only_other_copy_is_refused_as_leaving_is_acknowledged_on_one(self):
        for later in (False, True):
            c = coordinator(None, peers=_RefusingPeers({"n2": _leaving_refusal("n2")}, later), ring=self.PAIR)
            for result in self.writes(c, "k1"):
                self.assertIsInstance(result, WriteResult)
                self.assertEqual(result.copies, 1)
            self.assertEqual(c.store.get("k1").value, b'"w"')

    def test_a_refusal_for_any_other_reason_still_fails_the_write(self):
        for refusal in (PeerError("n2 answered 503 to apply", 503),
                        PeerError("n2 answered 503 to apply", 503, "clock_skewed"),
                        PeerError("n2 unreachable for apply: ConnectionRefusedError")):
            c = coordinator(None, peers=_RefusingPeers({"n2": refusal}), ring=self.PAIR)
            for result in self.writes(c, "k1"):
                self.assertIsInstance(result, (Failure, Unavailable), refusal)
                error = result.value if isinstance(result, Failure) else result
                self.assertIn("only 1 of the 2", str(error))

    def test_an_explicit_write_quorum_is_kept_when_a_peer_is_leaving(self):
        c = coordinator(None, peers=_RefusingPeers({"n2": _leaving_refusal("n2")}), ring=self.PAIR, write_quorum=2)
        for result in self.writes(c, "k1"):
            error = result.value if isinstance(result, Failure) else result
            self.assertIn("only 1 of the 2", str(error))

    def test_only_the_leaving_peer_is_counted_out_not_one_that_is_down(self):
        """
        If of a key's owners n2 refuses as leaving (its copy goes to the fallback, n1) and n3 is unreachable,
        then two nodes stay (n1, n3) and the write still needs two copies: it has one, and fails.
        """
        key = key_owned_by("n2", "n3")
        peers = _RefusingPeers({"n2": _leaving_refusal("n2"),
                                "n3": PeerError("n3 unreachable for apply: ConnectionRefusedError")})
        for result in self.writes(coordinator(None, peers=peers), key):
            error = result.value if isinstance(result, Failure) else result
            self.assertIn("only 1 of the 2", str(error))


class ReadReplicaCallCountTests(unittest.TestCase):
    """
    ``kv_replication_operations_total`` counts a read's calls to its replicas both ways: the failure ratio that
    KVResponderReplicationFailing and the *Replication failures* panel read divides failed calls by all calls, so
    a read's answered calls must be counted with its failed ones.
    """

    RING = HashRing(["n1", "n2", "n3"])

    def _key(self) -> str:
        return next(key for key in ("k%d" % i for i in range(1000))
                    if self.RING.preference_list(key, 3) == ["n2", "n3", "n1"])

    def _counts(self, read) -> dict:
        stores = {}
        key = self._key()
        _entry_on(stores, "n3", key)
        # n2, the first owner, is unreachable; n3, the second, answers with the key, and n1 (the coordinator, the
        # next on the ring) answers in n2's place: one failed call, two answered, as a write would count them.
        metrics = Metrics("t")
        store = stores.setdefault("n1", Store(lambda: 1000.0, 1 << 24))
        reader = coordinator(None, peers=_StorePeers(stores), ring=self.RING, store=store, metrics=metrics)
        self.assertEqual(read(reader, key).value, b'"held"')
        return {result: count for (op, result), count in metrics._stats.replication.items() if op == "get"}

    @capture_logging(None, encoder_=None)
    def test_if_one_owner_of_a_read_fails_and_the_other_answers_then_answered_get_calls_count_with_the_failed_one(self, logger):
        self.assertEqual(self._counts(_single_read), {"success": 2, "failure": 1})

    @capture_logging(None, encoder_=None)
    def test_if_one_owner_of_a_bulk_read_fails_and_the_other_answers_then_answered_get_calls_count_with_the_failed_one(
            self, logger):
        self.assertEqual(self._counts(_bulk_read), {"success": 2, "failure": 1})


class _HoldingPeers:
    """Peers whose reads answer what ``held`` holds for them, and whose copies raise ``error``."""

    def __init__(self, held, error=None) -> None:
        self.held, self.error = held, error

    def get_coalesced(self, peer, key):
        return succeed(self.held.get(peer.node_id))

    def apply_coalesced(self, peer, entry, task_id=None):
        raise self.error

    def send_copy(self, peer, entry, waiter, task_id=None):
        raise AssertionError("a read sends no write's copy")


def _read_with_repair(peers, store, owners=("n1", "n2")):
    """Read a key ``owners`` own through n1, with ``peers`` and n1's ``store``."""
    metrics = Metrics("t")
    c = coordinator({}, peers=peers, store=store, metrics=metrics)
    return outcome(c.get(key_owned_by(*owners))), metrics.exposition().decode()


class ReadRepairTests(unittest.TestCase):

    @capture_logging(None, encoder_=None)
    def test_a_read_repair_too_large_for_this_nodes_budget_is_a_failed_repair_not_an_error(self, logger):
        """
        If a peer holds a newer value larger than this node's whole memory budget (their MAX_MEMORY differs),
        then the read answers it, and the repair of this node's copy is counted and logged as a failed repair,
        with no traceback.
        """
        key = key_owned_by("n1", "n2")
        big = Entry(key, b'"' + b"x" * 8000 + b'"', (2_000_000, 0, "n2"), None)
        result, text = _read_with_repair(_HoldingPeers({"n2": big}), Store(lambda: 1000.0, 4096))
        self.assertEqual(result, big)
        self.assertEqual(logger.flush_tracebacks(Exception), [])
        self.assertEqual([m["peer"] for m in logger.messages
                          if m.get("message_type") == "kvresponder:replication:copy-failed"], ["n1"])
        self.assertIn('kv_replication_operations_total{op="repair",result="failure",tenant="t"} 1.0', text)

    @capture_logging(None, encoder_=None)
    def test_a_read_repair_that_breaks_unexpectedly_logs_its_own_error(self, logger):
        """
        If repairing a stale owner raises an error no peer call should, then the traceback logged names that
        error (it was logged outside the exception, as ``NoneType: None``).
        """
        key = key_owned_by("n2", "n3")
        newer = Entry(key, b'"new"', (2_000_000, 0, "n2"), None)
        result, _ = _read_with_repair(_HoldingPeers({"n2": newer}, RuntimeError("a bug")),
                                      Store(lambda: 1000.0, 1 << 20), owners=("n2", "n3"))
        self.assertEqual(result, newer)
        self.assertEqual([str(m["reason"]) for m in logger.flush_tracebacks(RuntimeError)], ["a bug"])


class GatherTests(unittest.TestCase):
    """
    ``gather``: coroutines in parallel, their results in order, an unexpected failure logged and ``None``.
    """

    def test_results_come_in_the_coroutines_order_whatever_order_they_finish_in(self):
        from kvresponder.deferreds import gather

        first, second = Deferred(), Deferred()

        async def wait(d):
            return await d

        gathered = gather([wait(first), wait(second), wait(succeed("at once"))])
        self.assertFalse(gathered.called)
        second.callback("second")
        self.assertFalse(gathered.called)
        first.callback("first")
        self.assertEqual(outcome(gathered), ["first", "second", "at once"])
        self.assertEqual(outcome(gather([])), [])

    @capture_logging(None, encoder_=None)
    def test_an_unexpected_failure_is_logged_and_counts_as_none_without_failing_the_others(self, logger):
        from kvresponder.deferreds import gather

        async def broken():
            raise RuntimeError("a bug")

        async def fine():
            return 1

        self.assertEqual(outcome(gather([broken(), fine()])), [None, 1])
        [logged] = logger.flush_tracebacks(RuntimeError)
        self.assertIn("a bug", str(logged["reason"]))

    @capture_logging(None, encoder_=None)
    def test_an_unexpected_failure_is_logged_in_the_callers_action_not_in_what_fired_it(self, logger):
        from kvresponder.deferreds import gather

        later = Deferred()

        async def broken():
            await later
            raise RuntimeError("a bug")

        async def caller():
            with start_action(action_type="caller") as action:
                await gather([broken()])
                return action.task_uuid

        task = []
        ensureDeferred(caller()).addCallback(task.append)
        # The answer arrives from the reactor, outside any action.
        later.callback(None)
        [logged] = logger.flush_tracebacks(RuntimeError)
        self.assertEqual(logged["task_uuid"], task[0])

    def test_cancelling_a_gather_cancels_what_it_gathers_and_it_fires_with_none_for_each(self):
        from kvresponder.deferreds import gather

        cancelled = []
        inner = [Deferred(lambda d, i=i: cancelled.append(i)) for i in range(2)]

        async def wait(d):
            return await d

        gathered = gather([wait(d) for d in inner])
        gathered.cancel()
        self.assertEqual(cancelled, [0, 1])
        self.assertEqual(outcome(gathered), [None, None])
