"""
The /metrics exposition of real nodes, checked against docs/CONTRACT.md and by the real ``promtool``.
"""

import os
import re
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import require_tool
from .harness import REPO, Cluster

pytestmark = pytest.mark.e2e

TENANT = "metrics-e2e"
#: Keys with names no label value could contain by chance.
KEYS = ("zz-leakcheck-alpha-7f3a", "zz-leakcheck-beta-91c2")
MISSING_KEY = "zz-leakcheck-missing-04de"


def contract_families():
    """
    name -> type (counter, gauge, histogram) from the ``## Metrics`` table of docs/CONTRACT.md.
    """
    with open(os.path.join(REPO, "docs", "CONTRACT.md"), encoding="utf-8") as contract:
        text = contract.read()
    section = re.search(r"^## Metrics\b.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "docs/CONTRACT.md has no Metrics section"
    families = {}
    for line in section.group(1).splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 2 or cells[0] == "name" or set(cells[0]) <= set("-: "):
            continue
        families[cells[0]] = cells[1].split()[0].lower()
    assert len(families) > 10, families
    return families


@pytest.fixture(scope="module")
def exposition(tmp_path_factory):
    """
    The metrics text of node 1 of a two-node cluster, after a hit, a miss, puts, a 404 and a 405.
    """
    cluster = Cluster(TENANT, str(tmp_path_factory.mktemp("logs")), env={"REPLICATION_FACTOR": "2"})
    try:
        n1 = cluster.add("n1")
        n2 = cluster.add("n2")
        cluster.wait_formed()
        for key in KEYS:
            assert n1.put(key, {"v": key}).status_code == 201
        assert n1.put(KEYS[0], {"v": "again"}).status_code == 200
        assert n1.get(KEYS[0]).status_code == 200
        assert n1.get(MISSING_KEY).status_code == 404
        assert requests.get(n1.url + "/no-such-route", timeout=5).status_code == 404
        assert requests.post(n1.url + "/kv/" + KEYS[1], timeout=5).status_code == 405
        response = requests.get(n1.url + "/metrics", timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        yield {"text": response.text, "n1": n1, "n2": n2}
    finally:
        cluster.stop()


def _samples(text):
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def test_promtool_check_metrics_is_clean(exposition):
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=exposition["text"].encode("utf-8"),
                            capture_output=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_every_sample_carries_the_tenant_label(exposition):
    lines = [line for line in exposition["text"].splitlines() if line and not line.startswith("#")]
    assert lines
    unlabelled = []
    for line in lines:
        match = re.match(r"^[A-Za-z_:][A-Za-z0-9_:]*(\{.*\})?\s+\S+(\s+\d+)?$", line)
        assert match, line
        if ('tenant="%s"' % (TENANT,)) not in (match.group(1) or ""):
            unlabelled.append(line)
    assert unlabelled == []
    for sample in _samples(exposition["text"]):
        assert sample.labels.get("tenant") == TENANT, sample


def test_every_contract_metric_family_is_exported_with_its_type(exposition):
    text = exposition["text"]
    declared = {}
    for match in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        declared[match.group(1)] = match.group(2)
    names = {sample.name for sample in _samples(text)}
    missing = []
    for family, kind in contract_families().items():
        if kind == "histogram":
            expected = {family + "_bucket", family + "_sum", family + "_count"}
            type_name = family
        elif kind == "counter":
            type_name = family if family.endswith("_total") else family + "_total"
            expected = {type_name}
        else:
            expected = {family}
            type_name = family
        if not expected <= names:
            missing.append((family, sorted(expected - names)))
            continue
        assert declared.get(type_name) == kind, (family, declared.get(type_name))
    assert missing == []


def test_build_info_names_version_and_python(exposition):
    from kvresponder import __version__
    [info] = [sample for sample in _samples(exposition["text"]) if sample.name == "kv_build_info"]
    assert info.value == 1
    assert info.labels["version"] == __version__
    assert re.match(r"^(CPython|PyPy) \d+\.\d+", info.labels["python"]), info.labels


def test_requests_are_counted_by_route_template_and_status(exposition):
    counted = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
               for s in _samples(exposition["text"]) if s.name == "kv_http_requests_total"}
    assert counted[("PUT", "/kv/{key}", "201")] == 2
    assert counted[("PUT", "/kv/{key}", "200")] == 1
    assert counted[("GET", "/kv/{key}", "200")] == 1
    assert counted[("GET", "/kv/{key}", "404")] == 1
    assert counted[("POST", "/kv/{key}", "405")] == 1
    assert any(route != "/kv/{key}" and status == "404" for _, route, status in counted)
    cache = {(s.labels["op"], s.labels["result"]): s.value
             for s in _samples(exposition["text"]) if s.name == "kv_cache_operations_total"}
    assert cache[("get", "hit")] == 1 and cache[("get", "miss")] == 1
    assert cache[("put", "created")] == 2 and cache[("put", "replaced")] == 1
    # The latency histogram of the three PUTs: counted, every one under +Inf, and the time they took summed.
    durations = {(s.name, s.labels.get("le")): s.value for s in _samples(exposition["text"])
                 if s.name.startswith("kv_http_request_duration_seconds")
                 and (s.labels["method"], s.labels["route"]) == ("PUT", "/kv/{key}")}
    assert durations[("kv_http_request_duration_seconds_count", None)] == 3
    assert durations[("kv_http_request_duration_seconds_bucket", "+Inf")] == 3
    assert 0 < durations[("kv_http_request_duration_seconds_sum", None)] < 30


def test_the_alerts_leave_out_exactly_the_probes_scrapes_and_peer_calls_among_the_routes_nodes_count(exposition):
    """
    If nodes answer probes, scrapes, peers and clients, then the route matcher of the alerts that watch clients'
    requests (helm/rules/alerts.yaml) leaves out the probe, scrape and peer routes as the nodes label them, and
    keeps every client route.
    """
    with open(os.path.join(REPO, "helm", "rules", "alerts.yaml"), encoding="utf-8") as rules:
        matchers = set(re.findall(r'route!~"([^"]*)"', rules.read()))
    assert len(matchers) == 1, matchers
    # PromQL anchors a regex matcher at both ends.
    left_out_by_alerts = re.compile(matchers.pop()).fullmatch
    n1, n2 = exposition["n1"], exposition["n2"]
    for path in ("/health", "/health/live", "/health/ready", "/metrics"):
        assert requests.get(n1.url + path, timeout=5).status_code == 200
    assert requests.get(n1.url + "/kv", timeout=5).status_code == 200
    assert requests.post(n1.url + "/bulk", json={"get": [KEYS[0]]}, timeout=5).status_code == 200
    routes = set()
    for node in (n1, n2):
        text = requests.get(node.url + "/metrics", timeout=5).text
        routes |= {s.labels["route"] for s in _samples(text) if s.name == "kv_http_requests_total"}
    not_clients = {route for route in routes
                   if route in ("/health", "/health/live", "/health/ready", "/metrics") or route.startswith("/_internal/")}
    assert {"/health/ready", "/metrics"} <= not_clients and any(r.startswith("/_internal/") for r in not_clients)
    assert {route for route in routes if left_out_by_alerts(route)} == not_clients
    assert {"/kv", "/kv/{key}", "/bulk"} <= routes - not_clients


def test_no_label_value_names_a_key_or_a_peer(exposition):
    text = exposition["text"]
    n1, n2 = exposition["n1"], exposition["n2"]
    for key in KEYS + (MISSING_KEY, "no-such-route"):
        assert key not in text
    for sample in _samples(text):
        for label, value in sample.labels.items():
            assert "127.0.0.1" not in value and str(n2.port) not in value and str(n1.port) not in value, sample
            if sample.name == "kv_clock_offset_seconds" and label == "peer":
                continue  # the one label that names a peer, checked below
            assert value not in ("n1", "n2"), sample
    # A peer's clock offset is the only series named after a peer: by its node id alone, one per live peer
    # (so as many as the cluster has nodes), never by address or port.
    offsets = [s for s in _samples(text) if s.name == "kv_clock_offset_seconds"]
    assert [s.labels for s in offsets] == [{"tenant": TENANT, "peer": "n2"}]
    assert abs(offsets[0].value) < 0.5, offsets  # two nodes on one host share its clock
    # The peer histogram exists (there were peer calls) but is labelled by operation only.
    peer = [s for s in _samples(text) if s.name == "kv_peer_request_duration_seconds_count"]
    assert peer and all(set(s.labels) == {"tenant", "op"} for s in peer)


def test_every_documented_discovery_result_is_exported_from_the_start_at_zero():
    """
    If a node has just started, then kv_discovery_messages_total already has a series, at zero, for every result
    the contract lists (send_failed included), so that rates and alerts over any of them see it before the
    first event.
    """
    from pathlib import Path

    from kvresponder.metrics import Metrics

    contract = (Path(__file__).resolve().parent.parent / "docs" / "CONTRACT.md").read_text()
    listed = re.search(r"^\| kv_discovery_messages_total \| counter \| result \(([^)]*)\)", contract, re.M).group(1)
    results = {result.strip() for result in listed.split(",")}
    assert "send_failed" in results
    text = Metrics("t1").exposition().decode()
    exported = {sample.labels["result"] for sample in _samples(text)
                if sample.name == "kv_discovery_messages_total"}
    assert exported == results
