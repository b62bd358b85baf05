"""
Eliot logging: a replicated write is one task across both nodes (checked with the real ``eliot-tree`` on
real nodes' JSON lines, and on the JSON directly), and the typed actions, checked in memory with Eliot's own
testing tools, which also validate every message against its declared field types.
"""

import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import unittest
from typing import Dict, List, Optional

import pytest
import requests
from eliot import ActionType, MessageType, start_action
from eliot.testing import LoggedAction, LoggedMessage, assertHasAction, capture_logging

from kvresponder.log.discovery import PEER_CHANGED
from kvresponder.log.replication import COORDINATE_WRITE, COPY_FAILED, HINTED, PEER_CALL
from kvresponder.log.store import STORE_APPLIED, STORE_APPLY

from .conftest import require_tool
from .harness import REPO, Cluster
from .support import MemoryCluster, heartbeat

TENANT = "eliot-e2e"
KEY = "eliot-e2e-traced-key"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: ``|-- kvresponder:store:apply/2/3/2/2/1 => started 2026-...`` in ``eliot-tree --ascii`` output.
TREE_ACTION = re.compile(r"^(?P<prefix>[ |+`-]*)(?P<type>[A-Za-z_][\w:.-]*)/(?P<level>\d+(?:/\d+)*)"
                         r"(?: => (?P<status>\w+))?")
TREE_FIELD = re.compile(r"^(?P<prefix>[ |+`-]*)(?P<name>[\w.]+): ?(?P<value>.*)$")


def eliot_tree_command() -> List[str]:
    path = shutil.which("eliot-tree")
    if path is None:
        beside = os.path.join(os.path.dirname(sys.executable), "eliot-tree")
        path = beside if os.access(beside, os.X_OK) else require_tool("eliot-tree")
    return [path]


def declared_types() -> Dict[str, object]:
    """
    Every ActionType and MessageType declared in kvresponder/log/*.py, by name.
    """
    types = {}
    for path in glob.glob(os.path.join(REPO, "kvresponder", "log", "*.py")):
        name = os.path.splitext(os.path.basename(path))[0]
        module = importlib.import_module("kvresponder.log" + ("" if name == "__init__" else "." + name))
        for value in vars(module).values():
            if isinstance(value, ActionType):
                types[value.action_type] = value
            elif isinstance(value, MessageType):
                types[value.message_type] = value
    return types


def declared_fields(eliot_type, message: dict) -> dict:
    """
    The fields (name -> eliot Field) declared for this logged message (start or success of an action).
    """
    # Eliot keeps the declared fields on its serializers; there is no public accessor.
    if isinstance(eliot_type, MessageType):
        serializer = eliot_type._serializer
    elif message.get("action_status") == "started":
        serializer = eliot_type._serializers.start
    elif message.get("action_status") == "succeeded":
        serializer = eliot_type._serializers.success
    else:
        return {}
    return {name: field for name, field in serializer.fields.items()
            if name not in ("action_type", "action_status", "message_type")}


# -- end to end: two real nodes -----------------------------------------------------------------------


class TreeNode:
    def __init__(self, kind: str, level: str, status: Optional[str], depth: int, parent) -> None:
        self.kind, self.level, self.status, self.depth, self.parent = kind, level, status, depth, parent
        self.fields: Dict[str, str] = {}
        self.children: List["TreeNode"] = []

    def ancestors(self) -> List[str]:
        found, node = [], self.parent
        while node is not None:
            found.append(node.kind)
            node = node.parent
        return found

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def parse_tree_output(text: str) -> Dict[str, TreeNode]:
    """
    ``eliot-tree --ascii`` output as one tree of action lines per task uuid, nested by indentation.
    """
    tasks: Dict[str, TreeNode] = {}
    stack: List[TreeNode] = []
    last: Optional[TreeNode] = None
    for line in text.splitlines():
        if UUID.match(line.strip()) and not line.startswith((" ", "|", "+")):
            root = tasks[line.strip()] = TreeNode("<task>", "", None, -1, None)
            stack, last = [root], None
            continue
        if not stack:
            continue
        action = TREE_ACTION.match(line)
        if action:
            depth = len(action.group("prefix"))
            while stack[-1].depth >= depth:
                stack.pop()
            node = TreeNode(action.group("type"), action.group("level"), action.group("status"), depth, stack[-1])
            stack[-1].children.append(node)
            stack.append(node)
            last = node
            continue
        field = TREE_FIELD.match(line)
        if field and last is not None and len(field.group("prefix")) == last.depth + 4:
            last.fields[field.group("name")] = field.group("value")
    return tasks


@pytest.fixture
def logged_write(log_dir):
    """
    Two real nodes (RF=2); one PUT through node 1. Yields the nodes' JSON messages and their concatenation.
    """
    cluster = Cluster(TENANT, log_dir, env={"REPLICATION_FACTOR": "2"})
    try:
        n1 = cluster.add("n1")
        n2 = cluster.add("n2")
        cluster.wait_formed()
        response = n1.put(KEY, {"logged": True})
        assert response.status_code == 201, response.text
        # Each node writes its log lines out every LOG_FLUSH_INTERVAL: wait for both nodes' lines.
        for node in (n1, n2):
            cluster.wait_for(lambda node=node: any(
                m.get("key") == KEY and m.get("message_type") == "kvresponder:store:applied"
                for m in node.log_messages()), 10, "%s's store line" % (node.node_id,))
        combined = os.path.join(log_dir, "combined.jsonl")
        with open(combined, "wb") as out:
            for node in (n1, n2):
                with open(node.log_path, "rb") as log:
                    out.write(log.read())
        yield {"combined": combined, "messages": n1.log_messages() + n2.log_messages()}
    finally:
        cluster.stop()


def test_eliot_tree_shows_a_replicated_write_as_one_task_across_both_nodes(logged_write):
    result = subprocess.run(eliot_tree_command() + ["--ascii", "--color", "never", "-l", "0",
                                                    logged_write["combined"]],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    tasks = parse_tree_output(result.stdout)
    assert tasks, result.stdout[:2000]

    with_key = [uuid for uuid, root in tasks.items()
                if any(node.fields.get("key") == KEY for node in root.walk())]
    assert len(with_key) == 1, "the write is split over %d trees: %s" % (len(with_key), with_key)
    root = tasks[with_key[0]]
    nodes = list(root.walk())

    # At info, a replicated write is one line on each node that stores it, in one task: no request action, no
    # store action, no write or peer-call action and no peer-served action (all debug, or not on this path).
    applies = {n.fields.get("node"): n for n in nodes if n.fields.get("key") == KEY}
    assert set(applies) == {"n1", "n2"}
    assert {n.kind for n in applies.values()} == {"kvresponder:store:applied"}
    # Under one root: the write's action, which only debug logs (eliot-tree's <unnamed>).
    assert applies["n1"].parent is applies["n2"].parent and applies["n1"].parent in (root, *root.children)
    assert not [n for n in nodes if n.kind in ("kvresponder:http:request", "kvresponder:store:apply",
                                               "kvresponder:replication:write", "kvresponder:replication:peer-call",
                                               "kvresponder:replication:peer-served")]


def test_json_logs_join_the_replica_to_the_coordinators_task(logged_write):
    messages = logged_write["messages"]
    lines = [m for m in messages if m.get("key") == KEY]
    assert sorted(m["node"] for m in lines) == ["n1", "n2"]
    assert {m.get("message_type") for m in lines} == {"kvresponder:store:applied"}
    [task_uuid] = {m["task_uuid"] for m in lines}
    task = [m for m in messages if m.get("task_uuid") == task_uuid]
    # The task is the write's two lines, at levels [2] and [3] of one task ([1] is its root action, at debug).
    assert sorted(m["task_level"] for m in task) == [[2], [3]]
    assert all(m["tenant"] == TENANT and m["tombstone"] is False and m["applied"] is True for m in task)
    assert len({m["version"] for m in task}) == 1


def test_a_write_to_a_node_alone_logs_one_line_at_info(log_dir):
    """
    If a node alone in its ring takes a PUT and a DELETE at info level, then each is one ``store:applied``
    line: no request action around it (that is debug for a write no other node copies).
    """
    cluster = Cluster(TENANT, log_dir)
    try:
        node = cluster.add("n1")
        assert node.put("alone", {"v": 1}).status_code == 201
        assert requests.delete(node.url + "/kv/alone", timeout=10).status_code == 200
        assert node.put("marker", 1).status_code == 201
        cluster.wait_for(lambda: any(m.get("key") == "marker" for m in node.log_messages()), 10, "the log")
        lines = [m for m in node.log_messages() if m.get("key") == "alone" or m.get("route") == "/kv/{key}"]
        assert [(m.get("message_type"), m.get("tombstone")) for m in lines] == [
            ("kvresponder:store:applied", False), ("kvresponder:store:applied", True)]
    finally:
        cluster.stop()


def test_if_an_admin_request_lowers_the_levels_then_its_own_action_still_ends_in_the_log(log_dir):
    """
    If ``PUT /admin/log-levels`` lowers the ``http`` area below info, then the request's own
    ``kvresponder:http:request`` action, started at info, still has its end line: eliot-tree would otherwise show
    the one request an operator made to change the levels as never finished, with no status.
    """
    cluster = Cluster(TENANT, log_dir)
    try:
        node = cluster.add("n1", args=["--insecure-admin"])
        answer = requests.put(node.url + "/admin/log-levels", json={"level": "warning"}, timeout=10)
        assert answer.status_code == 200, answer.text
        cluster.wait_for(lambda: any(m.get("message_type") == "kvresponder:service:log-levels"
                                     for m in node.log_messages()), 10, "the levels change in the log")
        requests.put(node.url + "/admin/log-levels", json={"level": "info"}, timeout=10)
        cluster.wait_for(lambda: sum(m.get("message_type") == "kvresponder:service:log-levels"
                                     for m in node.log_messages()) == 2, 10, "the second change in the log")
        admin = [m for m in node.log_messages() if m.get("action_type") == "kvresponder:http:request"
                 and m.get("task_uuid") in {m.get("task_uuid") for m in node.log_messages()
                                            if m.get("route") == "/admin/log-levels"}]
        by_task: Dict[str, List[str]] = {}
        for message in admin:
            by_task.setdefault(message["task_uuid"], []).append(message["action_status"])
        # The second request started at warning: it has no action.
        assert list(by_task.values()) == [["started", "succeeded"]], by_task
    finally:
        cluster.stop()


def test_real_log_lines_match_their_declared_field_types(logged_write):
    types = declared_types()
    checked = set()
    problems = []
    for message in logged_write["messages"]:
        name = message.get("action_type") or message.get("message_type")
        if name not in types:
            continue
        for field_name, field in declared_fields(types[name], message).items():
            if field_name not in message:
                problems.append((name, field_name, "missing"))
                continue
            try:
                field.validate(message[field_name])
            except Exception as error:
                problems.append((name, field_name, repr(message[field_name]), str(error)))
        checked.add(name)
    assert problems == []
    # At info, a write logs store:applied lines only; the actions of debug are checked in memory below.
    assert {"kvresponder:store:applied", "kvresponder:discovery:peer-changed"} <= checked


# -- in memory: Eliot's testing tools (validation of every message against its declared types) -----------


class TypedActionsTests(unittest.TestCase):
    """
    Two in-memory nodes (RF=2) on ``task.Clock`` and ``StubTreq``. ``capture_logging`` validates every
    message logged during a test against its type and fails the test on any logged traceback.
    """

    def cluster(self) -> MemoryCluster:
        cluster = MemoryCluster(2, replicas=2)
        cluster.run(seconds=1.0)
        self.assertEqual([len(node.ring()) for node in cluster.nodes], [2, 2])
        return cluster

    def put_in_a_request(self, cluster, node, key: str):
        """
        Write ``key`` through ``node`` from inside an action standing for the client request's.
        """
        with start_action(action_type="test:request"):
            d = node.coordinator.put(key, b'"v"', None)
        return cluster.run(d)

    @capture_logging(None, encoder_=None)
    def test_coordinated_write_at_debug_logs_its_targets_and_copies(self, logger):
        cluster = self.cluster()
        n1 = cluster.nodes[0]
        n1.log_policy.set_area("replication", "debug")
        result = cluster.run(n1.coordinator.put("written", b'"v"', None))
        self.assertEqual(result.copies, 2)
        action = assertHasAction(self, logger, COORDINATE_WRITE, True,
                                 {"key": "written", "op": "put"}, {"copies": 2})
        self.assertEqual(sorted(action.startMessage["targets"]), ["n1", "n2"])
        self.assertEqual(action.startMessage["version"].rsplit(".", 1)[-1], "n1")

    @capture_logging(None, encoder_=None)
    def test_replicated_write_at_info_puts_both_applies_in_the_callers_action_with_no_write_or_peer_call(
            self, logger):
        cluster = self.cluster()
        n1 = cluster.nodes[0]
        self.put_in_a_request(cluster, n1, "joined")
        self.assertEqual([a for a in LoggedAction.ofType(logger.messages, PEER_CALL)
                          if a.startMessage["op"] == "apply"], [])
        self.assertEqual(LoggedAction.ofType(logger.messages, COORDINATE_WRITE), [])
        [request] = LoggedAction.ofType(logger.messages, "test:request")
        lines = [m for m in LoggedMessage.ofType(logger.messages, STORE_APPLIED) if m.message["key"] == "joined"]
        self.assertEqual(len(lines), 2)
        self.assertEqual([a for a in LoggedAction.ofType(logger.messages, STORE_APPLY)
                          if a.startMessage["key"] == "joined"], [])
        self.assertEqual(list(request.children), lines)

    @capture_logging(None, encoder_=None)
    def test_peer_call_logs_the_peer_and_the_status_it_answered(self, logger):
        cluster = self.cluster()
        n1 = cluster.nodes[0]
        n1.log_policy.set_area("replication", "debug")
        cluster.run(n1.coordinator.put("called", b'"v"', None))
        [call] = [action for action in LoggedAction.ofType(logger.messages, PEER_CALL)
                  if action.startMessage["op"] == "apply"]
        self.assertTrue(call.succeeded)
        self.assertEqual(call.startMessage["peer"], "n2")
        self.assertEqual(call.endMessage["code"], 200)
        # The call runs inside the coordinator's write action.
        [write] = LoggedAction.ofType(logger.messages, COORDINATE_WRITE)
        self.assertIn(call, write.descendants())

    @capture_logging(None, encoder_=None)
    def test_peer_call_to_a_dead_peer_logs_the_status_it_got(self, logger):
        cluster = self.cluster()
        n1, n2 = cluster.nodes
        n1.log_policy.set_area("replication", "debug")
        cluster.kill(n2)
        cluster.run(n1.coordinator.put("after-death", b'"v"', None))
        codes = [action.endMessage.get("code") for action in LoggedAction.ofType(logger.messages, PEER_CALL)
                 if action.startMessage["op"] == "apply"]
        self.assertIn(502, codes)

    @capture_logging(None, encoder_=None)
    def test_a_copy_that_fails_at_info_is_logged_with_its_peer_inside_the_callers_action(self, logger):
        cluster = self.cluster()
        n1, n2 = cluster.nodes
        cluster.kill(n2)
        self.put_in_a_request(cluster, n1, "lost-copy")
        [failed] = LoggedMessage.ofType(logger.messages, COPY_FAILED)
        self.assertEqual((failed.message["key"], failed.message["peer"]), ("lost-copy", "n2"))
        self.assertIn("502", failed.message["reason"])
        [request] = LoggedAction.ofType(logger.messages, "test:request")
        self.assertIn(failed, list(request.descendants()))

    @capture_logging(None, encoder_=None)
    def test_a_copy_that_fails_at_debug_ends_the_write_action_with_the_copies_stored(self, logger):
        cluster = self.cluster()
        n1, n2 = cluster.nodes
        n1.log_policy.set_area("replication", "debug")
        cluster.kill(n2)
        cluster.run(n1.coordinator.put("lost-copy", b'"v"', None))
        [failed] = LoggedMessage.ofType(logger.messages, COPY_FAILED)
        [write] = LoggedAction.ofType(logger.messages, COORDINATE_WRITE)
        self.assertIn(failed, list(write.descendants()))
        self.assertEqual(write.endMessage["copies"], 1)

    @capture_logging(None, encoder_=None)
    def test_a_failed_over_copy_lands_in_the_writes_tree_on_the_next_node(self, logger):
        cluster = MemoryCluster(3, replicas=2)
        cluster.run(seconds=1.0)
        n1, n2, n3 = cluster.nodes
        ring = n1.ring()
        key = next("k%d" % i for i in range(1000) if ring.preference_list("k%d" % i, 3) == ["n1", "n2", "n3"])
        cluster.kill(n2)
        result = self.put_in_a_request(cluster, n1, key)
        self.assertEqual(result.copies, 2)
        [request] = LoggedAction.ofType(logger.messages, "test:request")
        inside = list(request.descendants())
        [failed] = LoggedMessage.ofType(logger.messages, COPY_FAILED)
        [hinted] = LoggedMessage.ofType(logger.messages, HINTED)
        self.assertEqual(failed.message["peer"], "n2")
        self.assertEqual((hinted.message["owner"], hinted.message["holder"]), ("n2", "n3"))
        applies = [a for a in LoggedAction.ofType(logger.messages, STORE_APPLY) if a.startMessage["key"] == key]
        applies += [m for m in LoggedMessage.ofType(logger.messages, STORE_APPLIED) if m.message["key"] == key]
        self.assertEqual(len(applies), 2)
        for message_or_action in [failed, hinted] + applies:
            self.assertIn(message_or_action, inside)
        self.assertEqual(n3.store.get(key).value, b'"v"')

    @capture_logging(None, encoder_=None)
    def test_store_apply_is_logged_on_both_replicas_in_the_writes_task(self, logger):
        cluster = self.cluster()
        n1 = cluster.nodes[0]
        self.put_in_a_request(cluster, n1, "applied")
        cluster.run(n1.coordinator.delete("applied"))
        # The coordinator's copy as a store:applied line, the replica's as a store:apply action: each with the
        # same fields.
        applies = [dict(action.startMessage, **action.endMessage)
                   for action in LoggedAction.ofType(logger.messages, STORE_APPLY)
                   if action.startMessage["key"] == "applied" and action.succeeded]
        applies += [message.message for message in LoggedMessage.ofType(logger.messages, STORE_APPLIED)
                    if message.message["key"] == "applied"]
        puts = [a for a in applies if a["tombstone"] is False]
        deletes = [a for a in applies if a["tombstone"] is True]
        self.assertEqual(len(puts), 2)
        self.assertEqual(len(deletes), 2)
        for fields in puts:
            self.assertEqual(fields["applied"], True)
            self.assertEqual(fields["had_live"], False)
        for fields in deletes:
            self.assertEqual(fields["had_live"], True)
        [request] = LoggedAction.ofType(logger.messages, "test:request")
        self.assertEqual({a["task_uuid"] for a in puts}, {request.startMessage["task_uuid"]})

    @capture_logging(None, encoder_=None)
    def test_membership_changes_log_peer_changed(self, logger):
        cluster = self.cluster()
        n1 = cluster.nodes[0]
        n1.membership.observe(heartbeat("n9", incarnation=7, address="10.0.0.9", port=3000))
        joined = [a for a in LoggedAction.ofType(logger.messages, PEER_CHANGED) if a.startMessage["peer"] == "n9"]
        self.assertEqual(len(joined), 1)
        self.assertTrue(joined[0].succeeded)
        self.assertEqual(joined[0].startMessage["change"], "joined")
        self.assertEqual(joined[0].startMessage["address"], "10.0.0.9:3000")
        self.assertEqual(joined[0].startMessage["incarnation"], 7)
        self.assertIn("n9", n1.ring().nodes)

        cluster.clock.advance(n1.settings.peer_timeout + 1)
        n1.membership.expire()
        changes = [a.startMessage["change"] for a in LoggedAction.ofType(logger.messages, PEER_CHANGED)
                   if a.startMessage["peer"] == "n9"]
        self.assertEqual(changes, ["joined", "dead"])
        self.assertNotIn("n9", n1.ring().nodes)


def test_declared_types_cover_every_registered_level():
    """
    Every declared type has its area and level registered, but Twisted's own lines: their level is each line's
    (debug, or error), and the observer that logs them filters them.
    """
    from kvresponder.log import _TYPE_LEVELS
    from kvresponder.log.service import TWISTED_LOG
    assert set(declared_types()) == set(_TYPE_LEVELS) | {TWISTED_LOG.message_type}

