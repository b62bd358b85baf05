"""
The history checker's real-time order property (tests/history.py), on hand-made histories: it must be able
to fail, or the chaos scenarios that rely on it prove nothing.
"""

from .history import ABSENT, ERROR, History, Op, real_time_order_violations


def _op(history, key, kind, value, node, start, end, outcome="ok"):
    op = Op("w", key, kind, value, node, start, end, outcome, 200 if outcome == "ok" else 503,
            "1.0.%s" % (node,) if kind == "put" and outcome == "ok" else None)
    history.add(op)
    return op


def test_if_the_earlier_of_two_sequential_acknowledged_writes_is_final_then_it_is_a_violation():
    history = History()
    _op(history, "k", "put", "early", "skewed", 0.0, 1.0)
    _op(history, "k", "put", "late", "healthy", 1.5, 2.0)
    violations = real_time_order_violations(history, {"healthy": {"k": "early"}, "skewed": {"k": "late"}})
    assert len(violations) == 1
    assert "k on healthy" in violations[0] and "'late' via healthy" in violations[0]


def test_if_the_later_write_is_final_everywhere_then_there_is_no_violation():
    history = History()
    _op(history, "k", "put", "early", "skewed", 0.0, 1.0)
    _op(history, "k", "put", "late", "healthy", 1.5, 2.0)
    assert real_time_order_violations(history, {"a": {"k": "late"}, "b": {"k": "late"}}) == []


def test_if_two_acknowledged_writes_overlap_then_either_may_be_final():
    history = History()
    _op(history, "k", "put", "one", "a", 0.0, 2.0)
    _op(history, "k", "put", "two", "b", 1.0, 3.0)
    assert real_time_order_violations(history, {"a": {"k": "one"}, "b": {"k": "two"}}) == []


def test_if_the_later_write_was_not_acknowledged_then_the_earlier_may_stay_final():
    history = History()
    _op(history, "k", "put", "early", "healthy", 0.0, 1.0)
    _op(history, "k", "put", "refused", "skewed", 1.5, 2.0, outcome="unknown")
    assert real_time_order_violations(history, {"a": {"k": "early"}}) == []


def test_if_an_acknowledged_delete_was_superseded_by_a_put_then_absence_is_a_violation():
    history = History()
    _op(history, "k", "delete", None, "skewed", 0.0, 1.0)
    _op(history, "k", "put", "late", "healthy", 1.5, 2.0)
    assert len(real_time_order_violations(history, {"a": {"k": ABSENT}})) == 1


def test_if_an_unknown_delete_followed_then_absence_is_explained():
    history = History()
    _op(history, "k", "put", "first", "a", 0.0, 1.0)
    _op(history, "k", "delete", None, "b", 1.5, 2.0, outcome="unknown")
    assert real_time_order_violations(history, {"a": {"k": ABSENT}}) == []


def test_if_a_node_cannot_be_read_or_returns_an_unexplained_value_then_this_property_does_not_judge_it():
    history = History()
    _op(history, "k", "put", "early", "a", 0.0, 1.0)
    _op(history, "k", "put", "late", "b", 1.5, 2.0)
    assert real_time_order_violations(history, {"a": {"k": ERROR}, "b": {"k": "phantom"}}) == []


def test_if_an_acknowledged_put_is_final_nowhere_and_the_key_reads_absent_then_it_is_a_violation():
    history = History()
    _op(history, "k", "put", "only", "a", 0.0, 1.0)
    assert len(real_time_order_violations(history, {"a": {"k": "only"}, "b": {"k": ABSENT}})) == 1
