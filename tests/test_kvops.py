"""
``KVOperations.put_to``: the fast lane's PUT, whose answer to a replicated write comes later through ``reply``
(no Deferred), and is the same answer ``put`` gives through its Deferred.
"""

import json
import unittest
from types import SimpleNamespace

from eliot.testing import capture_logging
from twisted.internet.defer import Deferred

from kvresponder.http.api import parse_key, parse_put
from kvresponder.http.kvops import KVOperations
from kvresponder.metrics import Metrics
from kvresponder.peers import PeerError
from kvresponder.store import ApplyResult

from .test_replicated_write import coordinator, key_owned_by


def operations(answers, metrics=None):
    metrics = metrics or Metrics("t")
    node = SimpleNamespace(coordinator=coordinator(answers, metrics=metrics), metrics=metrics,
                           settings=SimpleNamespace(max_key_length=250, max_value_size=1 << 20))
    return KVOperations(node, parse_key, parse_put)


class PutToTests(unittest.TestCase):

    @capture_logging(None, encoder_=None)
    def test_a_replicated_write_answers_through_reply_once_its_copies_are_stored(self, logger):
        key = key_owned_by("n2", "n3")
        later = Deferred()
        replies = []
        ops = operations({"n2": ApplyResult(True, False), "n3": later})
        self.assertIsNone(ops.put_to(key, b'{"value": 1}', b"application/json", replies.append))
        self.assertEqual(replies, [])
        later.callback(ApplyResult(True, False))
        [(status, body, headers)] = replies
        self.assertEqual(status, 201)
        self.assertEqual(json.loads(body)["key"], key)

    @capture_logging(None, encoder_=None)
    def test_a_write_short_of_its_quorum_answers_503_through_reply(self, logger):
        replies = []
        ops = operations({"n2": PeerError("down"), "n3": PeerError("down")})
        self.assertIsNone(ops.put_to(key_owned_by("n2", "n3"), b'{"value": 1}', b"application/json",
                                     replies.append))
        [(status, body, headers)] = replies
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body)["error"], "unavailable")

    @capture_logging(None, encoder_=None)
    def test_a_result_that_cannot_be_turned_into_an_answer_is_a_bare_500(self, logger):
        class Broken(Metrics):
            def cache(self, op, result, count=1):
                if count:  # not the zero counts that set the series up
                    raise ZeroDivisionError("boom")

        replies = []
        ops = operations({"n2": ApplyResult(True, False), "n3": ApplyResult(True, False)}, metrics=Broken("t"))
        self.assertIsNone(ops.put_to(key_owned_by("n2", "n3"), b'{"value": 1}', b"application/json",
                                     replies.append))
        [(status, body, headers)] = replies
        self.assertEqual(status, 500)
        self.assertNotIn(b"boom", body)
        self.assertEqual(len(logger.flushTracebacks(ZeroDivisionError)), 1)

    @capture_logging(None, encoder_=None)
    def test_put_gives_the_same_answer_through_its_deferred(self, logger):
        key = key_owned_by("n2", "n3")
        ops = operations({"n2": ApplyResult(True, False), "n3": ApplyResult(True, False)})
        answers = []
        ops.put(key, b'{"value": 1}', b"application/json").addCallback(answers.append)
        [(status, body, headers)] = answers
        self.assertEqual((status, json.loads(body)["key"]), (201, key))


def test_a_write_answer_is_json_naming_the_version_as_format_version_does():
    """
    If a write is answered, then its body is JSON whose version is the entry's, written as ``format_version``
    writes it (for a node id with every character a node id may hold), and so is a read's.
    """
    from kvresponder.hlc import format_version
    from kvresponder.http.kvops import entry_json, written_json
    from kvresponder.store import Entry

    entry = Entry("k\"é", b'{"a": 1}', (1733349284123, 7, "Node-1_a.b"), 1733349290.5)
    written = json.loads(written_json(entry))
    assert written == {"key": "k\"é", "version": format_version(entry.version), "expires_at": 1733349290.5}
    read = json.loads(entry_json(entry))
    assert (read["version"], read["value"]) == (format_version(entry.version), {"a": 1})


def test_a_write_reply_is_given_once_however_often_its_write_settles_it():
    """
    If a write's waiter is settled again (a copy answering after the write already failed), then the client's
    answer is still given once, the first.
    """
    from kvresponder.coordinator import Unavailable
    from kvresponder.http.kvops import _WriteReply

    replies = []
    reply = _WriteReply(lambda result: ("written", result), replies.append)
    reply.errback(Unavailable("only 1 of the 2 copies needed could be stored"))
    reply.callback("late")
    reply.errback(RuntimeError("later still"))
    assert [status for status, _, _ in replies] == [503]
