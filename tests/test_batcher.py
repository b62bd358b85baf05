"""
The batcher alone (:mod:`kvresponder.batcher`), with a send function the test answers, and the copy senders'
interface (:mod:`kvresponder.copysender`).
"""

from collections import namedtuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from kvresponder.batcher import Batcher, BatchError, QueuedRead, QueuedWrite
from kvresponder.copysender import ICopySender, RequestCopySender, StreamCopySender
from kvresponder.store import ApplyResult, Entry
from kvresponder.suspects import SuspectPeers
from kvresponder.turn import EndOfTurn

Peer = namedtuple("Peer", "node_id address port")
PEER = Peer("n2", "10.0.0.2", 3000)
OTHER = Peer("n3", "10.0.0.3", 3000)


class _Sends:
    def __init__(self):
        self.batches = []

    def __call__(self, peer, items):
        d = Deferred()
        self.batches.append((items, d))
        return d


def _read(key):
    return QueuedRead(key, Deferred())


def test_calls_queued_in_one_turn_leave_together_and_later_ones_wait_for_the_batch_out():
    """
    If three reads are queued in one turn, then they leave as one batch at the turn's end; reads queued while
    it is out leave together once it is answered, each with its own result.
    """
    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_in_flight=1)
    first = [_read(k) for k in "abc"]
    for item in first:
        batcher.add(PEER, item)
    assert sends.batches == []
    clock.advance(0)
    assert [[i.key for i in items] for items, _ in sends.batches] == [["a", "b", "c"]]
    later = [_read(k) for k in "de"]
    for item in later:
        batcher.add(PEER, item)
    clock.advance(0)
    assert len(sends.batches) == 1
    sends.batches[0][1].callback(["A", None, "C"])
    assert [item.waiter.result for item in first] == ["A", None, "C"]
    assert [[i.key for i in items] for items, _ in sends.batches[1:]] == [["d", "e"]]


def test_a_turns_batch_leaves_from_the_end_of_turn_it_shares_with_other_writers_on_one_timer():
    """
    If the node's end of turn already holds other work (the HTTP answers of the turn), then calls queued in that
    turn add no timer of their own: they leave from the same end of turn, after the work handed over before them.
    """
    clock, sends = Clock(), _Sends()
    turn = EndOfTurn(clock)
    ran = []
    turn.add(lambda: ran.append(len(sends.batches)))
    batcher = Batcher(turn, sends)
    batcher.add(PEER, _read("a"))
    batcher.add(OTHER, _read("b"))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert ran == [0] and [[i.key for i in items] for items, _ in sends.batches] == [["a"], ["b"]]


def test_with_two_batches_allowed_out_a_second_leaves_while_the_first_is_out_and_a_third_waits():
    """
    If two batches to a peer may be out at once, then calls queued while one is out leave at the end of their
    turn as a second batch, and calls queued while both are out wait for one of them and then leave together.
    """
    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_in_flight=2)
    for keys in ("a", "b", "cd"):
        for key in keys:
            batcher.add(PEER, _read(key))
        clock.advance(0)
    assert [[i.key for i in items] for items, _ in sends.batches] == [["a"], ["b"]]
    sends.batches[1][1].callback(["B"])
    assert [[i.key for i in items] for items, _ in sends.batches] == [["a"], ["b"], ["c", "d"]]


def test_a_full_queue_leaves_at_once_and_a_batch_stops_at_its_byte_limit():
    """
    If a queue reaches its item limit, then it leaves without waiting for the turn's end; and a batch stops
    before the item that would pass the byte limit, which follows in the next batch.
    """
    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_items=2, max_bytes=250)
    for key in "ab":
        batcher.add(PEER, _read(key))
    assert len(sends.batches) == 1
    sends.batches[0][1].callback([None, None])
    big = [QueuedWrite(Entry("k%d" % i, b"x" * 10, (1, 0, "n1")), Deferred()) for i in range(2)]
    batcher = Batcher(EndOfTurn(clock), sends, max_bytes=250)
    for item in big:
        batcher.add(PEER, item)
    clock.advance(0)
    assert [len(items) for items, _ in sends.batches[1:]] == [1]
    sends.batches[1][1].callback([ApplyResult(True, False)])
    assert [len(items) for items, _ in sends.batches[2:]] == [1]


def test_a_queue_that_fills_while_a_batch_is_out_waits_for_it_and_leaves_in_full_batches():
    """
    If a queue passes its item limit while a batch to that peer is out, then no other batch leaves until that one
    comes back (batches piled on a slow peer would each wait out their own timeout), and the queue then leaves in
    batches of at most the limit, one at a time.
    """
    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_items=4, max_in_flight=1)
    batcher.add(PEER, _read("first"))
    clock.advance(0)
    queued = [_read("k%d" % (index,)) for index in range(10)]
    for item in queued:
        batcher.add(PEER, item)
    clock.advance(0)
    assert [len(items) for items, _ in sends.batches] == [1]
    sends.batches[0][1].callback([None])
    assert [len(items) for items, _ in sends.batches] == [1, 4]
    sends.batches[1][1].callback([None] * 4)
    sends.batches[2][1].callback([None] * 4)
    assert [len(items) for items, _ in sends.batches] == [1, 4, 4, 2]
    assert [item.key for items, _ in sends.batches[1:] for item in items] == [item.key for item in queued]


def test_an_item_over_the_byte_limit_queued_first_leaves_alone_and_the_one_behind_it_follows():
    """
    If the first call queued for a peer is larger than the byte limit by itself and a small one is queued behind
    it, then the large one leaves alone in its batch and the small one follows when that batch returns: the
    queue does not stall, with both calls waiting forever.
    """
    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_bytes=250)
    large = QueuedWrite(Entry("large", b"x" * 300, (1, 0, "n1")), Deferred())
    small = QueuedWrite(Entry("small", b"x", (1, 0, "n1")), Deferred())
    batcher.add(PEER, large)
    batcher.add(PEER, small)
    clock.advance(0)
    assert [[i.entry.key for i in items] for items, _ in sends.batches] == [["large"]]
    sends.batches[0][1].callback([ApplyResult(True, False)])
    assert [[i.entry.key for i in items] for items, _ in sends.batches[1:]] == [["small"]]
    sends.batches[1][1].callback([ApplyResult(True, False)])
    assert large.waiter.result.applied and small.waiter.result.applied


def test_an_unanswered_batch_fails_the_calls_queued_behind_it_and_an_error_status_does_not():
    """
    If a batch is not answered at all, then its calls and those queued behind it fail at once; if it is
    answered with an error status, then only its own calls fail and the queued ones are sent.
    """
    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_in_flight=1)
    sent, queued = _read("a"), _read("b")
    batcher.add(PEER, sent)
    clock.advance(0)
    batcher.add(PEER, queued)
    sends.batches[0][1].errback(ConnectionError("refused"))
    errors = []
    for item in (sent, queued):
        item.waiter.addErrback(lambda failure: errors.append(failure.check(BatchError)))
    assert errors == [BatchError, BatchError] and len(sends.batches) == 1

    sent, queued = _read("c"), _read("d")
    batcher.add(PEER, sent)
    clock.advance(0)
    batcher.add(PEER, queued)
    sends.batches[1][1].errback(BatchError("answered 503", 503))
    sent.waiter.addErrback(lambda failure: None)
    assert [[i.key for i in items] for items, _ in sends.batches[2:]] == [["d"]]


def test_an_answer_of_the_wrong_length_fails_the_batch_but_not_the_queue():
    """
    If the peer answers a batch with fewer results than calls, then the batch's calls fail (the peer is up:
    the calls queued behind it still go).
    """
    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_in_flight=1)
    items = [_read("a"), _read("b")]
    for item in items:
        batcher.add(PEER, item)
    clock.advance(0)
    queued = _read("c")
    batcher.add(PEER, queued)
    sends.batches[0][1].callback(["only one"])
    failed = []
    for item in items:
        item.waiter.addErrback(lambda failure: failed.append(failure.check(BatchError)))
    assert failed == [BatchError, BatchError]
    assert [[i.key for i in batch] for batch, _ in sends.batches[1:]] == [["c"]]


def test_a_send_that_raises_fails_its_batch_and_frees_the_peer():
    """
    If sending a batch raises, then its calls fail instead of waiting forever, and later calls still go.
    """
    clock = Clock()
    calls = []

    def send(peer, items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("cannot encode")
        return succeed([None] * len(items))
    batcher = Batcher(EndOfTurn(clock), send, max_in_flight=1)
    broken = _read("a")
    batcher.add(PEER, broken)
    clock.advance(0)
    broken.waiter.addErrback(lambda failure: calls.append("failed"))
    later = _read("b")
    batcher.add(PEER, later)
    clock.advance(0)
    assert later.waiter.result is None and "failed" in calls


def test_both_copy_senders_provide_the_one_interface():
    """
    If a copy sender is built, then it provides ``ICopySender``, whether it sends requests or frames.
    """
    requests = RequestCopySender(transport=None, wall=lambda: 0.0)
    assert verifyObject(ICopySender, requests)
    assert verifyObject(ICopySender, StreamCopySender(None, requests, Clock(), None, 1.0, SuspectPeers(Clock())))


class _ImmediateTurn:
    """An end of turn that runs what it is given at once."""

    def add(self, call):
        call()


def test_a_batcher_keeps_nothing_for_peers_whose_batches_are_all_answered():
    """
    If 5000 peer addresses (pods get a new one at each restart) have each had a batch answered, then the
    batcher holds no state for any of them: a long-lived node's memory does not grow with its peers' restarts.
    """
    from types import SimpleNamespace

    batcher = Batcher(_ImmediateTurn(), lambda peer, items: succeed([None] * len(items)))
    for index in range(5000):
        peer = SimpleNamespace(node_id="n", address="10.%d.%d.%d" % (index >> 16, (index >> 8) & 255, index & 255),
                               port=3000)
        batcher.add(peer, QueuedRead("k", Deferred()))
    assert len(batcher._in_flight) + len(batcher._queued) == 0, len(batcher._in_flight)


class _BrokenWaiter:
    """A waiter whose settling raises: a fault in whatever a queued call settles (on its result, or on both)."""

    called = False

    def __init__(self, on_failure_too: bool = True) -> None:
        self.on_failure_too = on_failure_too
        self.failed_with = None

    def callback(self, result):
        raise RuntimeError("the waiter broke")

    def errback(self, error):
        if self.on_failure_too:
            raise RuntimeError("the waiter broke again")
        self.called, self.failed_with = True, error


def _answered_with_faults(first_waiter):
    """
    A batch of a call settling ``first_waiter`` and a plain read, answered while a third read waits behind it:
    the three calls and the Eliot messages logged while the answer was settled.
    """
    from eliot import add_destinations, remove_destination

    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_in_flight=1)
    calls = [QueuedRead("a", first_waiter), _read("b")]
    for call in calls:
        batcher.add(PEER, call)
    clock.advance(0)
    later = _read("c")
    batcher.add(PEER, later)
    clock.advance(0)
    assert len(sends.batches) == 1
    messages = []
    add_destinations(messages.append)
    try:
        sends.batches[0][1].callback(["A", "B"])
    finally:
        remove_destination(messages.append)
    assert [[i.key for i in items] for items, _ in sends.batches[1:]] == [["c"]]
    sends.batches[1][1].callback(["C"])
    # The waiters' own errors: a test before this one may leave a traceback of its own to be logged meanwhile
    # (a Deferred's unhandled failure, logged when it is collected).
    return calls + [later], [message["reason"] for message in messages
                             if message.get("message_type") == "eliot:traceback"
                             and "the waiter broke" in str(message.get("reason"))]


def test_a_call_whose_result_fails_to_settle_fails_alone_and_the_calls_behind_its_batch_still_get_theirs():
    """
    If settling one call of an answered batch raises (its waiter breaks on its result), then the error is logged
    and that call fails with a ``BatchError``; the batch's other call gets its result, and the call queued behind
    the batch leaves once it is answered and gets its own: the peer answered, so nothing is taken for the victim
    of an unanswered batch.
    """
    (broken, other, later), tracebacks = _answered_with_faults(_BrokenWaiter(on_failure_too=False))
    assert tracebacks == ["the waiter broke"]
    assert isinstance(broken.waiter.failed_with, BatchError)
    assert other.waiter.result == "B"
    assert later.waiter.result == "C"


def test_a_call_that_fails_to_settle_either_way_is_logged_and_keeps_nothing_else_waiting():
    """
    If a call's waiter breaks on its result and again on the failure that follows, then both errors are logged,
    and the batch's other call and the call queued behind the batch still get their results.
    """
    (_, other, later), tracebacks = _answered_with_faults(_BrokenWaiter())
    assert tracebacks == ["the waiter broke", "the waiter broke again"]
    assert other.waiter.result == "B"
    assert later.waiter.result == "C"


def test_an_answer_that_is_no_list_of_results_fails_the_batchs_calls_and_frees_the_peer():
    """
    If a batch's send gives something other than one result a call (here ``None``), then its calls fail with a
    ``BatchError`` saying so rather than wait for ever, and the calls queued behind it still leave and get theirs.
    """
    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends, max_in_flight=1)
    first = _read("a")
    batcher.add(PEER, first)
    clock.advance(0)
    later = _read("b")
    batcher.add(PEER, later)
    sends.batches[0][1].callback(None)
    failures = []
    first.waiter.addErrback(failures.append)
    assert "no results" in str(failures[0].value)
    assert [[i.key for i in items] for items, _ in sends.batches[1:]] == [["b"]]
    sends.batches[1][1].callback(["B"])
    assert later.waiter.result == "B"


def test_a_call_that_breaks_when_failed_keeps_no_other_call_of_its_batch_waiting():
    """
    If a batch fails and failing one of its calls raises (its waiter breaks), then the error is logged and the
    batch's other calls fail all the same.
    """
    from eliot import add_destinations, remove_destination

    clock, sends = Clock(), _Sends()
    batcher = Batcher(EndOfTurn(clock), sends)
    other = _read("b")
    batcher.add(PEER, QueuedRead("a", _BrokenWaiter()))
    batcher.add(PEER, other)
    clock.advance(0)
    messages = []
    add_destinations(messages.append)
    try:
        sends.batches[0][1].errback(BatchError("the peer answered 500", 500))
    finally:
        remove_destination(messages.append)
    failures = []
    other.waiter.addErrback(failures.append)
    assert isinstance(failures[0].value, BatchError)
    assert [message["reason"] for message in messages if message.get("message_type") == "eliot:traceback"
            and "the waiter broke" in str(message.get("reason"))] == ["the waiter broke again"]
