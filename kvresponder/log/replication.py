"""
Eliot types of the replication area: the coordinator and its peer calls.
"""

from eliot import ActionType, Field, MessageType

from . import DEBUG, INFO, leveled

KEY = Field.for_types("key", [str], "The key.")
OP = Field.for_types("op", [str], "put, delete, get, ...")
PEER = Field.for_types("peer", [str], "The peer's node id.")
TARGETS = Field.for_types("targets", [list], "Nodes chosen, in order of preference.")
VERSION = Field.for_types("version", [str], "The write's version.")
COPIES = Field.for_types("copies", [int], "Copies stored.")
CODE = Field.for_types("code", [int], "HTTP status answered by the peer.")

COORDINATE_WRITE = leveled("replication", INFO, ActionType(
    "kvresponder:replication:write", [KEY, OP, VERSION, TARGETS], [COPIES],
    "This node coordinated a write to the key's replicas."))

COORDINATE_READ = leveled("replication", DEBUG, ActionType(
    "kvresponder:replication:read", [KEY, TARGETS],
    [Field.for_types("found", [bool], "Whether a live value was found.")],
    "This node coordinated a read from the key's replicas."))

#: Every peer call but one replicated client write, which has this action at debug level only (at info the
#: peer continues the write's own task, and a failed copy logs COPY_FAILED).
PEER_CALL = leveled("replication", INFO, ActionType(
    "kvresponder:replication:peer-call", [PEER, OP], [CODE],
    "A call to a peer's internal endpoint."))

PEER_READ = leveled("replication", DEBUG, ActionType(
    "kvresponder:replication:peer-read", [PEER, OP], [CODE],
    "A read from a peer's internal endpoint."))

COPY_FAILED = leveled("replication", INFO, MessageType(
    "kvresponder:replication:copy-failed",
    [KEY, PEER, Field.for_types("reason", [str], "Why: unreachable, timed out, an error status, or left.")],
    "A node did not store its copy of a write; the write fails over to the next node on the ring."))

HINTED = leveled("replication", INFO, MessageType(
    "kvresponder:replication:hinted", [KEY, Field.for_types("owner", [str], "The unreachable owner."),
                                       Field.for_types("holder", [str], "The node holding the hint.")],
    "An owner was unreachable, so the next node on the ring keeps a copy for it."))

READ_REPAIR = leveled("replication", INFO, MessageType(
    "kvresponder:replication:read-repair", [KEY, Field.for_types("peers", [list], "Stale replicas.")],
    "Stale replicas seen during a read were sent the newest version."))
