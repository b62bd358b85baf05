"""
End-to-end tracing: two real ``twistd kvresponder`` nodes export spans over OTLP/HTTP to a real receiver
started by the test (a loopback HTTP server that decodes ``ExportTraceServiceRequest`` protobufs).
"""

import gzip
import secrets
import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

from kvresponder import __version__
from kvresponder.tracing import SHUTDOWN_TIMEOUT

from .harness import Cluster

pytestmark = pytest.mark.e2e

TENANT = "trace-e2e"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OTLPReceiver:
    """
    A minimal OTLP/HTTP trace collector on 127.0.0.1: POST /v1/traces, protobuf bodies. Keeps one summary
    per span: ids (hex), name, kind and the resource's attributes.
    """

    def __init__(self) -> None:
        self.spans: List[Dict] = []
        self.posts = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path.rstrip("/") != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._record(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = "http://127.0.0.1:%d" % (self.port,)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()

    def _record(self, request) -> None:
        summaries = []
        for resource_spans in request.resource_spans:
            resource = {attr.key: _value(attr.value) for attr in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    summaries.append({
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "attributes": {attr.key: _value(attr.value) for attr in span.attributes},
                        "resource": resource,
                    })
        with self._lock:
            self.posts += 1
            self.spans.extend(summaries)

    def snapshot(self) -> List[Dict]:
        with self._lock:
            return list(self.spans)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def receiver():
    server = OTLPReceiver()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster_factory(log_dir):
    clusters = []

    def make(env):
        cluster = Cluster(TENANT, log_dir, env=env)
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()


def _put_traced(node, key: str, trace_id: str, parent_id: str) -> requests.Response:
    return requests.put(node.url + "/kv/" + key, json={"value": {"traced": True}}, timeout=10,
                        headers={"traceparent": "00-%s-%s-01" % (trace_id, parent_id)})


def _wait_for_spans(receiver: OTLPReceiver, predicate, timeout: float = 15.0) -> List[Dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = receiver.snapshot()
        if predicate(spans):
            return spans
        time.sleep(0.2)
    return receiver.snapshot()


def test_replicated_write_is_one_trace_continuing_the_client_context(receiver, cluster_factory):
    cluster = cluster_factory({"REPLICATION_FACTOR": "2", "JAEGER_ENDPOINT": receiver.endpoint})
    n1 = cluster.add("n1")
    cluster.add("n2")
    cluster.wait_formed()

    trace_id, client_span_id = secrets.token_hex(16), secrets.token_hex(8)
    response = _put_traced(n1, "traced-key", trace_id, client_span_id)
    assert response.status_code == 201, response.text

    def complete(spans):
        mine = [span for span in spans if span["trace_id"] == trace_id]
        return {("n1", "PUT /kv/{key}"), ("n1", "peer apply"), ("n2", "POST /_internal/apply")} <= {
            (span["resource"].get("kv.node"), span["name"]) for span in mine}

    spans = _wait_for_spans(receiver, complete)
    mine = [span for span in spans if span["trace_id"] == trace_id]
    assert complete(spans), "spans of the write not exported: %r" % (
        [(s["resource"].get("kv.node"), s["name"], s["trace_id"]) for s in spans],)

    # Every span of the write (on either node) is in the client's trace; none was split off.
    write_spans = [span for span in spans if span["name"] in ("PUT /kv/{key}", "peer apply",
                                                              "POST /_internal/apply")]
    assert {span["trace_id"] for span in write_spans} == {trace_id}

    def one(node, name):
        found = [span for span in mine if span["resource"].get("kv.node") == node and span["name"] == name]
        assert len(found) == 1, (node, name, found)
        return found[0]

    server = one("n1", "PUT /kv/{key}")
    client = one("n1", "peer apply")
    replica = one("n2", "POST /_internal/apply")

    assert server["kind"] == SERVER and server["parent_span_id"] == client_span_id
    assert server["attributes"].get("http.route") == "/kv/{key}"
    assert server["attributes"].get("http.response.status_code") == 201
    assert client["kind"] == CLIENT and client["parent_span_id"] == server["span_id"]
    assert client["attributes"].get("kv.peer") == "n2"
    assert replica["kind"] == SERVER and replica["parent_span_id"] == client["span_id"]

    for span, node in ((server, "n1"), (client, "n1"), (replica, "n2")):
        resource = span["resource"]
        assert resource.get("service.name") == "kv-responder"
        assert resource.get("service.version") == __version__
        assert resource.get("kv.tenant") == TENANT
        assert resource.get("kv.node") == node


def test_with_tracing_on_a_replicated_writes_log_lines_stay_in_one_task_across_both_nodes(receiver, cluster_factory):
    """
    Tracing sends each copy alone (so that its span has the write's as parent), but the copy still carries the
    write's Eliot task: at info, the replica's ``store:applied`` line joins the coordinator's in one task, as
    without tracing.
    """
    cluster = cluster_factory({"REPLICATION_FACTOR": "2", "JAEGER_ENDPOINT": receiver.endpoint})
    n1 = cluster.add("n1")
    n2 = cluster.add("n2")
    cluster.wait_formed()
    response = requests.put(n1.url + "/kv/logged-traced", json={"value": 1}, timeout=10)
    assert response.status_code == 201, response.text

    def lines():
        return [m for node in (n1, n2) for m in node.log_messages()
                if m.get("key") == "logged-traced" and m.get("message_type") == "kvresponder:store:applied"]

    cluster.wait_for(lambda: len(lines()) == 2, 10, "both nodes' store lines")
    found = lines()
    assert sorted(m["node"] for m in found) == ["n1", "n2"]
    assert len({m["task_uuid"] for m in found}) == 1, found
    [task_uuid] = {m["task_uuid"] for m in found}
    task = [m for node in (n1, n2) for m in node.log_messages() if m.get("task_uuid") == task_uuid]
    # The write's two lines and nothing else: no peer-call action in the task, as without tracing.
    assert sorted(m["task_level"] for m in task) == [[2], [3]], task


def test_without_an_endpoint_nothing_is_exported_and_the_node_serves(receiver, cluster_factory):
    # The SDK's own variable points at the receiver: only JAEGER_ENDPOINT/OTEL_EXPORTER_OTLP_ENDPOINT may turn
    # tracing on, so a node that built an exporter anyway would export here.
    cluster = cluster_factory({"REPLICATION_FACTOR": "2",
                               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint + "/v1/traces"})
    n1 = cluster.add("n1")
    n2 = cluster.add("n2")
    cluster.wait_formed()

    trace_id, client_span_id = secrets.token_hex(16), secrets.token_hex(8)
    response = _put_traced(n1, "untraced-key", trace_id, client_span_id)
    assert response.status_code == 201, response.text
    assert n2.get("untraced-key").json()["value"] == {"traced": True}

    # A stopping node flushes the spans it holds (a test below shows it): once both have stopped, any span
    # they had made would have been sent.
    for node in (n1, n2):
        assert node.terminate() in (0, -15), node.log_tail()
    assert receiver.posts == 0 and receiver.snapshot() == []


class _SilentCollector:
    """
    A listener on 127.0.0.1 that takes connections and never answers: a collector that hangs.
    """

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self.endpoint = "http://127.0.0.1:%d" % (self._socket.getsockname()[1],)

    def close(self) -> None:
        self._socket.close()


def test_a_stopping_node_flushes_its_last_spans_to_the_collector(receiver, cluster_factory):
    """
    The spans of the last requests before SIGTERM, still in the batch processor (which exports once a
    second), reach the collector as the node stops.
    """
    cluster = cluster_factory({"JAEGER_ENDPOINT": receiver.endpoint, "CLUSTER_SECRET": ""})
    n1 = cluster.add("n1")
    trace_id = secrets.token_hex(16)
    assert _put_traced(n1, "last-words", trace_id, secrets.token_hex(8)).status_code == 201
    assert n1.terminate(timeout=20) is not None
    names = [span["name"] for span in receiver.snapshot() if span["trace_id"] == trace_id]
    assert names == ["PUT /kv/{key}"], receiver.snapshot()


def test_a_collector_that_does_not_answer_delays_a_stopping_node_by_at_most_the_tracers_time(cluster_factory):
    """
    The exporter waits up to 5 s on a collector that takes the connection and says nothing; a stopping node
    gives it SHUTDOWN_TIMEOUT, logs that the spans it held are lost, and exits (before, it waited the exporter
    out, past the time the chart leaves a pod after its drain).
    """
    collector = _SilentCollector()
    try:
        cluster = cluster_factory({"JAEGER_ENDPOINT": collector.endpoint, "CLUSTER_SECRET": "", "DRAIN_TIMEOUT": "1"})
        n1 = cluster.add("n1")
        for index in range(5):
            assert _put_traced(n1, "k%d" % (index,), secrets.token_hex(16), secrets.token_hex(8)).status_code == 201
        # Past the batch processor's one-second delay: an export is under way, waiting on the collector.
        time.sleep(1.5)
        started = time.monotonic()
        n1.terminate(timeout=20)
        took = time.monotonic() - started
        # Well under the exporter's own 5 s, which the stop used to wait out; room for a loaded machine.
        assert took < 4.0, took
        lost = [m for m in n1.log_messages() if m.get("message_type") == "kvresponder:service:traces-unexported"]
        assert [m["timeout"] for m in lost] == [SHUTDOWN_TIMEOUT], lost
    finally:
        collector.close()


def test_spans_a_refusing_collector_does_not_take_are_counted_and_logged_once_with_the_reason(cluster_factory):
    """
    If the collector refuses connections, then the spans lost are counted (``kv_trace_spans_failed_total``) and
    logged in one typed line with the exporter's reason (``service:traces-export-failed``), not a line of the
    SDK's for each try; the node serves all the while.
    """
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    endpoint = "http://127.0.0.1:%d" % (closed.getsockname()[1],)
    closed.close()  # nothing listens there now: every export is refused
    cluster = cluster_factory({"JAEGER_ENDPOINT": endpoint, "CLUSTER_SECRET": ""})
    n1 = cluster.add("n1")
    for index in range(5):
        assert _put_traced(n1, "r%d" % (index,), secrets.token_hex(16), secrets.token_hex(8)).status_code == 201
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and n1.metric("kv_trace_spans_failed_total") < 5:
        time.sleep(0.2)
    assert n1.metric("kv_trace_spans_failed_total") >= 5
    deadline = time.monotonic() + 5
    failed = []
    while time.monotonic() < deadline and not failed:
        failed = [m for m in n1.log_messages() if m.get("message_type") == "kvresponder:service:traces-export-failed"]
        time.sleep(0.2)
    assert len(failed) == 1 and failed[0]["spans"] >= 1 and failed[0]["reason"], failed
    sdk_lines = [m for m in n1.log_messages() if m.get("message_type") == "twisted:log"
                 and "export" in m.get("message", "").lower()]
    assert sdk_lines == []
    assert n1.put("after", 1).status_code in (200, 201)
