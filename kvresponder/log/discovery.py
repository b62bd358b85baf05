"""
Eliot types of the discovery area.
"""

from eliot import ActionType, Field, MessageType

from . import DEBUG, ERROR, INFO, WARNING, leveled

PEER = Field.for_types("peer", [str], "The peer's node id.")
CHANGE = Field.for_types("change", [str], "joined, restarted, moved, left, gone (said it exits: forgotten) or dead.")
ADDRESS = Field.for_types("address", [str], "The peer's address:port.")
INCARNATION = Field.for_types("incarnation", [int], "The peer's incarnation.")
REASON = Field.for_types("reason", [str], "Why.")
SOURCE = Field.for_types("source", [str], "The sender's address.")

PEER_CHANGED = leveled("discovery", INFO, ActionType(
    "kvresponder:discovery:peer-changed", [PEER, CHANGE, ADDRESS, INCARNATION], [],
    "The membership changed; the ring and the rebalancer react inside this action."))

JOIN_VIEW_UNMATCHED = leveled("discovery", WARNING, MessageType(
    "kvresponder:discovery:join-view-unmatched",
    [Field.for_types("peers", [list], "The peers whose heartbeats name another ring than this node's."),
     Field.for_types("ring", [list], "This node's ring.")],
    "A joining node waited its while for every peer it heard to name the ring it has, itself included, and joins "
    "without: a peer's ring holds a node this one does not (one it refuses, or one still dying), or the other way "
    "round, or a peer has not heard this node (its heartbeats do not reach it)."))

DATAGRAM_DROPPED = leveled("discovery", DEBUG, MessageType(
    "kvresponder:discovery:dropped", [REASON, SOURCE], "A discovery datagram was dropped."))

DISCOVERY_STARTED = leveled("discovery", INFO, MessageType(
    "kvresponder:discovery:started",
    [Field.for_types("group", [str, None], "Multicast group."),
     Field.for_types("interface", [str], "Outgoing interface."),
     Field.for_types("port", [int], "UDP port."),
     Field.for_types("mode", [str], "multicast, dns or both."),
     Field.for_types("seeds", [str, None], "DNS seed name."),
     Field.for_types("authenticated", [bool], "Whether datagrams carry an HMAC.")],
    "Discovery is listening."))

SEEDS_RESOLVED = leveled("discovery", DEBUG, MessageType(
    "kvresponder:discovery:seeds",
    [Field.for_types("name", [str], "The DNS name."), Field.for_types("addresses", [list], "A records.")],
    "The DNS seeds were resolved."))

SEEDS_FAILED = leveled("discovery", INFO, MessageType(
    "kvresponder:discovery:seeds-failed",
    [Field.for_types("name", [str], "The DNS name."), REASON,
     Field.for_types("failures", [int], "Lookups that failed since the last such line (this one included).")],
    "The DNS seeds could not be resolved; the previous addresses are kept. Logged for each reason when it first "
    "fails, then at most once every 5 minutes."))

SKEW = Field.for_types("skew", [float], "This node's clock offset from the cluster's, in seconds (positive: ahead).")
MAX_OFFSET = Field.for_types("max_offset", [float], "MAX_CLOCK_OFFSET, in seconds.")

CLOCK_SKEWED = leveled("discovery", ERROR, MessageType(
    "kvresponder:discovery:clock-skewed",
    [SKEW, MAX_OFFSET, Field.for_types("peers", [int], "Peers whose clocks were measured.")],
    "This node's clock is further than MAX_CLOCK_OFFSET from most of its peers' clocks: it is not ready and "
    "coordinates no write until its clock comes back."))

CLOCK_RECOVERED = leveled("discovery", INFO, MessageType(
    "kvresponder:discovery:clock-recovered", [SKEW, MAX_OFFSET],
    "This node's clock is back within MAX_CLOCK_OFFSET of its peers' clocks: it coordinates writes again."))

STALLED = leveled("discovery", WARNING, MessageType(
    "kvresponder:discovery:stalled",
    [Field.for_types("seconds", [float], "How long this node's reactor did not run its timers, in seconds.")],
    "This node did not run for a while (a VM frozen or moved, CPU throttling, a long garbage collection, SIGSTOP): "
    "the heartbeats read just after it are not taken as samples of their senders' clocks, since they waited."))

LEAD = Field.for_types("lead", [float], "How far this node's versions are ahead of its wall clock, in seconds.")

VERSIONS_AHEAD = leveled("discovery", ERROR, MessageType(
    "kvresponder:discovery:versions-ahead", [LEAD, MAX_OFFSET],
    "The versions this node issues are further ahead of its wall clock than MAX_CLOCK_OFFSET (its clock ran ahead, "
    "then was set back): it is not ready and coordinates no write until its wall clock reaches them."))

VERSIONS_CAUGHT_UP = leveled("discovery", INFO, MessageType(
    "kvresponder:discovery:versions-caught-up", [LEAD, MAX_OFFSET],
    "This node's wall clock has caught up with its versions: it coordinates writes again."))

CLOCK_AHEAD = leveled("discovery", WARNING, MessageType(
    "kvresponder:discovery:clock-ahead",
    [PEER, Field.for_types("offset", [float], "How far ahead its clock is, in seconds.")],
    "A peer's heartbeat carried a time further ahead than MAX_CLOCK_OFFSET: it was refused."))
HEARTBEAT_IGNORED = leveled("discovery", WARNING, MessageType(
    "kvresponder:discovery:heartbeat-ignored", [PEER, SOURCE],
    "A peer's heartbeat was ignored because this node serves alone (no CLUSTER_SECRET and no "
    "--insecure-cluster); logged at most once every 10 minutes a peer."))

HEARTBEAT_UNAUTHENTICATED = leveled("discovery", WARNING, MessageType(
    "kvresponder:discovery:heartbeat-unauthenticated", [SOURCE],
    "A heartbeat of this tenant failed its HMAC: a node with another CLUSTER_SECRET (another release of the same "
    "tenant on this network, or one whose secret was changed), or a forged datagram. It is dropped; logged at most "
    "once in ten minutes a sender."))

NODE_ID_TAKEN = leveled("discovery", WARNING, MessageType(
    "kvresponder:discovery:node-id-taken", [SOURCE, INCARNATION],
    "Another node sends heartbeats under this node's id: its peers take it and this node for one, and see only one "
    "of them. Give each node its own NODE_ID. Logged at most once a minute."))

MULTICAST_FAILED = leveled("discovery", ERROR, MessageType(
    "kvresponder:discovery:multicast-failed", [Field.for_types("interface", [str], "The interface asked for."), REASON],
    "Multicast could not be set up on DISCOVERY_INTERFACE: if the interface could not be set, no heartbeat goes to "
    "the group (the kernel would pick the interface by the default route); if the group could not be joined "
    "(reason \"joining ...\"), this node hears none of its peers' heartbeats there. DNS seeds, if any, still find "
    "peers."))

PEER_AT_LOOPBACK = leveled("discovery", WARNING, MessageType(
    "kvresponder:discovery:peer-at-loopback", [PEER, SOURCE],
    "A peer on another host says it is reached at a loopback address (started without ADVERTISE_ADDRESS): its "
    "heartbeats are dropped, since this node would send that peer's copies to itself. Logged at most once a minute."))
