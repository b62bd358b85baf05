"""
Review finding 1: a peer whose clock ran ahead (its heartbeats refused as ``clock_ahead``) and is then corrected
must be taken back in at once, not after the wall time it had run ahead to.
"""

from kvresponder.discovery import HeartbeatCodec, derive_key
from kvresponder.membership import ALIVE, Heartbeat

from .test_clock_safety import NOW, _protocol


def test_a_peer_whose_clock_ran_ahead_is_taken_back_in_once_its_clock_is_corrected():
    """
    If a signed peer's heartbeats come an hour ahead (refused, ``clock_ahead``), and its clock is then set right
    (its heartbeats carry the real time again, same incarnation), then its next heartbeat is accepted: the
    refused future timestamps are no floor for the replay check.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    codec = HeartbeatCodec("t1", key)
    beat = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    for second in range(3):
        protocol.clock.advance(1.0)
        protocol.datagramReceived(codec.encode(beat, False, protocol.clock.seconds() + 3600.0),
                                  ("10.0.0.2", 9999))
    assert membership.peers() == [] and metrics.results == ["clock_ahead"] * 3
    # NTP steps n2's clock back to the real time.
    for second in range(3):
        protocol.clock.advance(1.0)
        protocol.datagramReceived(codec.encode(beat, False, protocol.clock.seconds()), ("10.0.0.2", 9999))
    assert metrics.results[3:] == ["accepted"] * 3, metrics.results
    assert [peer.node_id for peer in membership.peers()] == ["n2"]


def test_a_peer_whose_clock_ran_past_the_replay_window_is_taken_back_in_once_its_clock_is_corrected():
    """
    The same for a peer a minute behind (refused as outside the replay window), whose clock is then set right:
    nothing about it is stuck (this one already holds: later timestamps are never a replay).
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    codec = HeartbeatCodec("t1", key)
    beat = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    protocol.clock.advance(1.0)
    protocol.datagramReceived(codec.encode(beat, False, protocol.clock.seconds() - 60.0), ("10.0.0.2", 9999))
    protocol.clock.advance(1.0)
    protocol.datagramReceived(codec.encode(beat, False, protocol.clock.seconds()), ("10.0.0.2", 9999))
    assert metrics.results == ["replayed", "accepted"]


def test_a_replayed_heartbeat_is_still_refused_after_the_fix():
    """
    An accepted heartbeat sent again is still dropped as replayed, and not measured again.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    codec = HeartbeatCodec("t1", key)
    data = codec.encode(Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1), False, NOW)
    protocol.datagramReceived(data, ("10.0.0.2", 9999))
    protocol.clock.advance(2.0)
    protocol.datagramReceived(data, ("10.0.0.2", 9999))
    assert metrics.results == ["accepted", "replayed"]


def test_a_peer_whose_clock_steps_back_is_still_taken_in():
    """
    If a signed peer's wall clock steps back 10 s (within the replay window) while it runs, then its next
    heartbeats are still accepted, told apart from replays by their sequence numbers, and a resent one is not.
    """
    key = derive_key("a-cluster-secret-of-some-length", "discovery")
    protocol, membership, clock_offsets, metrics = _protocol(key)
    own = Heartbeat("n2", 1, "10.0.0.2", 3000, ALIVE, 1)
    sender, _, _, _ = _protocol(key)
    sender.own_heartbeat = lambda: own
    sender.membership.node_id = "n2"
    sent = []

    class Transport:
        def write(self, data, address):
            sent.append(data)
    sender.transport = Transport()
    sender.group = "239.255.1.1"
    sender.announce()
    protocol.datagramReceived(sent[-1], ("10.0.0.2", 9999))
    sender.wall = lambda: protocol.clock.seconds() - 10.0
    for _ in range(3):
        protocol.clock.advance(0.5)
        sender.announce()
        protocol.datagramReceived(sent[-1], ("10.0.0.2", 9999))
    assert metrics.results == ["accepted"] * 4, metrics.results
    protocol.datagramReceived(sent[-1], ("10.0.0.2", 9999))
    assert metrics.results[-1] == "replayed"
