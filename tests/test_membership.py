"""
Tests for :mod:`kvresponder.membership`, on a ``task.Clock``.
"""

from twisted.internet.task import Clock

from kvresponder.membership import (
    ALIVE, DEAD, GONE, JOINED, LEAVING, LEFT, MOVED, RESTARTED, Heartbeat, Membership,
)

TIMEOUT = 15.0


def beat(node="n2", incarnation=1, address="10.0.0.2", port=3000, state=ALIVE, ring_size=2) -> Heartbeat:
    return Heartbeat(node, incarnation, address, port, state, ring_size)


def make_membership():
    clock = Clock()
    clock.advance(1000)
    membership = Membership(clock.seconds, "n1", TIMEOUT)
    changes = []
    membership.subscribe(lambda change, peer: changes.append((change, peer.node_id, peer.incarnation)))
    return membership, clock, changes


def test_first_heartbeat_of_a_node_joins_it():
    """
    If a new node's first heartbeat arrives, then it becomes an alive peer and a ring member, and the
    subscribers hear ``joined`` once.
    """
    membership, _, changes = make_membership()
    assert membership.observe(beat()) == JOINED
    assert membership.observe(beat()) is None
    assert changes == [(JOINED, "n2", 1)]
    assert [p.node_id for p in membership.alive_peers()] == ["n2"]
    assert membership.ring_members() == ["n1", "n2"]
    assert membership.ring_members(include_self=False) == ["n2"]
    assert membership.peer("n2").as_json(1000)["address"] == "10.0.0.2"


def test_own_heartbeats_are_ignored():
    """
    If this node's own heartbeat comes back (multicast loopback), then nothing changes.
    """
    membership, _, changes = make_membership()
    assert membership.observe(beat(node="n1")) is None
    assert (membership.peers(), changes, membership.generation) == ([], [], 0)


def test_silent_peer_is_declared_dead_after_the_peer_timeout():
    """
    If a peer stays silent for longer than the peer timeout, then ``expire`` forgets it and the subscribers
    hear ``dead``; at exactly the timeout it is still alive.
    """
    membership, clock, changes = make_membership()
    membership.observe(beat())
    clock.advance(TIMEOUT)
    assert membership.expire() == []
    clock.advance(0.001)
    assert [p.node_id for p in membership.expire()] == ["n2"]
    assert membership.peers() == []
    assert membership.ring_members() == ["n1"]
    assert changes == [(JOINED, "n2", 1), (DEAD, "n2", 1)]


def test_heartbeats_keep_a_peer_alive():
    """
    If a peer keeps sending heartbeats within the timeout, then it is never expired.
    """
    membership, clock, changes = make_membership()
    for _ in range(10):
        membership.observe(beat())
        clock.advance(TIMEOUT - 1)
        assert membership.expire() == []
    assert changes == [(JOINED, "n2", 1)]


def test_restarted_node_replaces_its_old_incarnation():
    """
    If a node's heartbeat carries a higher incarnation (it restarted), then the new incarnation replaces
    the old peer and the subscribers hear ``restarted``.
    """
    membership, _, changes = make_membership()
    membership.observe(beat(incarnation=1, address="10.0.0.2"))
    assert membership.observe(beat(incarnation=2, address="10.0.0.9")) == RESTARTED
    peer = membership.peer("n2")
    assert (peer.incarnation, peer.address) == (2, "10.0.0.9")
    assert changes == [(JOINED, "n2", 1), (RESTARTED, "n2", 2)]


def test_heartbeat_of_an_older_incarnation_is_ignored():
    """
    If a delayed heartbeat of a node's previous incarnation arrives, then it changes nothing, not even the
    last-seen time.
    """
    membership, clock, changes = make_membership()
    membership.observe(beat(incarnation=2))
    clock.advance(10)
    assert membership.observe(beat(incarnation=1, address="10.0.0.66", state=LEAVING)) is None
    peer = membership.peer("n2")
    assert (peer.incarnation, peer.address, peer.state, peer.last_seen) == (2, "10.0.0.2", ALIVE, 1000)
    assert changes == [(JOINED, "n2", 2)]


def test_leaving_peer_is_excluded_from_the_ring_but_still_listed():
    """
    If a peer announces it is leaving, then it drops out of the ring members and the alive peers at once
    (subscribers hear ``left``), stays listed as leaving, and an alive heartbeat of the same incarnation does
    not bring it back.
    """
    membership, _, changes = make_membership()
    membership.observe(beat())
    assert membership.observe(beat(state=LEAVING)) == LEFT
    assert membership.observe(beat(state=LEAVING)) is None
    assert membership.observe(beat(state=ALIVE)) is None
    assert membership.ring_members() == ["n1"]
    assert membership.alive_peers() == []
    assert [(p.node_id, p.state) for p in membership.peers()] == [("n2", LEAVING)]
    assert changes == [(JOINED, "n2", 1), (LEFT, "n2", 1)]


def test_a_leaving_peer_that_says_it_is_gone_is_forgotten_at_once():
    """
    If a leaving peer's last heartbeat says it is gone (it is exiting), then it is forgotten at once, not after
    the peer timeout (reads would keep asking it), and subscribers hear ``gone``; the second ``gone`` changes
    nothing.
    """
    membership, clock, changes = make_membership()
    membership.observe(beat())
    membership.observe(beat(state=LEAVING))
    clock.advance(1)
    assert membership.observe(beat(state=GONE)) == GONE
    assert membership.peers() == [] and membership.peer("n2") is None
    assert membership.observe(beat(state=GONE)) is None
    assert changes == [(JOINED, "n2", 1), (LEFT, "n2", 1), (GONE, "n2", 1)]


def test_an_alive_peer_that_says_it_is_gone_leaves_the_ring_and_is_forgotten():
    """
    If an alive peer says it is gone (its leaving heartbeats were lost), then it leaves the ring (``left``), and
    is forgotten at once (``gone``).
    """
    membership, _, changes = make_membership()
    membership.observe(beat())
    assert membership.observe(beat(state=GONE)) == GONE
    assert membership.peers() == [] and membership.ring_members() == ["n1"]
    assert changes == [(JOINED, "n2", 1), (LEFT, "n2", 1), (GONE, "n2", 1)]


def test_a_heartbeat_of_a_gone_incarnation_heard_after_it_does_not_list_it_again():
    """
    If a heartbeat of an incarnation that said it is gone arrives after (delayed, or forged without a secret),
    then it is ignored, alive or leaving; a new incarnation of the node joins as usual.
    """
    membership, _, changes = make_membership()
    membership.observe(beat())
    membership.observe(beat(state=GONE))
    assert membership.observe(beat(state=LEAVING)) is None
    assert membership.observe(beat()) is None
    assert membership.peers() == []
    assert membership.observe(beat(incarnation=2)) == JOINED
    assert changes == [(JOINED, "n2", 1), (LEFT, "n2", 1), (GONE, "n2", 1), (JOINED, "n2", 2)]


def test_a_node_restarted_with_a_lower_incarnation_after_it_said_gone_is_refused_only_for_a_while():
    """
    If a node says it is gone and its container restarts in the same pod (the same node id) with a lower
    incarnation (drawn from a wall clock stepped back meanwhile), then its heartbeats are ignored only for
    ``GONE_REMEMBERED`` seconds, the span in which a delayed heartbeat of the gone incarnation could still be taken
    in, and it joins after: ignored for good, no peer would ever list it again while it lists them.
    """
    from kvresponder.membership import GONE_REMEMBERED

    membership, clock, changes = make_membership()
    membership.observe(beat(incarnation=5))
    membership.observe(beat(incarnation=5, state=GONE))
    clock.advance(GONE_REMEMBERED - 1)
    assert membership.observe(beat(incarnation=3)) is None
    assert membership.observe(beat(incarnation=5)) is None
    clock.advance(1)
    assert membership.observe(beat(incarnation=3)) == JOINED
    assert changes[-1] == (JOINED, "n2", 3)


def test_a_subscriber_that_raises_does_not_keep_the_change_from_the_others(eliot_logger):
    """
    If one subscriber raises on a change, then the subscribers after it still hear it (the ring among them: the
    table has changed already, and a ring that missed a join or a death would stay wrong until the next change),
    and the error is logged.
    """
    membership = Membership(Clock().seconds, "n1", TIMEOUT)

    def broken(change, peer):
        raise RuntimeError("a bug in one subscriber")

    heard = []
    membership.subscribe(broken)
    membership.subscribe(lambda change, peer: heard.append(change))
    assert membership.observe(beat()) == JOINED
    assert heard == [JOINED]
    assert [str(m["reason"]) for m in eliot_logger.messages if m.get("message_type") == "eliot:traceback"] \
        == ["a bug in one subscriber"]
    eliot_logger.flush_tracebacks(RuntimeError)


def test_gone_from_an_unknown_node_or_an_older_incarnation_changes_nothing():
    """
    If a node never heard of says it is gone, then it is not listed; if an older incarnation of a peer says so
    (its exit, heard late), then the newer one stays.
    """
    membership, _, changes = make_membership()
    assert membership.observe(beat(state=GONE)) is None
    assert membership.peers() == []
    membership.observe(beat(incarnation=2))
    assert membership.observe(beat(incarnation=1, state=GONE)) is None
    assert [(p.node_id, p.incarnation, p.state) for p in membership.peers()] == [("n2", 2, ALIVE)]
    assert changes == [(JOINED, "n2", 2)]


def test_leaving_peer_that_goes_silent_is_forgotten_without_a_dead_event():
    """
    If a leaving peer stops sending heartbeats, then expiry forgets it without announcing ``dead`` (it was
    already announced as ``left``), but the generation still moves.
    """
    membership, clock, changes = make_membership()
    membership.observe(beat())
    membership.observe(beat(state=LEAVING))
    generation = membership.generation
    clock.advance(TIMEOUT + 1)
    assert [p.node_id for p in membership.expire()] == ["n2"]
    assert membership.peers() == []
    assert membership.generation == generation + 1
    assert changes == [(JOINED, "n2", 1), (LEFT, "n2", 1)]


def test_first_heartbeat_that_is_already_leaving_lists_it_as_leaving_without_joining_it():
    """
    If the first heartbeat seen from a node says it is leaving (this node started while it drains), then it is
    listed as leaving, so that reads while the ring settles ask it for what it has not handed off, but it never
    joins: it is in no ring, no change is announced, and it goes when it falls silent, without a ``dead``.
    """
    membership, clock, changes = make_membership()
    assert membership.observe(beat(state=LEAVING)) is None
    assert [(p.node_id, p.state) for p in membership.peers()] == [("n2", LEAVING)]
    assert membership.ring_members() == ["n1"] and membership.alive_peers() == []
    assert membership.observe(beat(state=ALIVE)) is None
    assert membership.ring_members() == ["n1"]
    clock.advance(TIMEOUT + 1)
    assert [p.node_id for p in membership.expire()] == ["n2"]
    assert (membership.peers(), changes) == ([], [])


def test_newer_incarnation_that_is_leaving_removes_the_old_one():
    """
    If the first heartbeat of a node's new incarnation already says it is leaving, then the old incarnation
    is removed and the subscribers hear ``left``.
    """
    membership, _, changes = make_membership()
    membership.observe(beat(incarnation=1))
    assert membership.observe(beat(incarnation=2, state=LEAVING)) == LEFT
    assert membership.peers() == []
    assert changes == [(JOINED, "n2", 1), (LEFT, "n2", 1)]


def test_peer_that_changes_address_is_moved():
    """
    If a peer's heartbeat gives a new address or port under the same incarnation, then the peer is updated
    and the subscribers hear ``moved`` once.
    """
    membership, _, changes = make_membership()
    membership.observe(beat())
    assert membership.observe(beat(port=3001)) == MOVED
    assert membership.observe(beat(port=3001)) is None
    assert membership.peer("n2").port == 3001
    assert changes == [(JOINED, "n2", 1), (MOVED, "n2", 1)]


def test_every_subscriber_hears_every_change_once_and_the_generation_counts_them():
    """
    If several subscribers are registered, then each hears each change exactly once, in order, and the
    generation increases by one per change; repeated heartbeats change nothing.
    """
    membership, clock, first = make_membership()
    second = []
    membership.subscribe(lambda change, peer: second.append((change, peer.node_id)))
    for _ in range(3):
        membership.observe(beat(node="n2"))
        membership.observe(beat(node="n3"))
    membership.observe(beat(node="n3", incarnation=2))
    clock.advance(TIMEOUT + 1)
    membership.observe(beat(node="n3", incarnation=2))
    membership.expire()
    expected = [(JOINED, "n2"), (JOINED, "n3"), (RESTARTED, "n3"), (DEAD, "n2")]
    assert [(change, node) for change, node, _ in first] == expected
    assert second == expected
    assert membership.generation == 4


def test_peers_are_listed_in_id_order():
    """
    If peers join in any order, then ``peers`` and ``ring_members`` list them sorted by id.
    """
    membership, _, _ = make_membership()
    for node in ["n9", "n0", "n5"]:
        membership.observe(beat(node=node))
    assert [p.node_id for p in membership.peers()] == ["n0", "n5", "n9"]
    assert membership.ring_members() == ["n0", "n1", "n5", "n9"]


def test_peer_json_reports_time_since_last_heartbeat():
    """
    If a peer was last heard some seconds ago, then its JSON says how long ago.
    """
    membership, clock, _ = make_membership()
    membership.observe(beat(ring_size=3))
    clock.advance(2.5)
    assert membership.peer("n2").as_json(clock.seconds()) == {
        "id": "n2", "address": "10.0.0.2", "port": 3000, "state": ALIVE, "incarnation": 1,
        "last_seen_s_ago": 2.5, "ring_size": 3,
    }
