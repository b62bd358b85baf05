"""
The bulk write's shorter ways (issue 18: a 1000-entry bulk PUT at 200k keys/s on one node): the parse of each put,
the answer built as bytes, the metrics counted once a batch, and a node alone in its ring applying the batch
without a fan-out. Each gives what the general way gives.
"""

import json
import unittest

import pytest

from eliot.testing import LoggedAction, capture_logging
from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet.task import Clock

from kvresponder.coordinator import Coordinator, Unavailable, WriteResult
from kvresponder.hlc import HybridLogicalClock
from kvresponder.http.api import parse_bulk_put, parse_write, validate_key
from kvresponder.http.errors import APIError, too_large
from kvresponder.http.site import json_bytes
from kvresponder.log import LogPolicy
from kvresponder.log.store import STORE_APPLY_BATCH
from kvresponder.metrics import Metrics
from kvresponder.ring import HashRing
from kvresponder.store import Entry, EntryTooLarge, Store

from .test_api import API
from .test_replicated_write import outcome


# -- the parse of one put ---------------------------------------------------------------------------

def general_parse(item, limit, check_fits):
    """
    How a bulk put was parsed before its shorter way: validate_key, parse_write of the rest, check_fits.
    """
    if not isinstance(item, dict) or "key" not in item:
        raise APIError(400, "invalid_body", "Each put is {\"key\", \"value\", \"ttl\"}.")
    key = validate_key(item["key"], limit)
    value, ttl = parse_write({k: v for k, v in item.items() if k != "key"}, put_of_bulk=True)
    try:
        check_fits(key, value, ttl)
    except EntryTooLarge:
        raise too_large("An entry is larger than the whole memory budget.")
    return key, value, ttl


def answer_of(parse, item, limit, check_fits):
    try:
        return "ok", parse(item, limit, check_fits)
    except APIError as error:
        return "error", error.status, error.code, error.message


# Strings that each take a different way, or should: plain printable ASCII, what JSON escapes (a quote, a
# backslash, control characters, DEL), non-ASCII, a lone surrogate, the empty string, a key past the limit.
_strings = (st.sampled_from(["", "plain", 'quo"te', "back\\slash", "tab\there", "del\x7f", "é", "\ud800", "k" * 11])
            | st.text(max_size=12) | st.text(alphabet=st.characters(max_codepoint=127), max_size=12))
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _strings,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)
_ttls = st.none() | st.booleans() | st.integers(-5, 10 ** 9) | st.floats() | st.text(max_size=3)


@st.composite
def bulk_puts(draw):
    if draw(st.integers(0, 19)) == 0:
        return draw(st.none() | st.integers() | _strings | st.lists(_strings, max_size=2))
    item = {}
    if draw(st.integers(0, 9)):
        item["key"] = draw(_strings | st.integers() | st.none())
    if draw(st.integers(0, 9)):
        # Mostly a string, the common value.
        item["value"] = draw(_strings if draw(st.booleans()) else _values)
    if draw(st.integers(0, 3)) == 0:
        item["ttl"] = draw(_ttls)
    if draw(st.integers(0, 9)) == 0:
        item[draw(st.sampled_from(["extra", "Value", "ttl"]))] = draw(_values)
    return item


@hsettings(max_examples=1000, deadline=None)
@given(bulk_puts())
def test_if_a_bulk_put_takes_the_short_way_then_it_parses_as_the_general_way_does(item):
    """
    If a put of a bulk body is parsed, then its key, serialized value and TTL, or its error (status, code and
    message), are those validate_key, parse_write and check_fits give, whichever way it took.
    """
    check_fits = Store(lambda: 0.0, 330).check_fits  # a small budget: some values do not fit
    assert answer_of(parse_bulk_put, item, 10, check_fits) == answer_of(general_parse, item, 10, check_fits)


_TRICKY = ["", "plain", "v" * 98, 'quo"te', "back\\slash", "tab\there", "del\x7f", "nul\x00", "\u2028", "é",
           "\ud800", "k" * 11, "new\nline", "\x1f"]


@pytest.mark.parametrize("text", _TRICKY)
def test_if_a_bulk_put_holds_a_string_that_needs_escaping_then_it_parses_as_the_general_way_does(text):
    """
    If a put's value or key is a string that JSON escapes, or that is not ASCII, or not a valid key, then the
    put parses (or fails) as validate_key, parse_write and check_fits would have it.
    """
    check_fits = Store(lambda: 0.0, 330).check_fits
    for item in ({"key": "k", "value": text}, {"value": text, "key": text}, {"key": text, "value": [text]},
                 {"key": "k", "value": text, "ttl": 5}):
        assert answer_of(parse_bulk_put, item, 10, check_fits) == answer_of(general_parse, item, 10, check_fits)


def test_if_a_bulk_put_is_an_ascii_key_and_a_plain_string_then_its_value_is_the_string_quoted():
    """
    If a put is the common one, an ASCII key and a printable ASCII string, then the stored value is that
    string's JSON: the string in quotes.
    """
    check_fits = Store(lambda: 0.0, 1 << 20).check_fits
    assert parse_bulk_put({"key": "k1", "value": "v" * 98}, 250, check_fits) == ("k1", b'"' + b"v" * 98 + b'"',
                                                                                 None)
    assert parse_bulk_put({"value": "a'b c", "key": "k"}, 250, check_fits) == ("k", b"\"a'b c\"", None)


# -- the answer and the metrics, through the API ------------------------------------------------------

def test_if_a_bulk_answer_is_built_as_bytes_then_they_are_those_the_json_encoder_gives():
    """
    If a bulk request puts, gets and deletes keys that need escaping in JSON (quotes, backslashes, control
    characters, non-ASCII), then its answer is, byte for byte, what the JSON encoder gives for the same
    answer, and each key has its own status.
    """
    api = API()
    odd = ['quo"te', "back\\slash", "tab\tkey", "é", "\u2028", "plain", "del\x7f"]
    api.put("plain", 1)
    response, raw = api.raw("POST", "/t1/bulk", json.dumps({
        "put": [{"key": key, "value": {"k": key}} for key in odd],
        "get": odd + ["absent"], "delete": ["absent", "é"]}).encode(), {"Content-Type": "application/json"})
    assert response.code == 200, raw
    answer = json.loads(raw)
    assert raw == json_bytes(answer)
    assert [(put["key"], put["status"]) for put in answer["put"]] == [
        (key, 200 if key == "plain" else 201) for key in odd]
    assert all(put["version"].endswith(".n1") for put in answer["put"])
    assert answer["get"]["plain"]["value"] == 1 and answer["get"]["absent"] is None
    assert answer["delete"] == [{"key": "absent", "status": 404}, {"key": "é", "status": 200}]


def test_if_a_bulk_request_is_served_then_its_cache_operations_are_counted_by_outcome():
    """
    If a bulk request creates three keys, replaces two, reads one present and two absent keys and deletes
    one present and one absent key, then the cache metric counts each outcome that many times, and no
    outcome that did not occur.
    """
    api = API()
    for key in ("a", "b"):
        api.put(key, 0)
    code, body, _ = api.call("POST", "/bulk", {
        "get": ["a", "x", "y"], "delete": ["b", "z"],
        "put": [{"key": key, "value": 1} for key in ("a", "b", "c", "d", "e")]})
    assert code == 200, body
    text = api.raw("GET", "/t1/metrics")[1].decode()
    counts = {line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("kv_cache_operations_total{")}
    assert counts == {
        'op="put",result="created",tenant="t1"': 2 + 3,  # the two puts of api.put first
        'op="put",result="replaced",tenant="t1"': 2,
        'op="get",result="hit",tenant="t1"': 1,
        'op="get",result="miss",tenant="t1"': 2,
        'op="delete",result="deleted",tenant="t1"': 1,
        'op="delete",result="miss",tenant="t1"': 1}


def test_if_a_bulk_put_holds_a_value_over_max_value_size_then_nothing_is_stored_and_the_answer_is_413():
    """
    A bulk request may be 8 times MAX_VALUE_SIZE, but none of its values may be larger than a single PUT could
    store: one that is refuses the whole request, as any bad item does, and nothing changes.
    """
    api = API(max_value_size="1Ki")
    api.put("kept", "old")
    fits = {"key": "fits", "value": "v" * 1000}
    code, body, _ = api.call("POST", "/bulk", {"put": [fits, {"key": "kept", "value": "v" * 1100}]})
    assert code == 413 and body["error"] == "payload_too_large", body
    assert "MAX_VALUE_SIZE" in body["message"]
    assert api.call("GET", "/kv/fits")[0] == 404
    assert api.call("GET", "/kv/kept")[1]["value"] == "old"
    code, body, _ = api.call("POST", "/bulk", {"put": [fits]})
    assert code == 200 and [(put["key"], put["status"]) for put in body["put"]] == [("fits", 201)], body


def test_a_bulk_get_answers_at_most_8_times_max_value_size_of_entries_and_the_rest_answer_too_large():
    """
    If a bulk get finds more than 8 x MAX_VALUE_SIZE of entries, then the answer carries the entries up to that
    size, in the order asked, and each key after it answers {"error": "answer_too_large"}, absent or not (it is
    not read: an answer is held whole until its client reads it, and reading 1000 of the largest values would
    copy them all before any limit applied); a miss before the limit is null as usual.
    """
    api = API(max_value_size="1Ki")
    keys = ["big%02d" % (index,) for index in range(20)]
    for key in keys:
        api.put(key, "v" * 900)
    code, body, _ = api.call("POST", "/bulk", {"get": ["absent"] + keys + ["absent-too"]})
    assert code == 200, body
    assert body["get"]["absent"] is None
    answers = [body["get"][key] for key in keys]
    whole = [index for index, answer in enumerate(answers) if answer.get("value") == "v" * 900]
    refused = [index for index, answer in enumerate(answers) if answer == {"error": "answer_too_large"}]
    assert whole == list(range(len(whole))) and refused == list(range(len(whole), len(keys))), answers
    assert 6 <= len(whole) <= 8, len(whole)
    assert body["get"]["absent-too"] == {"error": "answer_too_large"}
    assert sum(len(json.dumps(answers[index])) for index in whole) <= 8 * 1024
    # Each one on its own is read as usual.
    assert api.call("GET", "/kv/" + keys[-1])[1]["value"] == "v" * 900


def test_a_bulk_get_of_small_values_reads_every_key_in_at_most_two_reads():
    """
    If a bulk get asks for many keys of small values, then every key is answered (hit or null), read in at most
    two calls to the coordinator: the slices that keep a bulk get of large values within its limit cost a
    bulk get of small values one more read at most.
    """
    api = API()
    for index in range(300):
        api.put("s%03d" % (index,), index)
    coordinator = api.node.coordinator
    calls = []
    read_many = coordinator.read_many

    async def counted(keys):
        calls.append(len(keys))
        return await read_many(keys)
    coordinator.read_many = counted
    code, body, _ = api.call("POST", "/bulk", {"get": ["s%03d" % (index,) for index in range(300)] + ["none"]})
    assert code == 200
    assert [body["get"]["s%03d" % (index,)]["value"] for index in range(300)] == list(range(300))
    assert body["get"]["none"] is None
    assert len(calls) <= 2 and sum(calls) == 301, calls


# -- a node alone in its ring ---------------------------------------------------------------------------

class _NoPeers:
    def apply(self, peer, entries):
        raise AssertionError("a node alone sent a copy")

    apply_coalesced = send_copy = apply


def alone(write_quorum=None, store=None) -> Coordinator:
    clock = Clock()
    clock.advance(1000)
    return Coordinator(store or Store(clock.seconds, 1 << 24), HybridLogicalClock(clock.seconds, "n1"),
                       lambda: HashRing(["n1"]), lambda node: None, _NoPeers(), replicas=2,
                       write_quorum=write_quorum, seconds=clock.seconds, metrics=Metrics("t"),
                       log_policy=LogPolicy("info"))


def replication_counts(c: Coordinator) -> dict:
    return {labels: value for labels, value in c._metrics._stats.replication.items() if value}


class AloneTests(unittest.TestCase):

    @capture_logging(None, encoder_=None)
    def test_if_a_node_alone_takes_a_bulk_write_then_it_stores_it_in_one_batch_action(self, logger):
        """
        If a node alone in its ring takes a bulk write, then every entry is stored with one copy, created or
        replaced as the store held it, in one ``store:apply-batch`` action, and the copies are counted once.
        """
        c = alone()
        c.store.apply(Entry("k0", b'"old"', (1, 0, "n1")))
        results = outcome(c.put_many([("k%d" % i, b'"v"', None) for i in range(5)]))
        self.assertEqual([(type(r), r.created, r.copies) for r in results],
                         [(WriteResult, i != 0, 1) for i in range(5)])
        self.assertEqual(len({r.entry.version for r in results}), 5)
        self.assertEqual([c.store.get("k%d" % i).value for i in range(5)], [b'"v"'] * 5)
        [batch] = LoggedAction.ofType(logger.messages, STORE_APPLY_BATCH)
        self.assertEqual((batch.startMessage["count"], batch.endMessage["applied"]), (5, 5))
        self.assertEqual(replication_counts(c), {("put", "success"): 5})

    def test_if_a_node_alone_holds_a_newer_version_then_a_bulk_write_is_stamped_above_it(self):
        """
        If the store of a node alone holds a version of a key ahead of its clock (written by a node whose
        clock ran ahead), then a bulk write of that key is stamped again above it and wins, and reports the
        key as replaced.
        """
        c = alone()
        ahead = (c.hlc.now()[0] + 3600 * 1000, 0, "n9")
        c.store.apply(Entry("k", b'"future"', ahead))
        [result, other] = outcome(c.put_many([("k", b'"now"', None), ("j", b'"x"', None)]))
        self.assertGreater(result.entry.version, ahead)
        self.assertEqual((result.created, result.copies), (False, 1))
        self.assertEqual(c.store.get("k").value, b'"now"')
        self.assertEqual((other.created, c.store.get("j").value), (True, b'"x"'))
        # One batch, then the one entry again.
        self.assertEqual(replication_counts(c), {("put", "success"): 3})

    @capture_logging(None, encoder_=None)
    def test_if_the_store_of_a_node_alone_fails_then_each_entry_is_unavailable(self, logger):
        """
        If applying a bulk write fails in an unexpected way on a node alone, then each entry is answered
        ``Unavailable``, the failure is logged with its traceback and counted as a failed copy.
        """
        c = alone()

        def broken(entries):
            raise RuntimeError("disk on fire")
        c.store.apply = c.store.apply_many = broken
        results = outcome(c.put_many([("a", b"1", None), ("b", b"2", None)]))
        self.assertEqual([type(r) for r in results], [Unavailable, Unavailable])
        self.assertEqual(str(results[0]), "only 0 of the 1 copies needed could be stored")
        self.assertEqual(len(logger.flushTracebacks(RuntimeError)), 1)
        self.assertEqual(replication_counts(c), {("put", "failure"): 2})

    def test_if_a_node_alone_needs_two_copies_then_a_bulk_write_is_unavailable(self):
        """
        If a node alone is told to acknowledge a write only with two copies (WRITE_QUORUM=2), then a bulk
        write is answered ``Unavailable`` for each entry, as a single write is.
        """
        c = alone(write_quorum=2)
        results = outcome(c.put_many([("a", b"1", None), ("b", b"2", None)]))
        self.assertEqual([type(r) for r in results], [Unavailable, Unavailable])
        self.assertEqual(str(results[0]), "only 1 of the 2 copies needed could be stored")


def test_if_a_bulk_put_holds_a_value_nested_deeper_than_a_put_may_then_nothing_is_stored():
    """
    A bulk put's value may nest as deep as a single PUT's, MAX_VALUE_DEPTH levels, and no deeper: the parser's
    own recursion limit let bulk values of 600 to 980 levels through.
    """
    from kvresponder.http.api import MAX_VALUE_DEPTH
    api = API()
    deepest = "[" * MAX_VALUE_DEPTH + "]" * MAX_VALUE_DEPTH
    code, body, _ = api.call("POST", "/bulk", raw_body=(
        '{"put": [{"key": "ok", "value": 1}, {"key": "deep", "value": [%s]}]}' % (deepest,)).encode(),
        headers={"Content-Type": "application/json"})
    assert code == 400 and body["error"] == "invalid_json" and "nested deeper" in body["message"], body
    assert api.call("GET", "/kv/ok")[0] == 404
    code, body, _ = api.call("POST", "/bulk", raw_body=(
        '{"put": [{"key": "deep", "value": %s}]}' % (deepest,)).encode(), headers={"Content-Type": "application/json"})
    assert code == 200, body
    assert api.call("GET", "/kv/deep")[1]["value"] == json.loads(deepest)
