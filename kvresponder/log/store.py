"""
Eliot types of the store area.
"""

from eliot import ActionType, Field, MessageType

from . import DEBUG, INFO, leveled

KEY = Field.for_types("key", [str], "The key.")
VERSION = Field.for_types("version", [str], "The entry's version, wall_ms.counter.node.")
TOMBSTONE = Field.for_types("tombstone", [bool], "Whether the entry is a delete.")
APPLIED = Field.for_types("applied", [bool], "Whether the entry was newer than the stored one.")
HAD_LIVE = Field.for_types("had_live", [bool], "Whether a live value was stored before.")
COUNT = Field.for_types("count", [int], "How many entries.")

STORE_APPLY = leveled("store", INFO, ActionType(
    "kvresponder:store:apply", [KEY, VERSION, TOMBSTONE], [APPLIED, HAD_LIVE],
    "An entry was applied to this node's store (last writer wins)."))

#: A write stored by the node that took it (the coordinator), a read repair, a copy sent with no task: one line,
#: not an action. It sits in the client request's tree when there is one (a write other nodes copy), and is
#: the write's only info-level line when there is none (a node alone in its ring).
STORE_APPLIED = leveled("store", INFO, MessageType(
    "kvresponder:store:applied", [KEY, VERSION, TOMBSTONE, APPLIED, HAD_LIVE],
    "An entry was applied to this node's store (last writer wins)."))

STORE_EVICTED = leveled("store", DEBUG, MessageType(
    "kvresponder:store:evicted", [COUNT], "Least recently used entries were evicted to stay in budget."))

STORE_SWEPT = leveled("store", DEBUG, MessageType(
    "kvresponder:store:swept", [COUNT, Field.for_types("tombstones", [int], "Tombstones left.")],
    "Expired entries were reclaimed."))

STORE_APPLY_BATCH = leveled("store", INFO, ActionType(
    "kvresponder:store:apply-batch", [COUNT], [Field.for_types("applied", [int], "Entries that were newer.")],
    "A batch of entries (a bulk request's, handoff, re-replication, anti-entropy) was applied to this "
    "node's store."))
