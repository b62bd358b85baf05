"""
The copy stream: the copies of client writes sent to one peer over one long-lived connection, and the
coordinator's reads of keys from it.

A coordinator sends a write's copies to a peer in batches (:meth:`kvresponder.peers.PeerClient.apply_coalesced`).
As an HTTP request, each batch costs Twisted's HTTP client and treq more CPU than the writes it carries, and
the peer's HTTP server as much again, where a frame on an open connection costs little (measured by
``bench/copy_stream.py``; see docs/ARCHITECTURE.md, "Copy streams"). So each node keeps, for each peer it writes
to or reads from, one connection upgraded from HTTP to a stream of frames. The upgrade is an internal call like
any other, on the same port and signed the same way::

    GET /<tenant>/_internal/copies HTTP/1.1
    Connection: Upgrade
    Upgrade: kvresponder-copies/2
    X-KV-Auth: <signature, with a cluster secret>

    HTTP/1.1 101 Switching Protocols
    Connection: Upgrade
    Upgrade: kvresponder-copies/2
    X-KV-Stream-Nonce: <32 hex digits>

Then each side sends frames, each a 4-byte big-endian length and that many bytes:

- a batch (caller to peer): batch id (4 bytes), MAC (16 bytes), length of the task-id list (4 bytes), the task
  ids (space-separated, as ``X-Eliot-Task-Ids`` carries them over HTTP), and the batch body
  (:func:`kvresponder.wire.encode_batch`);
- an answer (peer to caller): the batch id (4 bytes), an HTTP status (2 bytes), and either one byte an entry
  (bit 0: newer there and stored; bit 1: it replaced a live value; bit 2: not stored, because the peer holds
  a newer version, which follows) for 200, then each such newer version in the entries' order (wall ms,
  8 bytes; counter, 4 bytes; node id length, 1 byte; the node id), or the JSON error body.

A node that has begun leaving the cluster stores no batch: it answers each one 503 ``leaving``, and the caller
fails its copies over to the next node on its ring, as it does a 503 over HTTP.

A peer whose 101 carries ``X-KV-Stream-Reads: 1`` also serves reads on the stream, as ``/_internal/get`` does
over HTTP (a read over HTTP cost the caller about as much as a batch of copies did): a read frame is a batch
frame whose task-id list is ``?`` (:data:`READ_MARKER`, which no task-id list is) and whose body is the keys,
each a 2-byte length and the key (:func:`encode_keys`). Its answer is 200, then one byte a key (1: found, 0:
not), then the entries found, tombstones included, as a batch (:func:`encode_read_answer`); or 413 if they come
to more than :data:`MAX_READ_ANSWER` bytes, which the caller then reads over HTTP. A leaving node still serves
reads. Older peers send no such header and get no read frames.

Each frame leaves with one ``send`` when it is written (:func:`kvresponder.sendnow.send_now`), and both ends turn
Nagle's algorithm off, so that a frame sent while the last is unacknowledged does not wait for its ACK.

The MAC is BLAKE2b keyed with the peer key, 16 bytes, over the nonce the peer chose for this connection and the
rest of the frame (zeros without a cluster secret; version 1 used HMAC-SHA256, and the versions refuse each
other's upgrade, so that nodes of both during a rolling upgrade send their copies over HTTP). Batch ids only
increase, so a frame cannot be replayed on this or another connection. Answers are not signed, as HTTP answers
are not.

A peer that answers the upgrade with anything but 101 (an older version, a proxy or mesh that does not pass
upgrades, a TLS listener) is called over HTTP instead for :data:`REFUSED_FOR` seconds, batch for batch as
before; the caller sees no difference but speed.
"""

import binascii
import hmac
import json
import os
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from attr import attrib, attrs
from eliot import write_traceback
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from .digest import blake2b16
from .hlc import version_from_wire
from .log.replication import STREAM_CLOSED, STREAM_OPENED, STREAM_REFUSED, STREAM_REJECTED
from .sendnow import no_delay, send_now
from .store import ApplyResult, Entry, EntryTooLarge
from .batcher import MAX_BATCH_BYTES, MAX_COALESCED
from .wire import MAX_KEY_BYTES, decode_batch, encode_batch

UPGRADE_TOKEN = b"kvresponder-copies/2"
NONCE_HEADER = b"X-KV-Stream-Nonce"
#: In the 101: this peer serves reads on the stream.
READS_HEADER = b"X-KV-Stream-Reads"
#: The task-id list of a frame of keys to read.
READ_MARKER = b"?"
#: Bytes of entries (:attr:`~kvresponder.store.Entry.size`) a read's answer carries at most: past it, the answer
#: is 413 and the caller reads those keys over HTTP, which answers in parts. Well under the caller's frame limit.
MAX_READ_ANSWER = 2 * 1024 * 1024
_KEY_LENGTH = struct.Struct("!H")
#: Seconds a peer that refused the upgrade is called over HTTP before the stream is tried again.
REFUSED_FOR = 60.0
#: Largest answer head (the 101 and its headers) a caller reads.
MAX_HEAD = 16384
MAC_SIZE = 16
_NO_MAC = b"\0" * MAC_SIZE
_ID = struct.Struct("!I")
#: Batch ids are 4 bytes: a stream that has used them all closes, and the next batch opens another.
MAX_BATCH_ID = (1 << 32) - 1
_ANSWER = struct.Struct("!IH")
_HEADER = struct.Struct("!I16sI")
#: The error a node that is leaving the cluster answers a batch of copies with, on its stream and over HTTP
#: (``/_internal/apply``), with status 503: an answer, so the sender fails the copies over to the next node at once
#: and does not take the node for unreachable (:mod:`kvresponder.suspects`).
LEAVING_ERROR = "leaving"
LEAVING_MESSAGE = "This node is leaving the cluster and stores no copies; store them on the next node."


class StreamRefused(Exception):
    """
    The peer answered the upgrade with something else than 101: call it over HTTP.

    :ivar code: the status it answered, or ``None`` if its answer was not HTTP.
    """

    def __init__(self, code: Optional[int]) -> None:
        Exception.__init__(self, "copy stream refused (%s)" % (code if code is not None else "not HTTP",))
        self.code = code


class StreamUnanswered(Exception):
    """
    The peer took the connection but hung up, or said nothing in time, instead of answering the upgrade (a
    proxy that drops unknown upgrades, a listener that is not HTTP, a peer that is stuck). The batch fails over;
    the next ones go over HTTP for :data:`REFUSED_FOR` seconds.
    """


class StreamError(Exception):
    """
    The peer answered a batch with an error status.
    """

    def __init__(self, code: int, message: str, error: Optional[str] = None) -> None:
        Exception.__init__(self, message)
        self.code = code
        #: The ``error`` the answer named (such as :data:`LEAVING_ERROR`), or ``None``.
        self.error = error


class ReadsUnsupported(Exception):
    """
    The peer's stream serves no reads (a node older than them): read over HTTP.
    """


class StreamTimeout(Exception):
    """
    The peer did not answer a batch, or the upgrade, in time.
    """


class _Mac:
    """
    Frame MACs of one connection: BLAKE2b keyed with ``key``, of :data:`MAC_SIZE` bytes, over the connection's
    nonce and the frame's parts. A keyed BLAKE2b is a MAC by construction; version 1 of the stream used
    HMAC-SHA256, which on PyPy cost more a frame (SHA-256 goes through ``hashlib``'s cffi wrapper there, where
    :func:`~kvresponder.digest.blake2b16` calls BLAKE2b directly).
    """

    def __init__(self, key: Optional[bytes], nonce: bytes) -> None:
        self._digest = None if key is None else blake2b16(key)
        self._nonce = nonce

    def __call__(self, *parts: bytes) -> bytes:
        if self._digest is None:
            return _NO_MAC
        return self._digest(self._nonce + b"".join(parts))


_NEWER = struct.Struct("!qIB")


def encode_answer(batch_id: int, results: Sequence[ApplyResult]) -> bytes:
    flags = bytes([int(r.applied) | (int(r.had_live) << 1) | (4 if r.newer is not None else 0) for r in results])
    newer = [r.newer for r in results if r.newer is not None]
    if not newer:
        return _ANSWER.pack(batch_id, 200) + flags
    parts = [_ANSWER.pack(batch_id, 200), flags]
    for wall, counter, node in newer:
        node_bytes = node.encode("utf-8")
        parts.append(_NEWER.pack(wall, counter, len(node_bytes)) + node_bytes)
    return b"".join(parts)


#: The results that carry no newer version, by their flags: shared (they are immutable) rather than built for each
#: entry of every answer.
_PLAIN_RESULTS = [ApplyResult(bool(flags & 1), bool(flags & 2)) for flags in range(256)]


def decode_results(payload: bytes, count: int) -> List[ApplyResult]:
    """
    The results of a batch of ``count`` entries from an answer's payload.

    :raises ValueError: if it is malformed.
    """
    if len(payload) < count:
        raise ValueError("an answer shorter than its batch")
    results = []
    offset = count
    try:
        for flags in payload[:count]:
            if not flags & 4:
                results.append(_PLAIN_RESULTS[flags])
                continue
            wall, counter, length = _NEWER.unpack_from(payload, offset)
            offset += _NEWER.size
            if offset + length > len(payload):
                raise ValueError("a malformed answer: a node id past its end")
            node = payload[offset:offset + length].decode("utf-8")
            offset += length
            # Checked as the HTTP answer's is (``version_from_wire``): the write stamps itself above it.
            newer = version_from_wire([wall, counter, node])
            results.append(ApplyResult(bool(flags & 1), bool(flags & 2), newer))
    except (struct.error, UnicodeDecodeError) as error:
        raise ValueError("a malformed answer: %s" % (error,))
    if offset != len(payload):
        raise ValueError("an answer longer than its batch")
    return results


def encode_keys(keys: Sequence[str]) -> bytes:
    """
    The body of a read frame: each key's UTF-8 length (2 bytes) and the key.
    """
    parts = []
    for key in keys:
        data = key.encode("utf-8")
        parts.append(_KEY_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_keys(body: bytes) -> List[str]:
    """
    :raises ValueError: unless ``body`` holds 1 to MAX_COALESCED keys of 1 to MAX_KEY_BYTES bytes of UTF-8.
    """
    keys = []
    offset, size = 0, len(body)
    while offset < size:
        if offset + _KEY_LENGTH.size > size:
            raise ValueError("a key's length past the end of the body")
        (length,) = _KEY_LENGTH.unpack_from(body, offset)
        offset += _KEY_LENGTH.size
        if not 0 < length <= MAX_KEY_BYTES or offset + length > size:
            raise ValueError("a key of %d bytes" % (length,))
        keys.append(body[offset:offset + length].decode("utf-8"))
        offset += length
        if len(keys) > MAX_COALESCED:
            raise ValueError("more than %d keys" % (MAX_COALESCED,))
    if not keys:
        raise ValueError("no key")
    return keys


def encode_read_answer(batch_id: int, entries: Sequence[Optional[Entry]], now: float) -> bytes:
    """
    The answer to a read frame: one byte a key (1: found), then the entries found as a batch.
    """
    found = [entry for entry in entries if entry is not None]
    return (_ANSWER.pack(batch_id, 200) + bytes(0 if entry is None else 1 for entry in entries)
            + encode_batch(found, now))


def decode_read_answer(payload: bytes, count: int, now: float) -> List[Optional[Entry]]:
    """
    The entries (or ``None``) a read frame's answer gives for its ``count`` keys, in order.

    :raises ValueError: if it is malformed.
    """
    flags = payload[:count]
    if len(flags) != count or flags.strip(b"\0\1"):
        raise ValueError("malformed read answer")
    found = decode_batch(payload[count:], now)
    if len(found) != flags.count(1):
        raise ValueError("a read answer with %d entries for %d found" % (len(found), flags.count(1)))
    entries = iter(found)
    return [next(entries) if flag else None for flag in flags]


def _error_answer(batch_id: int, code: int, error: str, message: str) -> bytes:
    body = json.dumps({"error": error, "message": message}, separators=(",", ":")).encode("utf-8")
    return _ANSWER.pack(batch_id, code) + body


# -- the peer's side --------------------------------------------------------------------------------


#: Seconds a stream carries no batch before either end closes it (the next write opens another). The caller's end
#: needs its own: a peer that vanished (its host gone, no FIN or RST) never closes its end, and a stream to an
#: address no longer written to would otherwise stay open for good.
IDLE_SECONDS = 30.0


class _FrameReceiver(Protocol):
    """
    Frames of a 4-byte big-endian length and that many bytes, as ``Int32StringReceiver`` reads them, delivered
    to ``stringReceived``; one over ``MAX_LENGTH`` goes to ``lengthLimitExceeded`` instead. A frame that arrives
    over many reads is joined once, when all of it is in: ``Int32StringReceiver`` joins all it holds to each read,
    and a batch of 8 MiB arriving in 64 KiB reads was copied over a hundred times (the time grows with the square
    of the frame), on the reactor's thread. ``stop_reading()`` drops whatever follows. While ``hold()`` is in
    force no frame is delivered: the rest of a read waits for ``release()``.
    """

    MAX_LENGTH = 99999

    _parts: Optional[List[bytes]] = None
    _have = 0
    _need = 0
    _stopped = False
    #: Bytes read and not yet parsed while held (``None``: not held).
    _held: Optional[bytes] = None

    def stop_reading(self) -> None:
        self._stopped = True
        self._parts = None
        self._held = None

    def hold(self) -> None:
        """
        Deliver no more frames, from this read or later ones, until :meth:`release`.
        """
        if self._held is None:
            self._held = b""

    def release(self) -> None:
        """
        Deliver the frames held back by :meth:`hold`, and those read from now on.
        """
        held, self._held = self._held, None
        if held:
            self.dataReceived(held)

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._held is not None:
            self._held += data
            return
        if self._parts is not None:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                if len(self._parts) >= 1024:
                    # Reads of a few bytes each: a list item a read would hold many times the frame's size.
                    self._parts = [b"".join(self._parts)]
                return
            data = b"".join(self._parts)
            self._parts = None
        offset, end = 0, len(data)
        while end - offset >= 4:
            (length,) = _ID.unpack_from(data, offset)
            if length > self.MAX_LENGTH:
                self.stop_reading()
                self.lengthLimitExceeded(length)
                return
            stop = offset + 4 + length
            if stop > end:
                break
            frame = data[offset + 4:stop]
            offset = stop
            self.stringReceived(frame)
            if self._stopped:
                return
            if self._held is not None:
                self._held = data[offset:]
                return
        if offset < end:
            rest = data[offset:]
            self._parts = [rest]
            self._have = len(rest)
            self._need = 4 + _ID.unpack_from(rest)[0] if len(rest) >= 4 else 4

    def stringReceived(self, frame: bytes) -> None:
        raise NotImplementedError()

    def lengthLimitExceeded(self, length: int) -> None:
        self.transport.abortConnection()


class CopyStreamServer(_FrameReceiver):
    """
    The peer's end of a copy stream: applies each batch and answers it, in order.

    :param apply: ``apply(entries, task_ids)`` returning one :class:`ApplyResult` an entry
        (:meth:`kvresponder.coordinator.Coordinator.apply_copies`).
    :param key: the peer key of the cluster secret, or ``None`` without one.
    :param bytes nonce: this connection's nonce, sent in the 101.
    :param int max_frame: the largest frame accepted (:func:`max_frame`); a larger one closes the stream.
    :param on_close: called with the reason when the connection ends (the HTTP channel it came from counts it).
    :param clock: ``IReactorTime``, for the idle timeout.
    :param float idle_timeout: a stream that delivers no whole frame for this long is closed (the caller opens
        another with its next write): so an idle, trickling or vanished caller does not hold a connection.
    :param wall: this node's wall clock in seconds (expiries arrive as the time they have left); by default
        the clock's ``seconds``.
    :param takes_copies: whether the node stores copies now (:meth:`kvresponder.node.Node.takes_copies`); while it
        does not, each batch is answered 503 :data:`LEAVING_ERROR` and nothing is applied.
    :param read: ``read(keys)``, the newest entry this node holds for each key (tombstones included) or ``None``:
        the stream serves read frames (its 101 says so, :func:`upgrade_answer`); ``None``: it does not.
    """

    def __init__(self, apply: Callable[[list, List[bytes]], List[ApplyResult]], key: Optional[bytes],
                 nonce: bytes, max_frame: int, on_close: Callable[[Failure], None], client: str = "",
                 clock=None, idle_timeout: float = IDLE_SECONDS, *, wall: Callable[[], float],
                 takes_copies: Callable[[], bool] = lambda: True,
                 read: Optional[Callable[[List[str]], List[Optional[Entry]]]] = None) -> None:
        self._apply = apply
        self._read = read
        self._takes_copies = takes_copies
        self._wall = wall
        self._mac = _Mac(key, nonce)
        self._signed = key is not None
        self.MAX_LENGTH = max_frame + _HEADER.size
        self._on_close = on_close
        self._client = client
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle_call = None
        self._last_frame = 0.0
        self._last_id = 0

    def connectionMade(self) -> None:
        no_delay(self.transport)
        # The transport tells this protocol when its answers pile up unsent (a caller that sends frames and does
        # not read their answers: a read's answer is up to MAX_READ_ANSWER), and it stops reading frames until
        # they are sent, rather than hold every answer in memory.
        self.transport.registerProducer(self, True)
        if self._clock is not None:
            self._last_frame = self._clock.seconds()
            self._idle_call = self._clock.callLater(self._idle_timeout, self._check_idle)

    def pauseProducing(self) -> None:
        self.hold()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()
        self.release()

    def stopProducing(self) -> None:
        self.stop_reading()

    def _check_idle(self) -> None:
        # Lazy, like the HTTP channel's timers: frames only note the time, and this one timer checks it.
        left = self._last_frame + self._idle_timeout - self._clock.seconds()
        if left > 0:
            self._idle_call = self._clock.callLater(left, self._check_idle)
            return
        self._idle_call = None
        self.transport.abortConnection()

    def stringReceived(self, frame: bytes) -> None:
        if self._clock is not None:
            self._last_frame = self._clock.seconds()
        if len(frame) < _HEADER.size:
            self._reject("a frame shorter than its header")
            return
        batch_id, mac, tasks_length = _HEADER.unpack_from(frame)
        if batch_id <= self._last_id:
            self._reject("batch id %d after %d" % (batch_id, self._last_id))
            return
        if self._signed and not hmac.compare_digest(mac, self._mac(frame[:4], frame[4 + MAC_SIZE:])):
            self._reject("a bad MAC")
            return
        self._last_id = batch_id
        start = _HEADER.size
        if self._read is not None and frame[start:start + tasks_length] == READ_MARKER:
            # Served while leaving too: reads ask a leaving node for what it has not yet handed off.
            send_now(self.transport, self._frame(self._answer_read(batch_id, frame[start + tasks_length:])))
            return
        if not self._takes_copies():
            # A frame already in flight when this node began leaving, or sent by a peer that has not heard it yet:
            # answered, not dropped, so that the sender fails it over now rather than after its timeout.
            send_now(self.transport, self._frame(_error_answer(batch_id, 503, LEAVING_ERROR, LEAVING_MESSAGE)))
            return
        task_ids = frame[start:start + tasks_length].split()
        try:
            if start + tasks_length > len(frame):
                raise ValueError("task ids past the end of the frame")
            entries = decode_batch(frame[start + tasks_length:], self._wall())
        except ValueError as error:
            send_now(self.transport, self._frame(_error_answer(
                batch_id, 400, "invalid_body", "Malformed batch: %s" % (error,))))
            return
        try:
            answer = encode_answer(batch_id, self._apply(entries, task_ids))
        except EntryTooLarge:
            answer = _error_answer(batch_id, 413, "payload_too_large",
                                   "An entry exceeds this node's memory budget.")
        except ValueError as error:
            # An entry that does not fit its schema (kvresponder.http.schemas): the sender's error.
            answer = _error_answer(batch_id, 400, "invalid_body", "Malformed batch: %s" % (str(error)[:200],))
        except Exception:
            write_traceback()
            answer = _error_answer(batch_id, 500, "internal_error", "The server failed to apply the batch.")
        # At once, not at the reactor's next turn: the coordinator's clients are waiting on this answer.
        send_now(self.transport, self._frame(answer))

    def _answer_read(self, batch_id: int, body: bytes) -> bytes:
        try:
            keys = decode_keys(body)
        except ValueError as error:
            return _error_answer(batch_id, 400, "invalid_body", "Malformed read: %s" % (error,))
        try:
            entries = self._read(keys)
            if sum(entry.size for entry in entries if entry is not None) > MAX_READ_ANSWER:
                return _error_answer(batch_id, 413, "payload_too_large", "Read these keys over HTTP.")
            return encode_read_answer(batch_id, entries, self._wall())
        except Exception:
            write_traceback()
            return _error_answer(batch_id, 500, "internal_error", "The server failed to read the keys.")

    @staticmethod
    def _frame(answer: bytes) -> bytes:
        return _ID.pack(len(answer)) + answer

    def _reject(self, why: str) -> None:
        STREAM_REJECTED.log(address=self._client, reason=why)
        # Nothing after the bad frame is read, even what arrived with it.
        self.stop_reading()
        self.transport.abortConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self._reject("a frame of %d bytes, over the limit of %d" % (length, self.MAX_LENGTH))

    def connectionLost(self, reason=None) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self._on_close(reason)


#: Room in a frame for its batch's task ids: MAX_COALESCED of them, each a serialized Eliot task id.
_TASK_IDS_ROOM = MAX_COALESCED * 256


def max_frame(value_limit: int, internal_limit: int) -> int:
    """
    The largest frame a peer sends on a copy stream, for a node whose values are at most ``value_limit`` bytes:
    a batch closes once its entries pass MAX_BATCH_BYTES, so it holds at most that and one more entry (each a
    value, its key and their framing), with their task ids. Never more than ``internal_limit``, an
    ``/_internal/apply`` body's. A larger frame closes the stream unread: until a frame is whole its MAC cannot be
    checked, and a stream opened with a replayed upgrade could otherwise make the node hold 64 MiB of junk.
    """
    entry = value_limit + MAX_KEY_BYTES + 64
    return min(internal_limit, MAX_BATCH_BYTES + 2 * entry + _TASK_IDS_ROOM)


def upgrade_answer(nonce: bytes, reads: bool = False) -> bytes:
    """
    The 101 that opens a stream; with ``reads``, saying that the stream serves read frames.
    """
    return (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + UPGRADE_TOKEN +
            b"\r\n" + NONCE_HEADER + b": " + binascii.hexlify(nonce) + b"\r\n" +
            (READS_HEADER + b": 1\r\n" if reads else b"") + b"\r\n")


def new_nonce() -> bytes:
    return os.urandom(16)


# -- the caller's side ------------------------------------------------------------------------------


@attrs(slots=True)
class _Pending:
    """
    A batch sent on a :class:`CopyStreamClient` and not answered yet.
    """

    #: Fires with the answer's payload, or fails.
    waiter = attrib()
    #: When its answer is due, by the stream's clock.
    due = attrib()


class CopyStreamClient(Int32StringReceiver):
    """
    The caller's end of one copy stream: sends the upgrade, then batches, and matches their answers.

    :param bytes upgrade: the whole upgrade request.
    :param key: the peer key, or ``None``.
    :param clock: ``IReactorTime``, for each batch's timeout, and the stream's idle timeout.
    :param idle_timeout: the stream closes once no batch has been sent, and none is out, for this long.
    """

    MAX_LENGTH = 4 * 1024 * 1024

    def __init__(self, upgrade: bytes, key: Optional[bytes], clock, idle_timeout: float = IDLE_SECONDS) -> None:
        #: Called with no argument once the connection is gone (:meth:`notify_close`).
        self._on_close: Optional[Callable[[], None]] = None
        self._upgrade = upgrade
        self._key = key
        self._clock = clock
        self._head = b""
        self._mac = None
        self.upgraded = False
        #: Whether the peer serves read frames on this stream (its 101 said so).
        self.reads = False
        self.closed = False
        self.answered = 0
        self.ready: Deferred = Deferred()
        self._next_id = 0
        #: Batches sent and not answered, by id, in the order sent (the order they are answered in).
        self._pending: Dict[int, _Pending] = {}
        #: One timer for the oldest unanswered batch, rather than one a batch: answers come in order, so
        #: the oldest is the first to be late; with none out, for the stream's idle timeout.
        self._timer = None
        self._idle_timeout = idle_timeout
        self._last_sent = clock.seconds()

    def connectionMade(self) -> None:
        if self.closed:
            # Closed (the node is stopping) while the connection was being made.
            self.transport.abortConnection()
            return
        no_delay(self.transport)
        self.transport.write(self._upgrade)

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            Int32StringReceiver.dataReceived(self, data)
            return
        if self.closed:
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._refused(None)
            return
        head, rest = self._head[:end], self._head[end + 4:]
        self._head = b""
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        code = int(status[1]) if len(status) > 1 and status[1].isdigit() else None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        try:
            nonce = binascii.unhexlify(headers.get(NONCE_HEADER.lower(), b""))
        except (binascii.Error, ValueError):
            nonce = b""
        if code != 101 or headers.get(b"upgrade", b"").lower() != UPGRADE_TOKEN or len(nonce) != 16:
            self._refused(code)
            return
        self._mac = _Mac(self._key, nonce)
        self.reads = headers.get(READS_HEADER.lower()) == b"1"
        self.upgraded = True
        if self._timer is None:
            # Idle from now until its first batch: a stream opened and never sent on (its first use a read the
            # peer does not serve) still closes once idle, and its peer can vanish without holding it open.
            self._last_sent = self._clock.seconds()
            self._timer = self._clock.callLater(self._idle_timeout, self._check_due)
        if not self.ready.called:
            self.ready.callback(self)
        if rest:
            Int32StringReceiver.dataReceived(self, rest)

    def _refused(self, code: Optional[int]) -> None:
        self.closed = True
        self.transport.loseConnection()
        if not self.ready.called:
            self.ready.errback(StreamRefused(code))

    def send(self, batch: bytes, task_ids: Sequence[bytes], timeout: float) -> Deferred:
        """
        Send one batch (an encoded entry batch); the Deferred fires with the answer's payload (one byte an
        entry) or fails with :class:`StreamError`, :class:`StreamTimeout` or the connection's loss.
        """
        if self.closed:
            return fail(ConnectionDone("the copy stream is closed"))
        if self._next_id >= MAX_BATCH_ID:
            self.close()
            return fail(ConnectionDone("the copy stream has used all its batch ids"))
        self._next_id += 1
        batch_id = self._next_id
        head = _ID.pack(batch_id)
        tasks = b" ".join(task_ids)
        tail = _ID.pack(len(tasks)) + tasks
        mac = self._mac(head, tail, batch)
        send_now(self.transport, b"".join([_ID.pack(len(head) + MAC_SIZE + len(tail) + len(batch)), head, mac, tail,
                                           batch]))
        d: Deferred = Deferred()
        now = self._last_sent = self._clock.seconds()
        due = now + timeout
        self._pending[batch_id] = _Pending(d, due)
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(timeout, self._check_due)
        elif due < timer.getTime():
            # A shorter timeout than the oldest batch's: the timer must not wait past it.
            timer.reset(timeout)
        return d

    def stringReceived(self, frame: bytes) -> None:
        if len(frame) < _ANSWER.size:
            self.closed = True
            self.stopProducing()
            self.transport.abortConnection()
            return
        batch_id, code = _ANSWER.unpack_from(frame)
        pending = self._pending.pop(batch_id, None)
        if pending is None:
            return
        d = pending.waiter
        # The timer stays when no batch is left out: it finds none when it fires, and stops. Cancelled at each
        # answer, it was a timer made and cancelled for every batch.
        self.answered += 1
        payload = frame[_ANSWER.size:]
        if code == 200:
            d.callback(payload)
            return
        try:
            answer = json.loads(payload)
            message, error = str(answer.get("message", "")), answer.get("error")
        except (ValueError, AttributeError, RecursionError):
            # Whatever the body holds, the batch it answers must still fail: it is no longer pending, so
            # neither the timer nor the connection's loss would settle it.
            message, error = "", None
        d.errback(StreamError(code, "answered %d: %s" % (code, message), error if isinstance(error, str) else None))

    def _check_due(self) -> None:
        """
        The stream's timer: fail the first batch whose answer is late, or wait on until the next one is due;
        with none out, close the stream once it has been idle for its idle timeout.
        """
        self._timer = None
        if self.closed:
            return
        now = self._clock.seconds()
        if not self._pending:
            idle_left = self._last_sent + self._idle_timeout - now
            if idle_left > 0:
                self._timer = self._clock.callLater(idle_left, self._check_due)
            else:
                self.close()
            return
        # Usually one or two batches are out: the first is the oldest, but a later one may have a shorter
        # timeout.
        batch_id, oldest = min(self._pending.items(), key=lambda item: item[1].due)
        due = oldest.due
        if due > now:
            self._timer = self._clock.callLater(due - now, self._check_due)
            return
        # The stream is ordered: a batch unanswered in time means every later one will be late too. They fail
        # with it, as timed out, not with the connection's loss a turn later, which a retry on a new connection
        # would take for a stream that merely died, and wait again on a peer just found unresponsive.
        pending, self._pending = self._pending, {}
        d = pending.pop(batch_id).waiter
        self.closed = True
        self.transport.abortConnection()
        d.errback(StreamTimeout("no answer to a batch within its timeout"))
        for behind in pending.values():
            behind.waiter.errback(StreamTimeout("an earlier batch on this stream went unanswered within its timeout"))

    def notify_close(self, callback: Callable[[], None]) -> None:
        """
        Call ``callback()`` once the connection is gone.
        """
        self._on_close = callback

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.loseConnection()

    def abandon(self) -> None:
        """
        Give the stream up before it opened (its upgrade failed, or the node is stopping): no batch is sent on it,
        and its connection, if made, is aborted (at once, or as soon as it is made).
        """
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        if not self.ready.called:
            self.ready.errback(StreamUnanswered("the peer hung up without answering the upgrade"))
        pending, self._pending = self._pending, {}
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        for unanswered in pending.values():
            unanswered.waiter.errback(ConnectionLost("the copy stream closed with the batch unanswered"))
        if self._on_close is not None:
            self._on_close()


class _Noted:
    """
    Peer addresses noted for :data:`REFUSED_FOR` seconds (a refused upgrade, a stream that serves no reads). Pods
    get new addresses at every restart: once it holds 64, the expired are dropped before one more is noted, as an
    address is dropped only when it is asked about again.
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self.until: Dict[Tuple[str, int], float] = {}

    def __contains__(self, address: Tuple[str, int]) -> bool:
        until = self.until.get(address)
        if until is None:
            return False
        if self._clock.seconds() < until:
            return True
        del self.until[address]
        return False

    def note(self, address: Tuple[str, int]) -> None:
        now = self._clock.seconds()
        if len(self.until) >= 64:
            self.until = {noted: until for noted, until in self.until.items() if until > now}
        self.until[address] = now + REFUSED_FOR


class CopyStreams:
    """
    One copy stream to each peer this node writes to, opened on first use.

    :param clock: ``IReactorTime``.
    :param endpoint_for: ``endpoint_for(address, port)``, an ``IStreamClientEndpoint`` to the peer.
    :param str tenant: the path prefix of the internal routes.
    :param authenticator: a :class:`~kvresponder.peers.PeerAuthenticator`, or ``None``.
    :param metrics: receives ``copy_stream_refused()``, and reads ``kv_copy_streams_outgoing`` from
        :meth:`open_count`; or ``None``.
    :param wall: this node's wall clock in seconds (expiries travel as the time they have left); by default
        the clock's ``seconds``.
    """

    def __init__(self, clock, endpoint_for, tenant: str, authenticator=None, metrics=None,
                 wall: Optional[Callable[[], float]] = None) -> None:
        self._clock = clock
        self._wall = wall or clock.seconds
        self._endpoint_for = endpoint_for
        self._path = ("/%s/_internal/copies" % (tenant,)).encode("ascii")
        self._auth = authenticator
        self._metrics = metrics
        self._open: Dict[Tuple[str, int], CopyStreamClient] = {}
        #: Streams being opened, by address.
        self._opening: Dict[Tuple[str, int], _Opening] = {}
        #: Peers that refused the upgrade: their calls go over HTTP for a while.
        self._refused = _Noted(clock)
        #: Peers whose stream serves no reads (older nodes): reads to them go over HTTP for a while, without a
        #: stream opened to find that out again.
        self._no_reads = _Noted(clock)
        self._closing = False
        if metrics is not None:
            metrics.register_gauge("kv_copy_streams_outgoing", self.open_count)

    def open_count(self) -> int:
        """
        How many streams are open (not closed), one a peer at most.
        """
        return sum(1 for stream in self._open.values() if not stream.closed)

    def usable(self, peer) -> bool:
        """
        Whether to try the stream for ``peer`` (not while it refused the upgrade within REFUSED_FOR).
        """
        return (peer.address, peer.port) not in self._refused

    def send(self, peer, entries, task_ids: Sequence[bytes], timeout: float) -> Deferred:
        """
        Apply ``entries`` on ``peer``, each continuing its task id (``-`` for none).

        :return: a Deferred firing with one :class:`ApplyResult` an entry; failing with
            :class:`StreamRefused` (call the peer over HTTP instead), :class:`StreamError` (it answered an
            error status), or any connection failure, :class:`StreamUnanswered` or :class:`StreamTimeout`.
        """
        batch = encode_batch(entries, self._wall())
        return self._call(peer, batch, task_ids, timeout).addCallback(decode_results, len(entries))

    def read(self, peer, keys: Sequence[str], timeout: float) -> Deferred:
        """
        The newest entry ``peer`` holds for each of ``keys`` (tombstones included), or ``None``.

        :return: a Deferred firing with one entry or ``None`` a key; failing as :meth:`send` does, and with
            :class:`ReadsUnsupported` if the peer's stream serves no reads, or :class:`StreamError` 413 if the
            entries were too large for one answer (read them over HTTP instead).
        """
        key = (peer.address, peer.port)
        if key in self._no_reads:
            return fail(ReadsUnsupported("the peer serves no reads on its copy stream"))
        d = self._call(peer, encode_keys(keys), (READ_MARKER,), timeout)
        d.addErrback(self._noted_no_reads, key)
        return d.addCallback(lambda payload: decode_read_answer(payload, len(keys), self._wall()))

    def _noted_no_reads(self, failure, key):
        if failure.check(ReadsUnsupported):
            self._no_reads.note(key)
        return failure

    def _call(self, peer, body: bytes, task_ids: Sequence[bytes], timeout: float) -> Deferred:
        """
        Send one frame to ``peer`` on its stream, opening one if need be: a Deferred of its answer's payload.
        """
        key = (peer.address, peer.port)
        # The whole call, a connection's opening and a retry included, takes at most ``timeout``: a write that
        # fails over after it must not have waited several timeouts for one peer.
        due = self._clock.seconds() + timeout
        stream = self._open.get(key)
        if stream is not None and not stream.closed:
            d = self._send_by(stream, body, task_ids, due)
            if stream.answered:
                # A stream that has answered before may have died since (a restarted peer, or one that closed
                # it as idle): one retry on a fresh connection, as a kept HTTP connection gets, in the time
                # left. Applying a copy twice is harmless, and so is reading twice.
                d.addErrback(self._retry, peer, key, body, task_ids, due)
            return d
        return self._connect(peer, key, timeout).addCallback(self._send_by, body, task_ids, due)

    def _send_by(self, stream: "CopyStreamClient", body: bytes, task_ids: Sequence[bytes], due: float) -> Deferred:
        if task_ids == (READ_MARKER,) and not stream.reads:
            return fail(ReadsUnsupported("the peer serves no reads on its copy stream"))
        left = due - self._clock.seconds()
        if left <= 0:
            return fail(StreamTimeout("no time left to send the batch after the stream opened"))
        return stream.send(body, task_ids, left)

    def _retry(self, failure, peer, key, body, task_ids, due: float):
        failure.trap(ConnectionLost, ConnectionDone)
        left = due - self._clock.seconds()
        if left <= 0:
            return failure
        return self._connect(peer, key, left).addCallback(self._send_by, body, task_ids, due)

    def _connect(self, peer, key, timeout: float) -> Deferred:
        """
        A Deferred firing with an open stream to ``peer``: the one being opened, or a new one.
        """
        if self._closing:
            return fail(ConnectionDone("the node is stopping"))
        waiter: Deferred = Deferred()
        opening = self._opening.get(key)
        if opening is not None:
            opening.waiters.append(waiter)
            return waiter
        upgrade = [b"GET " + self._path + b" HTTP/1.1", b"Host: %s:%d" % (peer.address.encode("ascii"), peer.port),
                   b"Connection: Upgrade", b"Upgrade: " + UPGRADE_TOKEN]
        if self._auth is not None:
            upgrade.append(b"X-KV-Auth: " + self._auth.sign(b"GET", self._path, b""))
        protocol = CopyStreamClient(b"\r\n".join(upgrade) + b"\r\n\r\n",
                                    self._auth.stream_key() if self._auth is not None else None, self._clock)
        # Registered before connecting: the endpoint may answer at once (a refused address, a bad host).
        opening = self._opening[key] = _Opening(protocol, [waiter])
        try:
            d = self._endpoint_for(peer.address, peer.port).connect(_Once(protocol))
        except Exception:
            d = fail()
        opening.attempt = d
        d.addCallback(lambda _: protocol.ready)
        d.addTimeout(timeout, self._clock, onTimeoutCancel=_upgrade_timed_out)
        d.addCallbacks(self._opened, self._not_opened, callbackArgs=(peer, key), errbackArgs=(peer, key, protocol))
        return waiter

    def _opened(self, stream: CopyStreamClient, peer, key) -> None:
        if self._closing:
            stream.close()
            self._settle(key, Failure(ConnectionDone("the node is stopping")))
            return
        self._open[key] = stream
        STREAM_OPENED.log(peer=peer.node_id)
        stream.notify_close(lambda: self._closed(key, stream, peer))
        self._settle(key, stream)

    def _not_opened(self, failure, peer, key, protocol: CopyStreamClient) -> None:
        connected = protocol.transport is not None
        protocol.abandon()
        refused = failure.check(StreamRefused)
        if not self._closing and (refused or (connected and failure.check(StreamUnanswered, StreamTimeout))):
            # A peer that answered, or took the connection and then failed to answer, gets HTTP requests for a
            # while. Only an answer other than 101 sends this very batch over HTTP: a peer that hung up or said
            # nothing may be stuck, and the batch fails over now rather than wait out a second timeout.
            self._refused.note(key)
            code = failure.value.code if refused else None
            STREAM_REFUSED.log(peer=peer.node_id, code=code or 0, retry_after=REFUSED_FOR)
            if self._metrics is not None:
                self._metrics.copy_stream_refused()
        self._settle(key, failure)

    def _settle(self, key, result) -> None:
        opening = self._opening.pop(key, None)
        for waiter in opening.waiters if opening is not None else ():
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _closed(self, key, stream, peer) -> None:
        if self._open.get(key) is stream:
            del self._open[key]
        STREAM_CLOSED.log(peer=peer.node_id, batches=stream.answered)

    def close(self) -> None:
        """
        Close every stream, and every one being opened, for good (at shutdown). Batches waiting on them fail.
        """
        self._closing = True
        for stream in list(self._open.values()):
            stream.close()
        self._open.clear()
        for opening in list(self._opening.values()):
            protocol, attempt = opening.protocol, opening.attempt
            connected = protocol.transport is not None
            protocol.abandon()
            if not connected and attempt is not None and not attempt.called:
                attempt.cancel()


@attrs(slots=True)
class _Opening:
    """
    A stream being opened: its protocol, the sends waiting for it, and the connection attempt (once made).
    """
    protocol: "CopyStreamClient" = attrib()
    waiters: List[Deferred] = attrib()
    attempt: Optional[Deferred] = attrib(default=None)


def _upgrade_timed_out(result, timeout):
    return Failure(StreamTimeout("no answer to the copy stream's upgrade within %ss" % (timeout,)))


class _Once(Factory):
    """
    A factory building the one protocol it was given.
    """

    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol
