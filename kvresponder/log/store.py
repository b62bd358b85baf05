"""
Eliot types of the store area.
"""

from eliot import ActionType, Field, MessageType

from . import DEBUG, INFO, DirectLine, leveled

KEY = Field.for_types("key", [str], "The key.")
VERSION = Field.for_types("version", [str], "The entry's version, wall_ms.counter.node.")
TOMBSTONE = Field.for_types("tombstone", [bool], "Whether the entry is a delete.")
APPLIED = Field.for_types("applied", [bool], "Whether the entry was newer than the stored one.")
HAD_LIVE = Field.for_types("had_live", [bool], "Whether a live value was stored before.")
COUNT = Field.for_types("count", [int], "How many entries.")

#: At debug, a replica's copy of a client write, continuing its writer's task (at info, a STORE_APPLIED line).
STORE_APPLY = leveled("store", DEBUG, ActionType(
    "kvresponder:store:apply", [KEY, VERSION, TOMBSTONE], [APPLIED, HAD_LIVE],
    "An entry was applied to this node's store (last writer wins)."))

#: A client write stored by a node (the coordinator, or at info a replica's copy), a read repair: one line, not an
#: action. At info, a write is this line on each node that stores it, all in the write's task (or inside the
#: current action, where one is logged).
STORE_APPLIED = leveled("store", INFO, MessageType(
    "kvresponder:store:applied", [KEY, VERSION, TOMBSTONE, APPLIED, HAD_LIVE],
    "An entry was applied to this node's store (last writer wins)."))
#: :data:`STORE_APPLIED`, the line of every write, formatted straight to the log where it can be.
STORE_APPLIED_LINE = DirectLine(STORE_APPLIED, ["key", "version", "tombstone", "applied", "had_live"])

STORE_EVICTED = leveled("store", DEBUG, MessageType(
    "kvresponder:store:evicted", [COUNT], "Least recently used entries were evicted to stay in budget."))

STORE_TOMBSTONES_EVICTED = leveled("store", DEBUG, MessageType(
    "kvresponder:store:tombstones-evicted", [COUNT],
    "The oldest tombstones were evicted to stay in budget: a replica that missed their deletes may undo them."))

STORE_SWEPT = leveled("store", DEBUG, MessageType(
    "kvresponder:store:swept", [COUNT, Field.for_types("tombstones", [int], "Tombstones left.")],
    "Expired entries were reclaimed."))

STORE_APPLY_BATCH = leveled("store", INFO, ActionType(
    "kvresponder:store:apply-batch", [COUNT], [Field.for_types("applied", [int], "Entries that were newer.")],
    "A batch of entries (a bulk request's, handoff, re-replication, anti-entropy) was applied to this "
    "node's store."))


class StoreEvents:
    """
    What a :class:`~kvresponder.store.Store` reports (``evicted(n)``, ``tombstones_evicted(n)``, ``expired(n)``):
    counted by ``metrics``,
    and logged as :data:`STORE_EVICTED` and :data:`STORE_SWEPT` when the store area is at debug.

    :param policy: the :class:`~kvresponder.log.LogPolicy`.
    :param tombstones: reads the store's tombstone count, for the swept line.
    """

    def __init__(self, metrics, policy, tombstones) -> None:
        self._metrics = metrics
        self._policy = policy
        self._tombstones = tombstones

    def evicted(self, count: int) -> None:
        self._metrics.evicted(count)
        if self._policy.enabled("store", DEBUG):
            STORE_EVICTED.log(count=count)

    def tombstones_evicted(self, count: int) -> None:
        self._metrics.tombstones_evicted(count)
        if self._policy.enabled("store", DEBUG):
            STORE_TOMBSTONES_EVICTED.log(count=count)

    def expired(self, count: int) -> None:
        self._metrics.expired(count)
        if self._policy.enabled("store", DEBUG):
            STORE_SWEPT.log(count=count, tombstones=self._tombstones())

