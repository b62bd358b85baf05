"""
Coalescing calls to a peer: many waiting calls leave together as one batch.

A :class:`Batcher` keeps one queue per peer. A call queued while fewer than :data:`MAX_BATCHES_IN_FLIGHT` of that
peer's batches are out leaves at the end of the reactor turn, with whatever else was queued in that turn; a
call queued while they are out waits for one to come back, and then leaves with everything queued meanwhile.
So an idle node sends each call at once, and a busy one sends fewer, larger batches. A full queue
(:data:`MAX_COALESCED` calls) leaves at once, and a batch stops before it passes its byte limit.

A batch the peer did not answer at all (refused, reset, timed out) fails its calls, and at once the calls
queued behind it too: they fail over now instead of each waiting out another timeout on the same peer. A batch
answered with an error status fails only its own calls.

Queue items are typed records that know how to settle themselves: :class:`QueuedWrite` (a client write's copy)
and :class:`QueuedRead` (a key to read).
"""

from functools import partial
from typing import Callable, Dict, Optional, Tuple

from attr import attrib, attrs
from eliot import write_traceback
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

#: Calls to one peer queued together go out as one batch, up to this many.
MAX_COALESCED = 256
#: ... and up to about this many bytes of entries (``Entry.size``: a batch of large values stays well under the
#: peer's internal body limit; the calls left over follow in the next batch).
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: Batches in flight to one peer at once. Calls queued while they are in flight wait for one to come back and
#: then leave together, so a batch grows with the load. Two made smaller batches, which cost the coordinator
#: and the replicas more CPU a write, for no more writes (bench/results/HISTORY.md, run 16).
MAX_BATCHES_IN_FLIGHT = 1


class BatchError(Exception):
    """
    A batch failed, or a call queued behind an unanswered batch was failed with it.

    :ivar code: the HTTP status the peer answered, or ``None`` if it did not answer.
    """

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        Exception.__init__(self, message)
        self.code = code


class Waiter(Interface):
    """
    What a queued call settles, once: a :class:`~twisted.internet.defer.Deferred`, or a replicated write's own
    object for one copy (which spares each copy a Deferred of its own).
    """

    called = Attribute("Whether it was settled.")

    def callback(result) -> None:
        """
        The call's result.
        """

    def errback(error) -> None:
        """
        The call failed: ``error`` is an exception or a :class:`~twisted.python.failure.Failure`.
        """


@attrs(slots=True)
class QueuedWrite:
    """
    The copy of one client write, waiting for its peer's next batch.

    :ivar entry: the :class:`~kvresponder.store.Entry` to store.
    :ivar waiter: a :class:`Waiter` settled with its :class:`~kvresponder.store.ApplyResult`, or failed.
    :ivar action: its own ``peer-call`` Eliot action (debug level), finished with the batch; or ``None``.
    :ivar task_id: the Eliot task the peer's store action continues, or ``None``.
    """
    entry = attrib()
    waiter = attrib()
    action = attrib(default=None)
    task_id: Optional[bytes] = attrib(default=None)

    def size(self) -> int:
        return self.entry.size

    def succeeded(self, result) -> None:
        if self.action is not None:
            self.action.add_success_fields(code=200)
            self.action.finish()
            self.action = None
        self.waiter.callback(result)

    def failed(self, error: Exception, code: Optional[int]) -> None:
        if self.action is not None:
            if code is not None:
                # The peer answered, with an unusable status: the call itself completed.
                self.action.add_success_fields(code=code)
                self.action.finish()
            else:
                self.action.finish(error)
            self.action = None
        if not self.waiter.called:
            self.waiter.errback(error)


@attrs(slots=True)
class QueuedRead:
    """
    A key to read from a peer, waiting for its next batch of reads.

    :ivar waiter: fires with the peer's newest :class:`~kvresponder.store.Entry` of the key, or ``None``.
    """
    key: str = attrib()
    waiter: Deferred = attrib()

    def size(self) -> int:
        return 0

    def succeeded(self, entry) -> None:
        self.waiter.callback(entry)

    def failed(self, error: Exception, code: Optional[int]) -> None:
        if not self.waiter.called:
            self.waiter.errback(error)


def _not_settled(item) -> None:
    """
    Settling ``item`` with its result raised: the fault is logged and fails that call alone (if it is still
    unsettled). The other calls of its batch are settled all the same, and the calls queued behind it are not taken
    for the victims of an unanswered batch.
    """
    write_traceback()
    _fail(item, BatchError("settling the call's result failed", 200), 200)


def _fail(item, error: Exception, code: Optional[int]) -> None:
    """
    Fail one call; a fault in what it settles is logged, and keeps no other call from being failed.
    """
    try:
        item.failed(error, code)
    except Exception:
        write_traceback()


class Batcher:
    """
    :param end_of_turn: the node's :class:`~kvresponder.turn.EndOfTurn`: a queue leaves at the end of the reactor
        turn.
    :param send: ``send(peer, items)``, a Deferred firing with one result an item, in order, or failing with
        an exception whose ``code`` is the status the peer answered (``None``: it did not answer).
    :param make_error: turns a batch's failure into the exception its calls fail with.
    :param int max_items: calls a batch carries at most.
    :param max_bytes: bytes a batch carries at most, by its items' ``size()`` (one item always goes); or ``None``.
    :param int max_in_flight: batches out to one peer at once.
    """

    def __init__(self, end_of_turn, send: Callable[[object, list], Deferred],
                 make_error: Callable[[Failure], Exception] = lambda failure: BatchError(str(failure.value)),
                 max_items: int = MAX_COALESCED, max_bytes: Optional[int] = None,
                 max_in_flight: int = MAX_BATCHES_IN_FLIGHT) -> None:
        self._end_of_turn = end_of_turn
        self._send = send
        self._make_error = make_error
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight
        self._queued: Dict[Tuple[str, int], list] = {}
        self._in_flight: Dict[Tuple[str, int], int] = {}
        self._scheduled: set = set()

    def add(self, peer, item) -> None:
        """
        Queue ``item`` for ``peer`` (which has ``address`` and ``port``); it is settled when its batch is.
        """
        key = (peer.address, peer.port)
        queue = self._queued.get(key)
        if queue is None:
            queue = self._queued[key] = []
        queue.append(item)
        if self._in_flight.get(key, 0) >= self._max_in_flight:
            # It leaves when a batch out comes back (``_done``): a full queue too, or batches would pile up on a
            # slow peer, each waiting out its own timeout.
            return
        if len(queue) >= self._max_items:
            self._flush(peer, key)
        elif key not in self._scheduled:
            self._scheduled.add(key)
            self._end_of_turn.add(partial(self._scheduled_flush, peer, key))

    def _scheduled_flush(self, peer, key) -> None:
        self._scheduled.discard(key)
        self._flush(peer, key)

    def _take(self, key) -> list:
        """
        The items queued under ``key``, now one batch in flight (empty if none were queued); the batch stops
        before it passes the byte limit, and the items after it stay queued for the next.
        """
        queue = self._queued.pop(key, None) or []
        cut = min(len(queue), self._max_items)
        if self._max_bytes is not None and cut > 1:
            total = 0
            for index in range(cut):
                total += queue[index].size()
                if total > self._max_bytes and index > 0:
                    cut = index
                    break
        if cut < len(queue):
            self._queued[key] = queue[cut:]
            queue = queue[:cut]
        if queue:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return queue

    def _flush(self, peer, key) -> None:
        batch = self._take(key)
        if not batch:
            return
        try:
            d = self._send(peer, batch)
        except Exception:
            # The batch could not even be sent: fail its calls (they fail over) rather than leave them, and
            # every later call to this peer, waiting for a batch that never returns.
            d = fail()
        # One callback a batch, not one for each outcome and one for after: each costs the batch a turn of
        # the Deferred's callback loop.
        d.addBoth(self._settle, batch, peer, key)

    def _settle(self, outcome, batch: list, peer, key) -> None:
        try:
            if not isinstance(outcome, Failure):
                if isinstance(outcome, list) and len(outcome) == len(batch):
                    for item, result in zip(batch, outcome):
                        try:
                            item.succeeded(result)
                        except Exception:
                            _not_settled(item)
                    return
                outcome = Failure(BatchError("the peer answered %s for a batch of %d" % (
                    "%d results" % (len(outcome),) if isinstance(outcome, list) else "no results", len(batch)), 200))
            self._failed(outcome, batch, key)
        except Exception:
            write_traceback()
        finally:
            self._done(peer, key)

    def _failed(self, failure: Failure, batch: list, key) -> None:
        error = self._make_error(failure)
        code = getattr(failure.value, "code", None)
        for item in batch:
            _fail(item, error, code)
        if code is None:
            self._fail_queued(key, failure)

    def _fail_queued(self, key, failure: Failure) -> None:
        """
        A batch to this peer went unanswered: fail the calls queued behind it at once.
        """
        error = self._make_error(Failure(BatchError(
            "an earlier batch to this peer went unanswered (%s)" % (failure.value,))))
        for item in self._queued.pop(key, None) or []:
            _fail(item, error, None)

    def _done(self, peer, key) -> None:
        left = self._in_flight[key] - 1
        if left:
            self._in_flight[key] = left
        else:
            # Nothing kept for a peer with nothing out: a pod gets a new address at every restart.
            del self._in_flight[key]
        if self._queued.get(key) and key not in self._scheduled:
            # Calls queued while the batches were out: they go now, together.
            self._flush(peer, key)
