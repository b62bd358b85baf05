"""
Every Prometheus metric, defined once, with the tenant label bound.

Each node owns its own :class:`~prometheus_client.CollectorRegistry`, so several nodes can live in one
process (the in-memory cluster tests) without sharing series. Label values are bounded: routes are templates,
peers and keys never become labels.
"""

import platform
from bisect import bisect_left
from typing import Callable, Dict, List, Tuple

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                   UntypedMetricFamily)

from . import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The *_created series double the exposition and no dashboard or alert reads them.
disable_created_metrics()

_BUCKET_NAMES = tuple(repr(float(bound)) for bound in _LATENCY_BUCKETS) + ("+Inf",)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RequestStats:
    """
    The series bumped on every request (HTTP requests, their durations, cache outcomes, replica calls), kept
    as plain numbers and turned into metric families at scrape time.

    ``prometheus_client`` takes a lock for each increment, and a histogram observation walks its buckets with
    a lock per bucket: on the GET hot path that cost more than the cache read itself. Here one request costs
    two dict updates and a bisect. Everything runs on the reactor thread, scrapes included.
    """

    def __init__(self, tenant: str) -> None:
        self._tenant = tenant
        self.requests: Dict[Tuple[str, str, int], int] = {}
        #: (method, route) -> one count per bucket of _LATENCY_BUCKETS, one for +Inf, then the sum.
        self.durations: Dict[Tuple[str, str], List[float]] = {}
        self.cache: Dict[Tuple[str, str], int] = {}
        self.replication: Dict[Tuple[str, str], int] = {}

    def collect(self):
        tenant = self._tenant
        requests = CounterMetricFamily(
            "kv_http_requests", "HTTP requests served, by route template and status.",
            labels=["tenant", "method", "route", "status"])
        for (method, route, status), count in sorted(self.requests.items()):
            requests.add_metric([tenant, method, route, str(status)], count)
        yield requests
        durations = HistogramMetricFamily(
            "kv_http_request_duration_seconds", "Time to serve an HTTP request.",
            labels=["tenant", "method", "route"])
        for (method, route), counts in sorted(self.durations.items()):
            buckets = []
            total = 0
            for bound, count in zip(_BUCKET_NAMES, counts):
                total += count
                buckets.append((bound, total))
            durations.add_metric([tenant, method, route], buckets, counts[-1])
        yield durations
        yield _outcome_counter("kv_cache_operations", "Cache operations by outcome (hits and misses).",
                               tenant, self.cache)
        yield _outcome_counter("kv_replication_operations", "Replica calls made by this node as coordinator.",
                               tenant, self.replication)

    def describe(self):
        return []


def _outcome_counter(name: str, help_text: str, tenant: str,
                     counts: Dict[Tuple[str, str], int]) -> CounterMetricFamily:
    """
    A counter family labelled tenant, op and result, from plain counts keyed by (op, result).
    """
    family = CounterMetricFamily(name, help_text, labels=["tenant", "op", "result"])
    for (op, result), count in sorted(counts.items()):
        family.add_metric([tenant, op, result], count)
    return family


class _LiveGauges:
    """
    A collector that reads gauges (and a few counters) at scrape time, so the hot path never updates them: the
    node's, from one function, and any other module's, from the readers registered for them
    (:meth:`Metrics.register_gauge`, :meth:`Metrics.register_counter`).
    """

    def __init__(self, tenant: str, read: Callable[[], dict], readers: Dict[str, Callable[[], float]]) -> None:
        self._tenant = tenant
        self._read = read
        self._readers = readers

    def collect(self):
        values = dict(self._read())
        for name, reader in self._readers.items():
            values[name] = reader()
        for name, help_text in _LIVE_GAUGES:
            if name in _UNTYPED:
                family = UntypedMetricFamily(name, help_text, labels=["tenant"])
            else:
                family = GaugeMetricFamily(name, help_text, labels=["tenant"])
            family.add_metric([self._tenant], float(values.get(name, 0)))
            yield family
        for name, help_text in _LIVE_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=["tenant"])
            family.add_metric([self._tenant], float(values.get(name, 0)))
            yield family

    def describe(self):
        return []


class _ProcessStats:
    """
    The standard process series (``process_resident_memory_bytes``, ``process_cpu_seconds_total``,
    ``process_open_fds``, ``process_max_fds``, ``process_start_time_seconds``, ``process_virtual_memory_bytes``)
    with the tenant label, like every other series here.

    ``prometheus_client``'s ``ProcessCollector`` reads them from ``/proc`` (on CPython and PyPy alike) but
    labels nothing, so its families are copied with the label added. Where there is no ``/proc`` (macOS), it
    yields nothing.
    """

    def __init__(self, tenant: str, proc: str = "/proc") -> None:
        self._tenant = tenant
        self._process = ProcessCollector(proc=proc, registry=None)

    def collect(self):
        for family in self._process.collect():
            labelled = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                labelled.add_sample(sample.name, dict(sample.labels, tenant=self._tenant), sample.value)
            yield labelled

    def describe(self):
        return []


#: ``kv_peers_count`` keeps the seed's name, which dashboards and alerts already use. A gauge named *_count
#: breaks the exposition lint (promtool reserves the suffix for histograms and summaries); untyped, it is
#: read exactly like a gauge and passes.
_UNTYPED = frozenset(["kv_peers_count"])

_LIVE_GAUGES = (
    ("kv_store_keys", "Live entries held by this node, hinted copies included."),
    ("kv_store_bytes", "Accounted bytes of keys, values and overhead in the store."),
    ("kv_store_max_bytes", "The store's memory budget (MAX_MEMORY)."),
    ("kv_store_tombstones", "Tombstones held for deleted keys, and for expired entries that replaced an older "
                            "version."),
    ("kv_peers_count", "Live peers this node sees, excluding itself."),
    ("kv_ring_members", "Nodes in this node's hash ring, itself included."),
    ("kv_replication_factor", "Copies kept of each key (REPLICATION_FACTOR)."),
    ("kv_handoff_pending", "Entries held here that belong to other nodes and wait to be handed off, as the last "
                           "rebalancer pass counted them."),
    ("kv_ring_owned_ratio", "Share of the key space this node owns first."),
    ("kv_open_connections", "Open HTTP connections."),
    ("kv_request_body_bytes", "Bytes of request bodies over 64 KiB held while their requests run, against "
                              "MAX_BODY_BUFFER."),
    ("kv_request_body_max_bytes", "The budget of request bodies held at once (MAX_BODY_BUFFER)."),
    ("kv_copy_streams_outgoing", "Copy streams this node has open to peers (one a peer it writes to)."),
    ("kv_copy_streams_incoming", "Copy streams peers have open to this node."),
    ("kv_peers_suspected", "Peers that a call just found unreachable: calls to them fail at once for a while."),
)

#: Counters read at scrape time, as the live gauges are (exported with ``_total``).
_LIVE_COUNTERS = (
    ("kv_log_lines_dropped", "Log lines dropped because the log stream (stdout's reader, LOG_FILE's disk) fell "
                             "behind or failed; the node kept serving."),
    ("kv_trace_spans_failed", "Trace spans the exporter could not send to the collector (lost)."),
)


class _ClockGauges:
    """
    The clock offsets of the peers this node measures (``kv_clock_offset_seconds{peer}``) and its own, read at
    scrape time from a :class:`~kvresponder.clockskew.ClockOffsets`. Only peers heard from within the peer
    timeout have a series, so the label's values stay as few as the cluster's nodes.
    """

    def __init__(self, tenant: str, clock) -> None:
        self._tenant = tenant
        self._clock = clock

    def collect(self):
        tenant, clock = self._tenant, self._clock
        clock.evaluate()
        offsets = GaugeMetricFamily(
            "kv_clock_offset_seconds",
            "Each peer's clock offset from this node's, smoothed (positive: the peer is ahead).",
            labels=["tenant", "peer"])
        for peer, offset in clock.offsets().items():
            offsets.add_metric([tenant, peer], offset)
        yield offsets
        for name, help_text, value in (
                ("kv_clock_skew_seconds", "This node's clock offset from most of the cluster's clocks "
                                          "(positive: ahead; 0 without a majority).", clock.skew),
                ("kv_clock_max_offset_seconds", "MAX_CLOCK_OFFSET.", clock.max_offset),
                ("kv_clock_version_lead_seconds", "How far the versions this node issues are ahead of its own "
                                                  "clock (its clock was set back after running ahead).", clock.lead),
                ("kv_clock_skewed", "1 while this node's clock is past MAX_CLOCK_OFFSET and it coordinates no "
                                    "write, else 0.", 1.0 if clock.skewed else 0.0)):
            family = GaugeMetricFamily(name, help_text, labels=["tenant"])
            family.add_metric([tenant], value)
            yield family

    def describe(self):
        return []


class Metrics:
    """
    The metrics of one node.

    :param str tenant: bound as the ``tenant`` label of every series.
    """

    def __init__(self, tenant: str, proc: str = "/proc") -> None:
        self.tenant = tenant
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._live_readers: Dict[str, Callable[[], float]] = {}
        t = ["tenant"]
        self._stats = _RequestStats(tenant)
        registry.register(self._stats)
        registry.register(_ProcessStats(tenant, proc))
        self.peer_duration = Histogram(
            "kv_peer_request_duration_seconds", "Latency of calls to peers.",
            t + ["op"], buckets=_LATENCY_BUCKETS, registry=registry)
        self._peer_children: Dict[str, object] = {}
        self.evictions = Counter(
            "kv_evictions", "Entries evicted to stay within MAX_MEMORY.", t, registry=registry)
        self.tombstone_evictions = Counter(
            "kv_tombstone_evictions", "Tombstones evicted to stay within MAX_MEMORY (a replica that missed "
            "their delete may bring the value back).", t, registry=registry)
        self.expirations = Counter(
            "kv_expirations", "Entries reclaimed after their TTL.", t, registry=registry)
        self.discovery_messages = Counter(
            "kv_discovery_messages", "Discovery datagrams received, by outcome.",
            t + ["result"], registry=registry)
        self.handoff_entries = Counter(
            "kv_handoff_entries", "Held entries offered to the nodes that own them, once per owner.",
            t + ["result"], registry=registry)
        self.rereplication_entries = Counter(
            "kv_rereplication_entries", "Entries copied to restore the replication factor.",
            t + ["result"], registry=registry)
        self.antientropy_rounds = Counter(
            "kv_antientropy_rounds", "Anti-entropy exchanges with a peer.", t + ["result"], registry=registry)
        self.antientropy_repairs = Counter(
            "kv_antientropy_repairs", "Entries sent to a peer by anti-entropy.", t, registry=registry)
        self.copy_stream_refusals = Counter(
            "kv_copy_stream_refusals", "Peers that refused a copy stream; copies go to them as HTTP requests.",
            t, registry=registry)
        self.clock_rejections = Counter(
            "kv_clock_rejected_timestamps",
            "Peer timestamps further ahead of this node's clock than MAX_CLOCK_OFFSET (heartbeats refused; "
            "entries stored by version, their time not adopted).", t + ["source"], registry=registry)
        self.build_info = Gauge(
            "kv_build_info", "Build information; always 1.", t + ["version", "python"], registry=registry)
        self.build_info.labels(tenant, __version__, "%s %s" % (
            platform.python_implementation(), platform.python_version())).set(1)

        self._evictions = self.evictions.labels(tenant)
        self._tombstone_evictions = self.tombstone_evictions.labels(tenant)
        self._expirations = self.expirations.labels(tenant)
        # Series that exist from the start, at zero, so that rates and alerts see them before the first event.
        for op in ("put", "delete", "get", "repair"):
            for result in ("success", "failure"):
                self.replication(op, result, 0)
        for op, results in (("get", ("hit", "miss")), ("put", ("created", "replaced")),
                            ("delete", ("deleted", "miss"))):
            for result in results:
                self.cache(op, result, 0)
        for result in ("accepted", "self", "foreign_tenant", "malformed", "oversized", "bad_mac", "replayed",
                       "duplicate", "id_taken", "bad_address", "clock_ahead", "insecure_ignored", "send_failed"):
            self.discovery_messages.labels(tenant, result)
        for result in ("sent", "failed"):
            self.handoff_entries.labels(tenant, result)
            self.rereplication_entries.labels(tenant, result)
        for result in ("ok", "failed"):
            self.antientropy_rounds.labels(tenant, result)
        self.antientropy_repairs.labels(tenant)
        self._evictions.inc(0)
        self._tombstone_evictions.inc(0)
        self.copy_stream_refusals.labels(tenant)
        for source in ("heartbeat", "entry"):
            self.clock_rejections.labels(tenant, source)

    def register_live_gauges(self, read: Callable[[], dict]) -> None:
        """
        Export the gauges in ``_LIVE_GAUGES`` from ``read()``, called at each scrape.
        """
        self.registry.register(_LiveGauges(self.tenant, read, self._live_readers))

    def register_gauge(self, name: str, read: Callable[[], float]) -> None:
        """
        Export gauge ``name`` (one of ``_LIVE_GAUGES``) from ``read()``, called at each scrape: the module that
        knows the value registers it here, rather than have the node ask it.
        """
        if name not in dict(_LIVE_GAUGES):
            raise ValueError("unknown gauge %r" % (name,))
        self._live_readers[name] = read

    def register_counter(self, name: str, read: Callable[[], float]) -> None:
        """
        Export counter ``name`` (one of ``_LIVE_COUNTERS``) from ``read()``, a count that only grows, called at
        each scrape.
        """
        if name not in dict(_LIVE_COUNTERS):
            raise ValueError("unknown counter %r" % (name,))
        self._live_readers[name] = read

    def gauge(self, name: str) -> float:
        """
        The current value of a registered gauge (0 while nothing registered it).
        """
        read = self._live_readers.get(name)
        return read() if read is not None else 0

    # Store events.
    def evicted(self, count: int) -> None:
        self._evictions.inc(count)

    def tombstones_evicted(self, count: int) -> None:
        self._tombstone_evictions.inc(count)

    def expired(self, count: int) -> None:
        self._expirations.inc(count)

    def count_request(self, method: str, route: str, status: int) -> None:
        """
        Count one HTTP answer given before its request was read (a refused connection, a malformed head, a
        body refused by its declared length), in ``kv_http_requests_total`` only: it took no time to serve, and
        zeros in the latency histogram would pull the percentiles down just as a node turns clients away.
        """
        key = (method, route, status)
        requests = self._stats.requests
        requests[key] = requests.get(key, 0) + 1

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """
        Count one HTTP request and its duration.
        """
        stats = self._stats
        key = (method, route, status)
        requests = stats.requests
        requests[key] = requests.get(key, 0) + 1
        durations = stats.durations.get((method, route))
        if durations is None:
            durations = stats.durations[(method, route)] = [0] * (len(_LATENCY_BUCKETS) + 1) + [0.0]
        # bisect_left: a duration equal to a bound belongs to that bound's bucket (le, "less or equal").
        durations[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        durations[-1] += seconds

    def cache(self, op: str, result: str, count: int = 1) -> None:
        key = (op, result)
        cache = self._stats.cache
        cache[key] = cache.get(key, 0) + count

    def replication(self, op: str, result: str, count: int = 1) -> None:
        key = (op, result)
        replication = self._stats.replication
        replication[key] = replication.get(key, 0) + count

    def peer_call(self, op: str, seconds: float) -> None:
        child = self._peer_children.get(op)
        if child is None:
            # prometheus_client's labels() builds and looks up the label tuple under a lock at every call: an
            # op's child is looked up once (there are a handful of ops).
            child = self._peer_children[op] = self.peer_duration.labels(self.tenant, op)
        child.observe(seconds)

    def register_clock(self, clock) -> None:
        """
        Export the clock offsets of a :class:`~kvresponder.clockskew.ClockOffsets`, read at each scrape.
        """
        self.registry.register(_ClockGauges(self.tenant, clock))

    def clock_rejected(self, source: str, count: int = 1) -> None:
        self.clock_rejections.labels(self.tenant, source).inc(count)

    def copy_stream_refused(self) -> None:
        self.copy_stream_refusals.labels(self.tenant).inc()

    def discovery(self, result: str) -> None:
        self.discovery_messages.labels(self.tenant, result).inc()

    def handoff(self, result: str, count: int = 1) -> None:
        self.handoff_entries.labels(self.tenant, result).inc(count)

    def rereplication(self, result: str, count: int = 1) -> None:
        self.rereplication_entries.labels(self.tenant, result).inc(count)

    def antientropy(self, result: str, repairs: int = 0) -> None:
        self.antientropy_rounds.labels(self.tenant, result).inc()
        if repairs:
            self.antientropy_repairs.labels(self.tenant).inc(repairs)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
