"""
Eliot types of the replication area: the coordinator and its peer calls.
"""

from eliot import ActionType, Field, MessageType

from . import DEBUG, INFO, WARNING, leveled
from .http import DURATION, STATUS

KEY = Field.for_types("key", [str], "The key.")
OP = Field.for_types("op", [str], "put, delete, get, ...")
PEER = Field.for_types("peer", [str], "The peer's node id.")
TARGETS = Field.for_types("targets", [list], "Nodes chosen, in order of preference.")
VERSION = Field.for_types("version", [str], "The write's version.")
COPIES = Field.for_types("copies", [int], "Copies stored.")
CODE = Field.for_types("code", [int], "HTTP status answered by the peer.")

#: Debug, as a read's is: at info a write's tree is the client request's action with each node's store line or
#: action in it (and any ``copy-failed`` or ``hinted``), and this action around them would be a sizeable share of
#: a replicated write's cost. (With the http area above info there is no request action, and each node's store
#: line or action is a task of its own.)
COORDINATE_WRITE = leveled("replication", DEBUG, ActionType(
    "kvresponder:replication:write", [KEY, OP, VERSION, TARGETS], [COPIES],
    "This node coordinated a write to the key's replicas."))

COORDINATE_READ = leveled("replication", DEBUG, ActionType(
    "kvresponder:replication:read", [KEY, TARGETS],
    [Field.for_types("found", [bool], "Whether a live value was found.")],
    "This node coordinated a read from the key's replicas."))

#: Every peer call but one replicated client write, which has this action at debug level only (at info the
#: peer continues the caller's task, the client request's, and a failed copy logs COPY_FAILED).
PEER_CALL = leveled("replication", INFO, ActionType(
    "kvresponder:replication:peer-call", [PEER, OP], [CODE],
    "A call to a peer's internal endpoint."))

#: The callee's side of a PEER_CALL: the caller's task, continued on this node around what it does for the call.
PEER_SERVED = leveled("replication", INFO, ActionType(
    "kvresponder:replication:peer-served", [Field.for_types("route", [str], "The internal route called.")],
    [STATUS, DURATION],
    "This node served a peer's call to one of its internal routes, in the caller's task."))

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

STREAM_OPENED = leveled("replication", INFO, MessageType(
    "kvresponder:replication:stream-opened", [PEER],
    "This node opened a copy stream to a peer: its writes' copies go there over one upgraded connection."))

STREAM_CLOSED = leveled("replication", INFO, MessageType(
    "kvresponder:replication:stream-closed", [PEER, Field.for_types("batches", [int], "Batches it answered.")],
    "A copy stream to a peer closed; the next write to it opens another."))

STREAM_REFUSED = leveled("replication", WARNING, MessageType(
    "kvresponder:replication:stream-refused",
    [PEER, Field.for_types("code", [int], "The status it answered the upgrade with (0: none)."),
     Field.for_types("retry_after", [float], "Seconds until the stream is tried again.")],
    "A peer did not upgrade to a copy stream; copies go to it as HTTP requests meanwhile."))

STREAM_ACCEPTED = leveled("replication", INFO, MessageType(
    "kvresponder:replication:stream-accepted",
    [Field.for_types("address", [str], "The caller's address and port.")],
    "A peer opened a copy stream to this node."))

STREAM_REJECTED = leveled("replication", WARNING, MessageType(
    "kvresponder:replication:stream-rejected",
    [Field.for_types("address", [str], "The caller's address and port."),
     Field.for_types("reason", [str], "What was wrong with its frame.")],
    "A copy stream sent a frame that failed its checks (MAC, order, size); the connection was dropped."))

CLOCK_REJECTED = leveled("replication", WARNING, MessageType(
    "kvresponder:replication:clock-rejected",
    [KEY, VERSION, Field.for_types("count", [int], "Entries with such a version since the last such line.")],
    "A peer's entry carried a version further ahead of this node's clock than MAX_CLOCK_OFFSET: it is stored by "
    "version order, but this node's clock does not adopt its time. At most one line every 10 s; "
    "kv_clock_rejected_timestamps_total counts every one."))

PEER_SUSPECTED = leveled("replication", WARNING, MessageType(
    "kvresponder:replication:peer-suspected",
    [PEER, Field.for_types("reason", [str], "What the call that found it unreachable failed with."),
     Field.for_types("seconds", [float], "Seconds during which calls to it fail at once.")],
    "A call to a peer could not connect, or got no answer in time: for a few seconds, calls to it fail at once "
    "(writes fail over to the next node, reads ask the other owners), then it is tried again."))
