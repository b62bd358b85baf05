"""
The logging module's own pieces: fast task ids and the JSON line destination.
"""

import io
import json
import uuid

import eliot._action
from eliot import start_action

from kvresponder.log import JSONLineDestination, LogPolicy, random_task_uuid, use_fast_task_ids


def test_random_task_uuids_are_version_4_uuids_in_canonical_text():
    for _ in range(1000):
        text = random_task_uuid()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_random_task_uuids_do_not_repeat():
    ids = {random_task_uuid() for _ in range(100000)}
    assert len(ids) == 100000


def test_fast_task_ids_name_new_eliot_tasks(monkeypatch):
    """
    Once turned on, a new top-level action's task_uuid comes from random_task_uuid, and still parses as
    a UUID.
    """
    monkeypatch.setattr(eliot._action, "uuid4", eliot._action.uuid4)
    drawn = []

    def recording():
        drawn.append(random_task_uuid())
        return drawn[-1]

    use_fast_task_ids()
    assert eliot._action.uuid4 is random_task_uuid
    monkeypatch.setattr(eliot._action, "uuid4", recording)
    with start_action(action_type="test:fast-ids") as action:
        task = action.task_uuid
    assert task == drawn[-1]
    uuid.UUID(task)


def test_destination_writes_one_stamped_json_object_a_line():
    stream = io.StringIO()
    destination = JSONLineDestination(stream, LogPolicy("info"), "t1", "n1", flush=False)
    destination({"message_type": "test:hello", "value": b"bytes", "when": 1.5})
    destination({"message_type": "test:again"})
    lines = stream.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"message_type": "test:hello", "value": "bytes", "when": 1.5, "tenant": "t1", "node": "n1"},
        {"message_type": "test:again", "tenant": "t1", "node": "n1"},
    ]
