"""
Eliot types of the rebalance area: handoff, re-replication, anti-entropy and drain.
"""

from eliot import ActionType, Field

from . import INFO, leveled

PEER = Field.for_types("peer", [str], "The peer's node id.")
REASON = Field.for_types("reason", [str], "What started it.")
SENT = Field.for_types("sent", [int], "Entries sent.")

SCAN = leveled("rebalance", INFO, ActionType(
    "kvresponder:rebalance:scan", [REASON], [Field.for_types("handed_off", [int], "Entries handed off."),
                                              Field.for_types("repaired", [int], "Entries re-replicated."),
                                              Field.for_types("pending", [int], "Entries still waiting.")],
    "A pass over local entries that hands off what this node no longer owns and restores missing copies."))

SYNC = leveled("rebalance", INFO, ActionType(
    "kvresponder:rebalance:sync", [PEER, REASON], [SENT, Field.for_types(
        "failed", [bool, None], "Whether the exchange broke off (the peer did not answer); then ``sent`` is what went "
        "before it.")],
    "An anti-entropy exchange of digests with one peer."))

HANDOFF = leveled("rebalance", INFO, ActionType(
    "kvresponder:rebalance:handoff", [PEER, Field.for_types("count", [int], "Entries in the batch.")], [],
    "A batch of entries sent to a node that owns them."))

DRAIN = leveled("rebalance", INFO, ActionType(
    "kvresponder:rebalance:drain", [Field.for_types("entries", [int], "Entries held at the start.")],
    [Field.for_types("remaining", [int], "Entries not handed off.")],
    "A stopping node hands every entry to its new owners."))
