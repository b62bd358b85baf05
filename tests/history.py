"""
A client-side history of operations against the cluster, a bounded load that records into it, and a checker.

Every key has a single writer (each load worker owns its keys and runs its operations one after another), so
the expected final state of a key is fixed by its history:

- the last *acknowledged* operation (PUT answered 200/201, DELETE answered 200 or 404) sets the state: its
  value, or absent;
- an operation whose outcome is *unknown* (a timeout, a refused connection, a 5xx such as 503 "too few
  replicas") may or may not have taken effect, so each unknown operation after the last acknowledged one adds
  its own state to the accepted ones. Unknown operations are never counted as acknowledged.

Every PUT writes a value unique to that operation, so a value read back names the operation that wrote it.

At the end, :func:`check` reads every key through every live node (public GET) and, when the internal routes
are open, each node's own replica (``_internal/get``, ``_internal/keys``), and reports:

- ``lost_writes``: keys whose last acknowledged PUT is not what a node returns (absent or an older value), and
  no later unknown operation explains it; must be 0;
- ``resurrected``: keys whose last acknowledged operation is a DELETE but a node returns an older value;
- ``divergent``: keys that two nodes answer differently;
- ``replica_mismatch``: keys whose live copies are not exactly REPLICATION_FACTOR with one version, or that
  still have a live copy somewhere although absent;
- ``copies``: ``sum(kv_store_keys)`` over live nodes against RF × distinct live keys;
- ``real_time_violations``: keys where a node returns the value of an acknowledged write that another
  acknowledged write to the same key followed with no overlap (it started after the first was acknowledged).
  Whatever the clocks say, that later write must win; must be 0. It does not rely on a single writer per key,
  so a test may write one key through several nodes in turn (the clock scenarios do).
"""

import json
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import requests
from urllib.parse import urlsplit

from kvresponder.discovery import derive_key
from kvresponder.peers import PeerAuthenticator

ABSENT = ("absent",)
ERROR = ("error",)


def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


@dataclass
class Op:
    worker: str
    key: str
    kind: str               # put, delete, get
    value: Optional[str]    # the value written (put) or read (get, None when absent)
    node: str
    start: float
    end: float = 0.0
    outcome: str = "pending"  # ok, unknown, rejected
    status: Optional[int] = None
    version: Optional[str] = None
    detail: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.outcome == "ok" and self.kind in ("put", "delete")


class History:
    """
    Thread-safe record of operations, in per-key order (single writer per key).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: List[Op] = []
        self.by_key: Dict[str, List[Op]] = defaultdict(list)
        self.stale_reads = 0

    def add(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)
            self.by_key[op.key].append(op)

    # -- the expected state ---------------------------------------------------------------------------

    def writes(self, key: str) -> List[Op]:
        return [op for op in self.by_key.get(key, []) if op.kind in ("put", "delete")]

    def accepted_states(self, key: str, before: Optional[float] = None) -> Tuple[set, Optional[Op]]:
        """
        The states a reader may see for ``key`` (values, or ABSENT), and the last acknowledged write. With
        ``before``, only operations that started before that time count (an online read).
        """
        writes = self.writes(key)
        if before is not None:
            writes = [op for op in writes if op.start < before]
        last_ack_index = None
        for index, op in enumerate(writes):
            if op.acknowledged and (before is None or op.end <= before):
                last_ack_index = index
        states = set()
        if last_ack_index is None:
            states.add(ABSENT)
            tail = writes
            last = None
        else:
            last = writes[last_ack_index]
            states.add(_state_after(last))
            tail = writes[last_ack_index + 1:]
        for op in tail:
            if op.outcome != "rejected":
                states.add(_state_after(op))
        return states, last

    def keys(self) -> List[str]:
        return sorted(self.by_key)

    def counts(self) -> Dict[str, int]:
        counts = defaultdict(int)
        for op in self.ops:
            counts["%s_%s" % (op.kind, op.outcome)] += 1
        counts["stale_reads"] = self.stale_reads
        return dict(counts)


def _state_after(op: Op):
    return op.value if op.kind == "put" else ABSENT


# -- performing and recording operations ----------------------------------------------------------------

def _quote(key: str) -> str:
    return requests.utils.quote(key, safe="")


def perform(history: History, s: requests.Session, url: str, node: str, worker: str, kind: str, key: str,
            value: Optional[str] = None, timeout: float = 3.0) -> Op:
    """
    Run one operation through the node at ``url`` and record it.
    """
    op = Op(worker, key, kind, value, node, time.monotonic())
    try:
        if kind == "put":
            response = s.put(url + "/kv/" + _quote(key), json={"value": value}, timeout=timeout)
        elif kind == "delete":
            response = s.delete(url + "/kv/" + _quote(key), timeout=timeout)
        else:
            response = s.get(url + "/kv/" + _quote(key), timeout=timeout)
    except requests.RequestException as error:
        op.end = time.monotonic()
        op.outcome = "unknown"
        op.detail = type(error).__name__
        history.add(op)
        return op
    op.end = time.monotonic()
    op.status = response.status_code
    if kind == "put" and response.status_code in (200, 201):
        op.outcome = "ok"
        op.version = response.json().get("version")
    elif kind == "delete" and response.status_code in (200, 404):
        op.outcome = "ok"
    elif kind == "get" and response.status_code in (200, 404):
        op.outcome = "ok"
        if response.status_code == 200:
            body = response.json()
            op.value, op.version = body.get("value"), body.get("version")
        else:
            op.value = None
    elif response.status_code >= 500:
        op.outcome = "unknown"
        op.detail = response.text[:200]
    else:
        op.outcome = "rejected"
        op.detail = response.text[:200]
    if kind == "get" and op.outcome == "ok":
        states, _ = history.accepted_states(key, before=op.start)
        # A write whose acknowledgement overlapped the read may be seen or not.
        overlapping = {_state_after(w) for w in history.writes(key) if w.start < op.end and w.end > op.start}
        seen = ABSENT if op.value is None else op.value
        if seen not in states | overlapping:
            with history._lock:
                history.stale_reads += 1
    history.add(op)
    return op


class Load:
    """
    A bounded load: ``workers`` threads, each owning ``keys_per_worker`` keys, doing PUT (55%), DELETE (15%)
    and GET (30%) through the nodes ``targets()`` returns (round robin), ``pause`` seconds apart, until
    ``max_ops`` per worker, ``max_seconds`` or :meth:`stop`. A worker that runs out before :meth:`stop` is
    named in :attr:`ran_out`: a chaos test whose faults came after its load had ended proved nothing under load.

    :param targets: returns ``[(node_id, base_url), ...]`` to spread requests over; read at every op, so a
        test can drop a node it is about to kill.
    """

    def __init__(self, history: History, targets: Callable[[], Sequence[Tuple[str, str]]], prefix: str,
                 workers: int = 4, keys_per_worker: int = 25, max_ops: int = 100000, max_seconds: float = 60.0,
                 pause: float = 0.005, timeout: float = 3.0, seed: int = 1) -> None:
        self.history = history
        self.targets = targets
        self.prefix = prefix
        self.workers = workers
        self.keys_per_worker = keys_per_worker
        self.max_ops = max_ops
        self.max_seconds = max_seconds
        self.pause = pause
        self.timeout = timeout
        self.seed = seed
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        #: The workers that ran out of operations or time before :meth:`stop`.
        self.ran_out: List[str] = []
        #: What stopped a worker thread, if anything did (an exception in a thread fails no test by itself).
        self.errors: List[str] = []

    def keys_of(self, worker: int) -> List[str]:
        return ["%s-w%d-k%03d" % (self.prefix, worker, j) for j in range(self.keys_per_worker)]

    def start(self) -> "Load":
        for worker in range(self.workers):
            thread = threading.Thread(target=self._run, args=(worker,), daemon=True,
                                      name="load-%s-%d" % (self.prefix, worker))
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self._threads), "load workers did not stop"

    def _run(self, worker: int) -> None:
        try:
            self._work(worker)
        except BaseException as error:  # noqa: B036 -- recorded, and asserted on by stop()'s callers
            self.errors.append("worker %d: %s: %s" % (worker, type(error).__name__, error))

    def _work(self, worker: int) -> None:
        rng = random.Random(self.seed * 1000 + worker)
        keys = self.keys_of(worker)
        sessions: Dict[str, requests.Session] = {}
        name = "%s-w%d" % (self.prefix, worker)
        deadline = time.monotonic() + self.max_seconds
        for i in range(self.max_ops):
            if self._stop.is_set():
                return
            if time.monotonic() > deadline:
                break
            targets = list(self.targets())
            if not targets:
                time.sleep(0.05)
                continue
            node, url = targets[(i + worker) % len(targets)]
            s = sessions.get(url)
            if s is None:
                s = sessions[url] = _session()
            key = rng.choice(keys)
            roll = rng.random()
            if roll < 0.55:
                op = perform(self.history, s, url, node, name, "put", key, "%s-%d" % (name, i), self.timeout)
            elif roll < 0.70:
                op = perform(self.history, s, url, node, name, "delete", key, None, self.timeout)
            else:
                op = perform(self.history, s, url, node, name, "get", key, None, self.timeout)
            if op.outcome == "unknown":
                # A dead or cut-off node: drop its pooled connections, back off a little.
                sessions.pop(url, None)
                time.sleep(0.05)
            if self.pause:
                time.sleep(self.pause)
        if not self._stop.is_set():
            self.ran_out.append(name)


def preload(history: History, url: str, node: str, prefix: str, count: int) -> List[str]:
    """
    Write ``count`` keys through one node (each must be acknowledged) and record them.
    """
    s = _session()
    keys = []
    for i in range(count):
        key = "%s-%04d" % (prefix, i)
        op = perform(history, s, url, node, "preload", "put", key, "%s-v%d" % (prefix, i), timeout=10)
        assert op.outcome == "ok", (key, op.status, op.detail)
        keys.append(key)
    return keys


# -- checking -------------------------------------------------------------------------------------------

@dataclass
class Report:
    keys: int = 0
    acknowledged_writes: int = 0
    acknowledged_deletes: int = 0
    unknown_writes: int = 0
    live_keys: int = 0
    lost_writes: int = 0
    resurrected: int = 0
    divergent: int = 0
    unreadable: int = 0
    replica_mismatch: int = 0
    replica_checked: bool = False
    store_keys_sum: Optional[float] = None
    expected_copies: Optional[int] = None
    stale_reads: int = 0
    real_time_violations: int = 0
    samples: List[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.samples) < 15:
            self.samples.append(text)

    @property
    def ok(self) -> bool:
        return (self.lost_writes == 0 and self.resurrected == 0 and self.divergent == 0 and self.unreadable == 0
                and self.real_time_violations == 0
                and self.replica_mismatch == 0 and self.store_keys_sum == self.expected_copies)

    def summary(self) -> str:
        return ("keys=%d acked_writes=%d acked_deletes=%d unknown=%d live=%d lost_writes=%d resurrected=%d "
                "divergent=%d unreadable=%d real_time_violations=%d replica_mismatch=%d%s sum(kv_store_keys)=%s "
                "expected=%s stale_reads(online, informational)=%d" % (
                    self.keys, self.acknowledged_writes, self.acknowledged_deletes, self.unknown_writes,
                    self.live_keys, self.lost_writes, self.resurrected, self.divergent, self.unreadable,
                    self.real_time_violations,
                    self.replica_mismatch, "" if self.replica_checked else "(not checked)",
                    self.store_keys_sum, self.expected_copies, self.stale_reads))

    def assert_ok(self) -> None:
        assert self.ok, self.summary() + "\n" + "\n".join(self.samples)


def read_all(url: str, keys: List[str], refused=None) -> Dict[str, object]:
    """
    ``{key: value, ABSENT or ERROR}`` through the node at ``url``; with ``refused``, a 503 ``clock_skew`` (which a
    node whose clock is off may answer) reads as that instead of ERROR.
    """
    s = _session()
    states = {}
    for key in keys:
        try:
            response = s.get(url + "/kv/" + _quote(key), timeout=5)
        except requests.RequestException:
            states[key] = ERROR
            continue
        if response.status_code == 200:
            states[key] = response.json()["value"]
        elif response.status_code == 404:
            states[key] = ABSENT
        elif refused is not None and response.status_code == 503 and "clock_skew" in response.text:
            states[key] = refused
        else:
            states[key] = ERROR
    return states


def _replicas(url: str, keys: List[str], secret: Optional[str] = None) -> Optional[Dict[str, Optional[tuple]]]:
    """
    Each key's entry in this node's own store: ``(value or None, version)`` or None; None if the internal
    routes are closed to this check (a cluster secret it does not know). With ``secret``, the calls are signed
    as a peer's are.
    """
    s = _session()
    authenticator = PeerAuthenticator(derive_key(secret, "peer"), time.time) if secret else None
    path = urlsplit(url).path + "/_internal/get"
    result = {}
    for key in keys:
        body = json.dumps({"key": key}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if authenticator is not None:
            headers["X-KV-Auth"] = authenticator.sign(b"POST", path.encode("ascii"), body).decode("ascii")
        response = s.post(url + "/_internal/get", data=body, headers=headers, timeout=5)
        if response.status_code in (401, 403, 404):
            return None
        response.raise_for_status()
        entry = response.json()["entry"]
        result[key] = None if entry is None else (entry["v"], tuple(entry["ver"]))
    return result


def read_through(nodes, keys: List[str]) -> Dict[str, Dict[str, object]]:
    """
    ``{node_id: {key: value, ABSENT or ERROR}}``: every key read through every node's public API.
    """
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        return dict(zip([node.node_id for node in nodes], pool.map(lambda n: read_all(n.url, keys), nodes)))


def superseded(history: History, write: Op) -> Optional[Op]:
    """
    The first acknowledged write to the same key that started after ``write`` was acknowledged and leaves
    another state, or None. Such a later write must win over ``write`` whatever the nodes' clocks say.
    """
    for later in history.writes(write.key):
        if later.acknowledged and later.start > write.end and _state_after(later) != _state_after(write):
            return later
    return None


def real_time_order_violations(history: History, finals: Dict[str, Dict[str, object]]) -> List[str]:
    """
    The real-time order property, one description per key that breaks it: a node's final state for the key
    is the state of an acknowledged write that a later, non-overlapping acknowledged write superseded.

    A state counts as that write's only if nothing else can explain it: no write whose outcome is unknown
    left the same state, and no acknowledged write with that state is the last of its line. Absence before
    any write is an acknowledged state superseded by every acknowledged put. Values read that no write
    explains are left to :func:`check`.

    :param finals: ``{node_id: {key: state}}``, as :func:`read_through` returns.
    """
    violations = []
    for key in sorted({key for states in finals.values() for key in states}):
        writes = [op for op in history.writes(key) if op.outcome != "rejected"]
        for node, states in sorted(finals.items()):
            seen = states.get(key, ERROR)
            if seen is ERROR:
                continue
            producers = [op for op in writes if _state_after(op) == seen]
            if any(not op.acknowledged for op in producers):
                continue
            beaten = [(op, superseded(history, op)) for op in producers if op.acknowledged]
            if seen is ABSENT:
                first_put = next((op for op in writes if op.acknowledged and op.kind == "put"), None)
                beaten.append((None, first_put))
            if beaten and all(later is not None for _, later in beaten):
                earlier, later = beaten[0]
                violations.append("REAL-TIME ORDER %s on %s: saw %r (%s), but %s %r via %s started %.3fs after "
                                  "that was acknowledged" % (
                                      key, node, seen,
                                      "absent before any write" if earlier is None else "version %s via %s" % (
                                          earlier.version, earlier.node),
                                      later.kind, later.value, later.node,
                                      later.start - (earlier.end if earlier is not None else later.start)))
                break
    return violations


def store_keys_sum(nodes) -> float:
    return sum(node.metric("kv_store_keys") for node in nodes)


def listed_keys(node, prefix: str = "") -> List[str]:
    s = _session()
    response = s.get(node.url + "/kv", params={"prefix": prefix, "limit": 10000}, timeout=10)
    response.raise_for_status()
    return response.json()["keys"]


def settle(nodes, replicas: int, timeout: float = 30.0) -> float:
    """
    Wait until no hint is pending and ``sum(kv_store_keys) == RF × distinct live keys`` (as the cluster
    listing reports them) twice in a row. Returns the seconds it took; does not fail (the check does).
    """
    started = time.monotonic()
    good = 0
    while time.monotonic() - started < timeout:
        try:
            pending = sum(node.metric("kv_handoff_pending") for node in nodes)
            total = store_keys_sum(nodes)
            distinct = len(listed_keys(nodes[0]))
            good = good + 1 if (pending == 0 and total == replicas * distinct) else 0
        except (requests.RequestException, KeyError, ValueError):
            good = 0
        if good >= 2:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def check(history: History, nodes, replicas: int) -> Report:
    """
    Compare the cluster's final state with the history. ``nodes`` are the live nodes (with ``url``,
    ``node_id`` and ``metric(name)``).
    """
    report = Report(stale_reads=history.stale_reads)
    keys = history.keys()
    report.keys = len(keys)
    for op in history.ops:
        if op.kind in ("put", "delete"):
            if op.acknowledged:
                if op.kind == "put":
                    report.acknowledged_writes += 1
                else:
                    report.acknowledged_deletes += 1
            elif op.outcome == "unknown":
                report.unknown_writes += 1
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        reads = dict(zip([node.node_id for node in nodes], pool.map(lambda n: read_all(n.url, keys), nodes)))
        local = dict(zip([node.node_id for node in nodes], pool.map(
            lambda n: _replicas(n.url, keys, (getattr(n, "env", None) or {}).get("CLUSTER_SECRET")), nodes)))
    report.replica_checked = all(value is not None for value in local.values())
    live = 0
    for key in keys:
        states, last = history.accepted_states(key)
        seen = {node: reads[node][key] for node in reads}
        if any(state is ERROR for state in seen.values()):
            report.unreadable += 1
            report.note("unreadable %s: %s" % (key, seen))
        values = {state for state in seen.values() if state is not ERROR}
        if len(values) > 1:
            report.divergent += 1
            report.note("divergent %s: %s" % (key, seen))
        for node, state in seen.items():
            if state is ERROR or state in states:
                continue
            if last is not None and last.kind == "put":
                report.lost_writes += 1
                report.note("LOST %s on %s: saw %r, last acknowledged put %r (version %s, via %s); accepted %s" % (
                    key, node, state, last.value, last.version, last.node, states))
            else:
                report.resurrected += 1
                report.note("resurrected %s on %s: saw %r, accepted %s" % (key, node, state, states))
            break
        final = next(iter(values)) if len(values) == 1 else None
        if final is not None and final is not ABSENT:
            live += 1
        if report.replica_checked:
            holders = {node: local[node][key] for node in local
                       if local[node][key] is not None and local[node][key][0] is not None}
            versions = {entry[1] for entry in holders.values()}
            if final is ABSENT and holders:
                report.replica_mismatch += 1
                report.note("live copies of absent %s: %s" % (key, holders))
            elif final not in (None, ABSENT) and (len(holders) != min(replicas, len(nodes)) or len(versions) != 1):
                report.replica_mismatch += 1
                report.note("replicas of %s: %s (want %d with one version)" % (key, holders, replicas))
    violations = real_time_order_violations(history, reads)
    report.real_time_violations = len(violations)
    for text in violations:
        report.note(text)
    report.live_keys = live
    report.expected_copies = min(replicas, len(nodes)) * live
    report.store_keys_sum = store_keys_sum(nodes)
    if report.store_keys_sum != report.expected_copies:
        report.note("sum(kv_store_keys)=%s per node %s, expected %d" % (
            report.store_keys_sum, {n.node_id: n.metric("kv_store_keys") for n in nodes}, report.expected_copies))
    return report
