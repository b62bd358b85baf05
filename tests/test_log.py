"""
The logging module's own pieces: fast task ids and the JSON line destination.
"""

import io
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from eliot import add_destinations as eliot_add, remove_destination as eliot_remove, start_action

from kvresponder.log import (WARNING, JSONLineDestination, LogPolicy, UnknownLevel, canonical_level,
                             fast_task_uuid, use_fast_task_ids)


def test_fast_task_uuids_are_version_4_uuids_in_canonical_text():
    for _ in range(1000):
        text = fast_task_uuid()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_fast_task_uuids_do_not_repeat():
    ids = {fast_task_uuid() for _ in range(100000)}
    assert len(ids) == 100000


def _ids_of_a_new_process() -> str:
    code = "from kvresponder.log import fast_task_uuid as f; print(f()); print(f())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                          env=dict(os.environ, PYTHONPATH=root)).stdout.split()


def test_two_processes_draw_task_uuids_of_their_own():
    """
    If two processes each take task ids, then neither the part each draws at start nor the count each starts
    from is the other's.
    """
    first, second = _ids_of_a_new_process(), _ids_of_a_new_process()
    assert first[0] != first[1]
    assert first[0][:8] != second[0][:8]
    assert first[0][24:] != second[0][24:]


def test_a_forked_child_does_not_repeat_its_parents_task_uuids():
    """
    If the process forks, then the child's task ids have a random part of their own, not the parent's.
    """
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.write(writing, fast_task_uuid().encode("ascii"))
        finally:
            os._exit(0)
    os.close(writing)
    os.waitpid(child, 0)
    childs = os.read(reading, 64).decode("ascii")
    os.close(reading)
    parents = fast_task_uuid()
    assert uuid.UUID(childs).version == 4
    assert childs[:23] != parents[:23]


def test_fast_task_ids_name_new_eliot_tasks():
    """
    Once turned on, new top-level actions' task_uuids come from fast_task_uuid (one process's share its random
    prefix and count on), and still parse as UUIDs.
    """
    from kvresponder.privateapi import set_task_uuid_factory

    use_fast_task_ids()
    try:
        tasks = []
        for _ in range(2):
            with start_action(action_type="test:fast-ids") as action:
                tasks.append(action.task_uuid)
    finally:
        # Eliot's own: str(uuid4()) of each task.
        set_task_uuid_factory(uuid.uuid4)
    # One random prefix (24 characters), then the count: two uuid4s would differ from their first character on.
    assert tasks[0][:24] == tasks[1][:24] and tasks[0] != tasks[1], tasks
    for task in tasks:
        uuid.UUID(task)


def test_destination_writes_one_stamped_json_object_a_line():
    stream = io.StringIO()
    destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1", flush=False)
    destination({"message_type": "test:hello", "value": b"bytes", "when": 1.5})
    destination({"message_type": "test:again"})
    destination.flush()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"message_type": "test:hello", "value": "bytes", "when": 1.5, "tenant": "t1", "node": "n1"},
        {"message_type": "test:again", "tenant": "t1", "node": "n1"},
    ]


def test_a_buffered_destination_holds_lines_until_it_is_flushed():
    stream = io.BytesIO()
    destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1", flush=False)
    destination({"message_type": "test:first", "text": "caf\u00e9"})
    destination({"message_type": "test:second"})
    assert stream.getvalue() == b""
    destination.flush()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message_type"] for line in lines] == ["test:first", "test:second"]
    assert json.loads(lines[0])["text"] == "caf\u00e9"


def test_a_buffered_destination_writes_out_once_it_holds_enough_lines():
    from kvresponder.log import PENDING_LINES

    stream = io.BytesIO()
    destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1", flush=False)
    for index in range(PENDING_LINES + 3):
        destination({"message_type": "test:many", "index": index})
    written = [json.loads(line)["index"] for line in stream.getvalue().splitlines()]
    assert written == list(range(PENDING_LINES))
    destination.flush()
    assert [json.loads(line)["index"] for line in stream.getvalue().splitlines()] == list(range(PENDING_LINES + 3))


def test_an_unbuffered_destination_writes_each_line_at_once():
    stream = io.BytesIO()
    destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1", flush=True)
    destination({"message_type": "test:now"})
    assert json.loads(stream.getvalue())["message_type"] == "test:now"


def test_timestamps_are_written_to_the_microsecond_and_the_message_is_left_as_it_came():
    stream = io.StringIO()
    destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1", flush=False)
    message = {"message_type": "test:timed", "timestamp": 1795725297.3504536, "task_level": [1]}
    destination(message)
    destination({"timestamp": 1700000000.0000004})
    destination.flush()
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first == {"message_type": "test:timed", "timestamp": 1795725297.350453, "task_level": [1],
                     "tenant": "t1", "node": "n1"}
    assert second == {"timestamp": 1700000000.0, "tenant": "t1", "node": "n1"}
    assert message == {"message_type": "test:timed", "timestamp": 1795725297.3504536, "task_level": [1]}


def test_a_policy_takes_levels_in_any_letter_case_and_warn_as_warning():
    """
    If a policy is given ``warn`` or ``WARN`` (the seed's name), then it runs at warning; an unknown name or a
    non-string is refused.
    """
    policy = LogPolicy("WARN")
    assert set(policy.levels().values()) == {"warning"}
    assert policy.enabled("http", WARNING) and not policy.enabled("http", WARNING - 10)
    policy.set_area("store", "Debug")
    assert policy.levels()["store"] == "debug"
    assert [canonical_level(name) for name in ("warn", "Warning", "ERROR", "warnings", "", None, 30)] == [
        "warning", "warning", "error", None, None, None, None]
    for bad in ("warnings", 30):
        try:
            policy.set_all(bad)
        except UnknownLevel:
            pass
        else:
            raise AssertionError("%r was taken as a level" % (bad,))


def test_log_lines_encode_every_kind_of_field_value_as_the_json_encoder_does():
    """
    If a message holds text that needs escaping (quotes, backslashes, control characters, non-ASCII, lone
    surrogates), numbers, booleans, null, lists and nested objects, then its line decodes to the same
    message, in ASCII: the quick path for plain fields and the general encoder agree.
    """
    stream = io.BytesIO()
    destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1", flush=True)
    message = {
        "message_type": "x:y", "plain": "k1", "quote": 'a"b', "backslash": "a\\b", "control": "a\nb\x00\x7f",
        "unicode": "clé ☃", "surrogate": "\ud800", "int": 7, "big": 2 ** 70, "negative": -3, "float": 0.1,
        "true": True, "false": False, "none": None, "levels": [1, 2, 3], "mixed": [1, "a"], "empty": [],
        "nested": {"a": [1, {"b": None}]}, "bytes": b"raw", 'name "quoted"': 1, "ключ": "v",
    }
    destination(dict(message))
    line = stream.getvalue()
    assert line.isascii()
    decoded = json.loads(line)
    expected = dict(message, bytes="raw", tenant="t1", node="n1")
    assert decoded == expected
    # The general encoder's output for the same message, field for field.
    assert line.decode("ascii").rstrip("\n") == json.dumps(expected)


def test_the_flat_encoder_writes_what_the_json_encoder_writes():
    """
    If the quick encoder (PyPy's) is given a message of every kind of value, then its text is the JSON
    encoder's, character for character.
    """
    from kvresponder.log import _FlatEncoder, _fallback
    general = json.JSONEncoder(default=_fallback, check_circular=False).encode
    encode = _FlatEncoder(general).encode
    message = {"plain": "k1", "quote": 'a"b', "control": "a\nb\x7f", "unicode": "clé", "int": 7, "big": 2 ** 70,
               "float": 0.1, "true": True, "none": None, "levels": [1, 2], "mixed": [1, "a"], "nested": {"a": [1]},
               "bytes": b"raw", 'na"me': 1, "ключ": "v", "subclass": IntFlagLike(3)}
    for _ in range(2):  # the second time with the field names cached
        assert encode(message) == general(message)
    assert encode([1, 2]) == general([1, 2])
    assert encode({1: "a"}) == general({1: "a"})


class IntFlagLike(int):
    def __repr__(self) -> str:
        return "flag"


def test_a_message_outside_any_action_is_the_one_message_of_its_own_task():
    """
    If ``emit`` logs a message outside any action, then it carries its type, a time, a new task id and
    task level [1]; inside an action, it belongs to that action's task.
    """
    from kvresponder.log import emit
    from kvresponder.log.store import STORE_APPLIED
    messages = []
    eliot_add(messages.append)
    # Eliot hands the first destination it gets what it buffered before any (other tests' messages).
    del messages[:]
    try:
        emit(STORE_APPLIED, key="k", version="1.0.n", tombstone=False, applied=True, had_live=False)
        emit(STORE_APPLIED, key="k", version="1.0.n", tombstone=False, applied=True, had_live=False)
        with start_action(action_type="test:outer") as action:
            emit(STORE_APPLIED, key="k2", version="1.0.n", tombstone=False, applied=True, had_live=False)
    finally:
        eliot_remove(messages.append)
    first, second = [m for m in messages if m.get("message_type") == "kvresponder:store:applied"][:2]
    assert set(first) == {"message_type", "timestamp", "task_uuid", "task_level", "key", "version", "tombstone",
                          "applied", "had_live"}
    assert first["task_level"] == [1] and first["task_uuid"] != second["task_uuid"]
    assert abs(first["timestamp"] - time.time()) < 60
    inner = [m for m in messages if m.get("key") == "k2"][0]
    assert inner["task_uuid"] == action.task_uuid and inner["task_level"] == [2]


# -- the write's line, formatted directly ---------------------------------------------------------------------

from contextlib import contextmanager  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from kvresponder import log as log_module  # noqa: E402
from kvresponder.log import emit  # noqa: E402
from kvresponder.log.store import STORE_APPLIED, STORE_APPLIED_LINE  # noqa: E402
from kvresponder.privateapi import sole_eliot_destination  # noqa: E402


@contextmanager
def _only_to(*destinations):
    """
    Within it, Eliot's own default logger writes to ``destinations`` alone, added through Eliot's public
    ``add_destinations`` (the process's own destinations and global fields are set aside meanwhile, and put
    back after). The sole destination privateapi finds is checked to be the one added, so a direct line is
    taken here only where the service would take it.
    """
    registry = eliot_add.__self__
    saved = registry._destinations, registry._any_added, registry._globalFields
    registry._destinations, registry._any_added, registry._globalFields = [], True, {}
    try:
        eliot_add(*destinations)
        assert sole_eliot_destination() is (destinations[0] if len(destinations) == 1 else None)
        yield
    finally:
        registry._destinations, registry._any_added, registry._globalFields = saved


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=40), node=st.text(min_size=1, max_size=12), flags=st.tuples(st.booleans(), st.booleans(),
       st.booleans()), task=st.one_of(st.none(), st.tuples(st.sampled_from(["6b1f7c3e-0d2a-4c5b-9e8f-1a2b3c4d5e6f", "x"]),
                                                           st.lists(st.integers(1, 99), min_size=1, max_size=3))))
def test_a_direct_store_line_is_the_line_emit_writes(key, node, flags, task):
    """
    If the service's destination is the only one, then a ``store:applied`` line formatted directly is byte for
    byte the line the message's :func:`emit` makes through Eliot and the encoder, whatever the key (quotes,
    control characters, any Unicode), the version, the flags and the task.
    """
    values = (key, "1700000000000.3.%s" % (node,)) + flags
    lines = []
    for direct in (True, False):
        stream = io.BytesIO()
        destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1")
        saved = log_module.time, log_module._task_uuid[0]
        log_module.time = SimpleNamespace(time=lambda: 1700000000.250001)
        log_module._task_uuid[0] = lambda: "00000000-0000-4000-8000-000000000000"
        try:
            # The direct way is the one taken here (_only_to checks that privateapi finds the destination
            # Eliot's public call added), as in the service, whose only destination it is.
            with _only_to(destination):
                if direct:
                    STORE_APPLIED_LINE.emit(task, *values)
                else:
                    emit(STORE_APPLIED, task, **dict(zip(STORE_APPLIED_LINE.names, values)))
        finally:
            log_module.time, log_module._task_uuid[0] = saved
        lines.append(stream.getvalue())
    assert lines[0] == lines[1]
    assert json.loads(lines[0])["key"] == key


def test_a_store_line_goes_through_eliot_where_another_destination_listens():
    """
    If another destination is added beside the service's, or a test captures the log, then the line is an
    Eliot message that each of them receives.
    """
    stream = io.BytesIO()
    destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1")
    heard = []
    with _only_to(destination, heard.append):
        STORE_APPLIED_LINE.emit(None, "k", "1.0.n1", False, True, False)
    assert [message["key"] for message in heard] == ["k"]
    assert json.loads(stream.getvalue())["key"] == "k"


def test_a_store_line_inside_an_action_is_logged_in_that_action():
    """
    If a store line is logged inside an action with no task of its own, then it is that action's message.
    """
    heard = []
    with _only_to(heard.append):
        with start_action(action_type="test:request") as action:
            STORE_APPLIED_LINE.emit(None, "k", "1.0.n1", False, True, False)
    [line] = [message for message in heard if message.get("message_type") == STORE_APPLIED.message_type]
    assert line["task_uuid"] == action.task_uuid


def test_a_direct_store_line_is_left_out_when_the_policy_turns_the_store_away():
    """
    If the store area logs above info, then a store line formatted directly writes nothing.
    """
    stream = io.BytesIO()
    destination = JSONLineDestination(stream, LogPolicy("warning"), "t1", "n1")
    with _only_to(destination):
        STORE_APPLIED_LINE.emit(None, "k", "1.0.n1", False, True, False)
    assert stream.getvalue() == b""


def test_a_change_of_levels_is_written_whatever_the_levels_it_replaces():
    """
    If every area logs at error only, then the line that says the levels were changed (a warning) is written all
    the same: it is logged before the new levels take effect, and was otherwise lost, leaving debug lines to
    appear with no record of why; another warning of the service area is not.
    """
    from kvresponder.log.service import INSECURE, LEVELS_CHANGED

    stream = io.BytesIO()
    destination = JSONLineDestination(stream, LogPolicy("error"), "t1", "n1")
    with _only_to(destination):
        INSECURE.log(reason="left out")
        LEVELS_CHANGED.log(levels={"service": "debug"})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["message_type"], line["levels"]) for line in lines] == [
        ("kvresponder:service:log-levels", {"service": "debug"})]


from kvresponder.log import _parse_task_id, parse_task_id, task_id  # noqa: E402

_TASK_BYTES = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda task, levels: task.encode("utf-8", "replace") + b"@" + b"".join(b"/%d" % level for level in levels),
              st.text(alphabet="abcdef0123456789-Zé_ /@", max_size=70), st.lists(st.integers(0, 10 ** 11), max_size=3)),
    st.builds(lambda level: task_id("6b1f7c3e-0d2a-4c5b-9e8f-1a2b3c4d5e6f", level), st.integers(0, 10 ** 11)))


@settings(max_examples=1000, deadline=None)
@given(_TASK_BYTES)
def test_a_task_id_read_the_short_way_is_read_as_the_pattern_reads_it(serialized):
    """
    If a serialized task id is parsed, then the answer is the pattern's, whatever the bytes: the short way
    for the usual ``<uuid>@/<level>`` agrees with the strict pattern on every id, well formed or not.
    """
    assert parse_task_id(serialized) == _parse_task_id(serialized)


def test_the_usual_task_id_of_a_copy_is_read():
    assert parse_task_id(task_id("6b1f7c3e-0d2a-4c5b-9e8f-1a2b3c4d5e6f", 7)) == (
        "6b1f7c3e-0d2a-4c5b-9e8f-1a2b3c4d5e6f", [7])
    assert parse_task_id(b"abc@/1") is None
    assert parse_task_id(b"abc@/2/3") == ("abc", [2, 3])


@pytest.mark.parametrize("levels, named", [
    ({"http": None}, "unknown log level null;"),
    ({"http": "info\x00"}, 'unknown log level "info\\u0000";'),
    ({"http": ["info"]}, 'unknown log level ["info"];'),
    ({"nowhere": "info"}, 'unknown log area "nowhere";'),
])
def test_an_unknown_level_or_area_is_named_as_the_client_wrote_it_in_json(levels, named):
    """
    The 400 for a bad level names the value in JSON, as the request had it, not as Python writes it (None,
    'info\\x00').
    """
    with pytest.raises(UnknownLevel) as caught:
        LogPolicy("info").update(levels=levels)
    assert str(caught.value).startswith(named), str(caught.value)


@pytest.mark.parametrize("level, expected", [("warning", 0), ("info", 1)])
def test_a_peer_call_served_continues_the_callers_task_as_a_typed_action_the_levels_govern(level, expected):
    """
    If a node serves a peer's internal call (here an anti-entropy pass's), then it continues the caller's task as
    a ``kvresponder:replication:peer-served`` action of the replication area: logged at info, and not at
    warning (Eliot's untyped ``eliot:remote_task`` passed every level).
    """
    from tests.support import MemoryCluster
    from kvresponder.rebalance import ANTI_ENTROPY

    seen = []
    eliot_add(seen.append)
    try:
        cluster = MemoryCluster(2, log_level=level)
        cluster.run(seconds=2)
        assert cluster.request("PUT", cluster.nodes[0], "/kv/a", body={"value": 1})[0] in (200, 201)
        del seen[:]
        node = cluster.nodes[0]
        cluster.run(node.rebalancer.run_pass(ANTI_ENTROPY), seconds=10)
    finally:
        eliot_remove(seen.append)
    admitted = [m for m in seen if node.log_policy.admits(m)]
    kinds = {m.get("action_type") or m.get("message_type") for m in admitted}
    assert "eliot:remote_task" not in kinds
    served = [m for m in admitted if m.get("action_type") == "kvresponder:replication:peer-served"
              and m.get("action_status") == "started"]
    assert len(served) >= expected and (expected or not served)
    # Named as the metrics and the spans name the route.
    assert all(m["route"].startswith("/_internal/") for m in served)



def test_twisteds_own_lines_are_typed_messages_debug_only_but_its_errors_always():
    """
    If Twisted logs a line, then it reaches Eliot as a ``twisted:log`` message of the declared type (its fields
    validate against it), only while the ``service`` area logs at debug; an error of Twisted's passes at any level.
    """
    from eliot import MemoryLogger
    from eliot.testing import swap_logger

    from kvresponder.tap import TwistedToEliot

    policy = LogPolicy("info")
    observer = TwistedToEliot(policy)
    logger = MemoryLogger()
    previous = swap_logger(logger)
    try:
        observer({"message": ("Starting factory",), "isError": 0})
        observer({"message": ("Unhandled error",), "isError": 1})
        policy.set_area("service", "debug")
        observer({"message": ("Stopping factory",), "isError": 0})
    finally:
        swap_logger(previous)
    lines = [m for m in logger.messages if m.get("message_type") == "twisted:log"]
    assert [(m["message"], m["error"]) for m in lines] == [("Unhandled error", True), ("Stopping factory", False)]
    # Each line was logged through its type, whose fields it validates against.
    assert len(logger.serializers) == len(logger.messages) and all(logger.serializers)
    logger.validate()
