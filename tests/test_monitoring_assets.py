"""
Checks for the monitoring assets shipped with the chart.

- ``helm/dashboards/kv-responder.json`` (Grafana dashboard),
- ``helm/rules/alerts.yaml`` and its unit tests ``helm/rules/alerts_test.yaml``,
- the runbook anchors in ``docs/MONITORING.md``.

The set of metric names the service exports is read from the metrics table of
``docs/CONTRACT.md``, so a dashboard panel or an alert that queries a metric the
contract does not name fails here rather than showing "No data" in production.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "CONTRACT.md"
DASHBOARD = ROOT / "helm" / "dashboards" / "kv-responder.json"
ALERTS = ROOT / "helm" / "rules" / "alerts.yaml"
ALERTS_TEST = ROOT / "helm" / "rules" / "alerts_test.yaml"
MONITORING = ROOT / "docs" / "MONITORING.md"

#: Metrics that are not the service's own but that these assets may use.
#: ``up`` is written by Prometheus for every target.  Add kube-state-metrics
#: series here explicitly if a panel or an alert ever needs one.
ALLOWED_NON_SERVICE_METRICS = frozenset({"up"})

REQUIRED_ALERTS = (
    "KVResponderDown",
    "KVResponderHighErrorRate",
    "KVResponderHighLatency",
    "KVResponderBodyBufferNearFull",
    "KVResponderMemoryNearLimit",
    "KVResponderEvictionsHigh",
    "KVResponderPeersMissing",
    "KVResponderReplicationFailing",
    "KVResponderHandoffBacklog",
    "KVResponderLogLinesDropped",
    "KVResponderClockSkew",
)
SEVERITIES = {"critical", "warning", "info"}

#: The matcher that keeps clients' requests only: every route but the probes', the scrapes' and the peers' calls
#: (a node that cannot serve answers its readiness probe with 503 by design).
CLIENT_ROUTES = ("route", "!~", "/health.*|/metrics|/_internal/.*")
#: What watches clients' requests, and so must carry CLIENT_ROUTES on every selector.
CLIENT_ALERTS = ("KVResponderHighErrorRate", "KVResponderHighLatency")
CLIENT_PANELS = ("5xx ratio", "Request rate by status class", "Request latency p50 / p99")


# --------------------------------------------------------------------------
# Contract parsing
# --------------------------------------------------------------------------


def contract_metric_families(text: str) -> dict[str, str]:
    """
    Read the ``## Metrics`` table of the contract.

    :param text: the Markdown of ``docs/CONTRACT.md``.
    :return: metric family name -> type (first word of the type column).
    """
    match = re.search(r"^## Metrics\b.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "docs/CONTRACT.md has no '## Metrics' section"
    families: dict[str, str] = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not line.lstrip().startswith("|"):
            continue
        name, kind = cells[0].strip("`"), cells[1]
        if name == "name" or set(name) <= set("-: "):
            continue  # header and separator rows
        families[name] = kind.split()[0].lower()
    return families


def exported_series_names(families: dict[str, str]) -> set[str]:
    """
    Expand metric families into the series names Prometheus stores.

    Histograms become ``_bucket``/``_sum``/``_count``; a counter keeps (or
    gains) its ``_total`` suffix; gauges keep their name.
    """
    names: set[str] = set()
    for name, kind in families.items():
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        elif kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        elif kind in ("gauge", "untyped"):
            names.add(name)
        else:
            raise AssertionError(f"unknown metric type {kind!r} for {name} in CONTRACT.md")
    return names


# --------------------------------------------------------------------------
# A small PromQL scanner: enough to find vector selectors and their matchers
# --------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)(?:[a-zA-Z]+[0-9a-zA-Z]*)*")
_MATCHER = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)\s*,?""")
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_OPERATOR_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
#: Aggregations may be followed by ``by (...)`` before their ``(``.
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}


def _skip_string(expr: str, i: int) -> int:
    quote = expr[i]
    i += 1
    while i < len(expr) and expr[i] != quote:
        i += 2 if expr[i] == "\\" and quote != "`" else 1
    return i + 1


def _matching_close(expr: str, i: int, opening: str, closing: str) -> int:
    depth = 0
    while i < len(expr):
        ch = expr[i]
        if ch in "\"'`":
            i = _skip_string(expr, i)
            continue
        if ch == opening:
            depth += 1
        elif ch == closing:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced {opening!r} in {expr!r}")


def parse_matchers(body: str) -> list[tuple[str, str, str]]:
    """
    Parse the inside of ``{...}`` into ``(label, op, value)`` triples.
    """
    matchers = []
    pos = 0
    while pos < len(body.strip()):
        m = _MATCHER.match(body, pos)
        if not m:
            raise ValueError(f"cannot parse label matchers {body!r}")
        value = m.group(3)[1:-1]
        matchers.append((m.group(1), m.group(2), value))
        pos = m.end()
    return matchers


def vector_selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """
    Find every vector selector in a PromQL expression.

    Function and aggregation names, label names in ``by``/``on``/... lists,
    strings, durations and numbers are not selectors.

    :return: ``(metric_name, matchers)`` for each selector, in order; a
        selector without a name (``{__name__="x"}``) reports the ``__name__``
        value, or ``""`` if it has none.
    """
    found = []
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch.isspace():
            i += 1
        elif ch in "\"'`":
            i = _skip_string(expr, i)
        elif ch == "[":
            i = _matching_close(expr, i, "[", "]") + 1
        elif ch == "$":  # a Grafana variable outside a string
            m = _IDENT.match(expr, i + 1)
            i = m.end() if m else i + 1
        elif ch == "{":
            close = _matching_close(expr, i, "{", "}")
            matchers = parse_matchers(expr[i + 1 : close])
            name = next((v for label, op, v in matchers if label == "__name__" and op == "="), "")
            found.append((name, matchers))
            i = close + 1
        elif ch.isdigit() or (ch == "." and i + 1 < len(expr) and expr[i + 1].isdigit()):
            i = _NUMBER.match(expr, i).end()
        elif _IDENT.match(expr, i):
            word = _IDENT.match(expr, i).group(0)
            j = i + len(word)
            while j < len(expr) and expr[j].isspace():
                j += 1
            nxt = expr[j] if j < len(expr) else ""
            if word.lower() in _LABEL_LIST_KEYWORDS:
                i = _matching_close(expr, j, "(", ")") + 1 if nxt == "(" else j
            elif word.lower() in _OPERATOR_KEYWORDS | _AGGREGATIONS or nxt == "(":
                i = j  # an operator, or a function/aggregation call
            elif nxt == "{":
                close = _matching_close(expr, j, "{", "}")
                found.append((word, parse_matchers(expr[j + 1 : close])))
                i = close + 1
            else:
                found.append((word, []))
                i = j
        else:
            i += 1
    return found


def templating_expression(query: str) -> str:
    """
    Turn a Grafana Prometheus variable query into the PromQL it evaluates.

    ``label_values(selector, label)`` -> ``selector``; ``label_values(label)``
    and ``label_names()`` -> ``""``; ``query_result(expr)`` -> ``expr``.
    """
    query = query.strip()
    m = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query, re.S)
    if m:
        return m.group(1)
    if re.fullmatch(r"label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)|label_names\(.*\)", query, re.S):
        return ""
    m = re.fullmatch(r"(?:query_result|metrics)\((.*)\)", query, re.S)
    if m:
        return m.group(1)
    return query


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_metrics() -> set[str]:
    return exported_series_names(contract_metric_families(CONTRACT.read_text()))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def panel_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(variable name, PromQL)`` for every query variable."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        out.append((var["name"], templating_expression(query)))
    return out


def markdown_anchors(text: str) -> set[str]:
    """GitHub-style anchors of every heading (lower case, punctuation dropped, spaces to dashes)."""
    anchors = set()
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def promtool() -> str:
    # Debian's 'prometheus' package provides /usr/bin/promtool; CI installs it.
    return require_tool("promtool")


# --------------------------------------------------------------------------
# The parsers themselves
# --------------------------------------------------------------------------


def test_if_the_contract_lists_metrics_then_the_parser_expands_histograms_and_keeps_counters():
    """
    If CONTRACT.md lists a histogram, then its ``_bucket``/``_sum``/``_count``
    series are exported and the bare family name is not; counters keep
    ``_total``; ``up`` is not the service's.
    """
    families = contract_metric_families(CONTRACT.read_text())
    names = exported_series_names(families)
    assert len(families) >= 20
    assert families["kv_http_request_duration_seconds"] == "histogram"
    assert {
        "kv_http_request_duration_seconds_bucket",
        "kv_http_request_duration_seconds_sum",
        "kv_http_request_duration_seconds_count",
        "kv_peer_request_duration_seconds_bucket",
        "kv_http_requests_total",
        "kv_build_info",
        "kv_store_max_bytes",
        "kv_request_body_bytes",
        "kv_request_body_max_bytes",
    } <= names
    assert "kv_http_request_duration_seconds" not in names
    assert "up" not in names


def test_if_a_counter_lacks_total_then_the_parser_adds_it():
    """If the contract names a counter without ``_total``, then Prometheus' ``x_total`` is expected."""
    text = "## Metrics\n| name | type | labels |\n|---|---|---|\n| kv_things | counter | |\n| kv_h | histogram | |\n"
    assert exported_series_names(contract_metric_families(text)) == {
        "kv_things_total",
        "kv_h_bucket",
        "kv_h_sum",
        "kv_h_count",
    }


def test_if_an_expression_has_functions_labels_and_strings_then_only_selectors_are_reported():
    """
    If an expression contains functions, ``by``/``on`` label lists, strings,
    durations and Grafana variables, then only the vector selectors come out,
    with their matchers.
    """
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(kv_http_request_duration_seconds_bucket'
        '{namespace="$namespace", tenant="$tenant", route!~"up|kv_fake"}[$__rate_interval])))'
        " > on (namespace, tenant) group_left (version) max without (instance) (kv_build_info offset 5m) * 1e3"
        " and ignoring (pod) kube_deployment_status_replicas_ready"
    )
    selectors = vector_selectors(expr)
    assert [name for name, _ in selectors] == [
        "kv_http_request_duration_seconds_bucket",
        "kv_build_info",
        "kube_deployment_status_replicas_ready",
    ]
    assert selectors[0][1] == [
        ("namespace", "=", "$namespace"),
        ("tenant", "=", "$tenant"),
        ("route", "!~", "up|kv_fake"),
    ]


def test_if_a_variable_uses_label_values_then_only_its_selector_is_parsed():
    """If a variable is ``label_values(selector, label)``, then the label is not taken for a metric."""
    expr = templating_expression('label_values(kv_build_info{namespace="$namespace"}, tenant)')
    assert [name for name, _ in vector_selectors(expr)] == ["kv_build_info"]
    assert templating_expression("label_values(namespace)") == ""


def test_if_the_dashboard_is_scanned_then_the_parser_finds_many_distinct_metrics(dashboard):
    """If the dashboard is scanned, then at least 15 distinct metric names come out (the scanner is not blind)."""
    names = {name for _, expr in panel_expressions(dashboard) for name, _ in vector_selectors(expr)}
    assert len(names) >= 15, sorted(names)


# --------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------


def test_if_grafana_loads_the_dashboard_then_it_has_the_agreed_identity(dashboard):
    """If Grafana's sidecar loads the file, then it is uid ``kv-responder``, title ``KV Responder``, schema ~39."""
    assert dashboard["uid"] == "kv-responder"
    assert dashboard["title"] == "KV Responder"
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_if_grafana_lays_out_the_dashboard_then_no_two_panels_overlap(dashboard):
    """
    If Grafana places the panels by their ``gridPos``, then none covers another and none passes the grid's 24
    columns (Grafana would push one down, out of the place it was given).
    """
    taken = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, (panel["title"], taken.get((x, y)))
                taken[(x, y)] = panel["title"]


def test_if_a_panel_or_variable_queries_a_metric_then_the_service_exports_it(dashboard, exported_metrics):
    """
    If a panel or a templating variable queries a metric, then that metric is
    in CONTRACT.md (or explicitly allow-listed), so no panel is silently empty.
    """
    allowed = exported_metrics | ALLOWED_NON_SERVICE_METRICS
    unknown = [
        (where, name)
        for where, expr in panel_expressions(dashboard) + variable_queries(dashboard)
        for name, _ in vector_selectors(expr)
        if name not in allowed
    ]
    assert unknown == []


def test_if_a_panel_queries_a_metric_then_it_filters_on_tenant_and_namespace(dashboard):
    """
    If a panel queries any series, then every selector in it carries
    ``tenant="$tenant"`` and ``namespace="$namespace"``, so tenants sharing a
    Prometheus never mix.
    """
    offenders = []
    for title, expr in panel_expressions(dashboard):
        selectors = vector_selectors(expr)
        if not selectors:
            offenders.append((title, expr, "no selector"))
        for name, matchers in selectors:
            for required in (("tenant", "=", "$tenant"), ("namespace", "=", "$namespace")):
                if required not in matchers:
                    offenders.append((title, name, required[0]))
    assert offenders == []


def test_if_a_panel_queries_prometheus_then_it_uses_the_datasource_variable(dashboard):
    """If a panel has queries, then it and each query use ``${datasource}`` rather than a fixed uid."""
    wrong = []
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        for obj in [panel] + panel.get("targets", []):
            if obj.get("datasource", {}).get("uid") != "${datasource}":
                wrong.append(panel["title"])
    assert wrong == []


def test_if_an_operator_opens_the_dashboard_then_the_requested_rows_and_panels_exist(dashboard):
    """If the dashboard is opened, then the Requests, Cache and Cluster rows hold the panels agreed on."""
    rows = {}
    current = None
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = [p["title"] for p in panel.get("panels", [])]
        else:
            assert current is not None, f"panel {panel['title']!r} is above the first row"
            rows[current].append(panel["title"])
    expected = {
        "Requests": {"Request rate by status class", "Request latency p50 / p99", "Request bodies held vs budget"},
        "Cache": {"Cache hit ratio", "Keys", "Memory: store bytes vs limit", "Evictions and expirations rate"},
        "Cluster": {
            "Cluster size: peers + 1 vs ring members",
            "Replication rate",
            "Replication failures",
            "Handoffs",
            "Handoff pending",
            "Re-replication",
            "Anti-entropy",
            "Discovery messages by result",
            "Clock offsets",
        },
    }
    for row, titles in expected.items():
        assert row in rows, f"row {row!r} missing"
        assert titles <= set(rows[row]), (row, titles - set(rows[row]))


def test_if_a_panel_shows_a_requested_figure_then_it_queries_the_right_metric(dashboard):
    """If a requested panel exists, then it is built from the metric it is named after."""
    by_title = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in all_panels(dashboard)}
    assert re.search(r'status=~"2\.\."', by_title["Request rate by status class"])
    assert re.search(r'status=~"5\.\."', by_title["Request rate by status class"])
    latency = by_title["Request latency p50 / p99"]
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.99," in latency
    assert "kv_http_request_duration_seconds_bucket" in latency
    assert 'op="get"' in by_title["Cache hit ratio"]
    assert {"kv_store_bytes", "kv_store_max_bytes"} <= {
        n for n, _ in vector_selectors(by_title["Memory: store bytes vs limit"])
    }
    assert {"kv_request_body_bytes", "kv_request_body_max_bytes"} <= {
        n for n, _ in vector_selectors(by_title["Request bodies held vs budget"])
    }
    cluster = {n for n, _ in vector_selectors(by_title["Cluster size: peers + 1 vs ring members"])}
    assert {"kv_peers_count", "kv_ring_members"} <= cluster
    assert 'result="failure"' in by_title["Replication failures"]
    clock = by_title["Clock offsets"]
    assert {"kv_clock_offset_seconds", "kv_clock_skew_seconds", "kv_clock_max_offset_seconds"} <= {
        n for n, _ in vector_selectors(clock)
    }
    # The bound is drawn on both sides: a clock behind is as wrong as one ahead.
    assert "-max(kv_clock_max_offset_seconds" in clock


def test_if_a_panel_draws_a_budget_against_its_use_then_the_budget_is_the_dashed_line(dashboard):
    """
    If a panel shows what a node holds against its budget (the store's memory, the request bodies held), then the
    budget's query is drawn dashed, and the dashed line's override names a legend its queries produce (a renamed
    legend would silently draw the budget as one more solid line).
    """
    by_title = {p["title"]: p for p in all_panels(dashboard)}
    for title, budget in (("Memory: store bytes vs limit", "kv_store_max_bytes"),
                          ("Request bodies held vs budget", "kv_request_body_max_bytes")):
        panel = by_title[title]
        dashed = {
            override["matcher"]["options"]
            for override in panel["fieldConfig"]["overrides"]
            if override["matcher"]["id"] == "byName"
            and any(prop["id"] == "custom.lineStyle" and prop["value"]["fill"] == "dash"
                    for prop in override["properties"])
        }
        legends = {
            target["legendFormat"]
            for target in panel["targets"]
            if budget in {name for name, _ in vector_selectors(target["expr"])}
        }
        assert legends and legends <= dashed, (title, legends, dashed)


def test_if_an_alert_or_a_panel_watches_clients_requests_then_probes_scrapes_and_peer_calls_are_left_out(
        dashboard, alert_rules):
    """
    If an alert or a panel judges the service by its HTTP requests (the 5xx share, the latency), then every
    selector in it leaves out the routes clients do not call, with the same matcher: an unready node's probes
    (503 by design), the scrapes and the peers' calls neither fire the alerts nor hide clients' failures.
    """
    expressions = [(r["alert"], r["expr"]) for r in alert_rules if r["alert"] in CLIENT_ALERTS]
    expressions += [(title, expr) for title, expr in panel_expressions(dashboard) if title in CLIENT_PANELS]
    assert {name for name, _ in expressions} == set(CLIENT_ALERTS) | set(CLIENT_PANELS)
    missing = [(name, selector) for name, expr in expressions
               for selector, matchers in vector_selectors(expr) if CLIENT_ROUTES not in matchers]
    assert missing == []


def test_if_the_dashboard_is_templated_then_datasource_namespace_and_tenant_variables_exist(dashboard):
    """If the dashboard loads, then it offers datasource (Prometheus), namespace and tenant-in-namespace pickers."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["type"] == "query"
    queries = dict(
        (v["name"], v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    )
    assert queries["tenant"] == 'label_values(kv_build_info{namespace="$namespace"}, tenant)'
    assert queries["namespace"].startswith("label_values(") and queries["namespace"].endswith("namespace)")


def test_if_dashboard_queries_are_evaluated_then_prometheus_accepts_their_syntax(dashboard, tmp_path):
    """
    If each panel query is handed to Prometheus (as a recording rule, Grafana
    variables substituted), then promtool parses it: no typo reaches Grafana.
    """
    tool = promtool()
    rules = []
    for n, (_, expr) in enumerate(panel_expressions(dashboard) + variable_queries(dashboard)):
        if expr:
            rules.append({"record": f"dashboard:query_{n}", "expr": expr.replace("$__rate_interval", "5m")})
    path = tmp_path / "dashboard_queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------


def test_if_promtool_checks_the_alerts_file_then_it_is_valid():
    """If ``promtool check rules`` reads alerts.yaml, then it reports success (syntax, templates, lint)."""
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_if_promtool_runs_the_alert_unit_tests_then_they_all_pass():
    """If ``promtool test rules`` runs alerts_test.yaml, then every firing and non-firing case holds."""
    result = subprocess.run(
        [promtool(), "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True, cwd=ALERTS_TEST.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_if_the_alert_unit_tests_run_then_each_alert_is_seen_firing_and_not_firing():
    """
    If alerts_test.yaml is read, then every required alert has a case where it
    fires (labels and annotations given) and a case where it must not.
    """
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    fires, silent = set(), set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            if case.get("exp_alerts"):
                if all(a.get("exp_labels") and a.get("exp_annotations") for a in case["exp_alerts"]):
                    fires.add(case["alertname"])
            else:
                silent.add(case["alertname"])
    assert set(REQUIRED_ALERTS) - fires == set(), "alerts never tested firing"
    assert set(REQUIRED_ALERTS) - silent == set(), "alerts never tested silent"


@pytest.mark.parametrize("name", REQUIRED_ALERTS)
def test_if_an_alert_fires_then_it_carries_severity_summary_description_and_runbook(name, alert_rules):
    """
    If a required alert fires, then it has a severity in {critical, warning,
    info}, a summary, a description and a runbook_url that points at a
    section of docs/MONITORING.md.
    """
    rules = [r for r in alert_rules if r["alert"] == name]
    assert rules, f"alert {name} missing from {ALERTS.name}"
    anchors = markdown_anchors(MONITORING.read_text()) if MONITORING.exists() else set()
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES
        assert rule["annotations"]["summary"].strip()
        assert rule["annotations"]["description"].strip()
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/MONITORING.md#"), url
        assert url.split("#", 1)[1] in anchors, f"{url} has no matching heading in docs/MONITORING.md"


def test_if_an_alert_names_a_metric_then_the_service_exports_it(alert_rules, exported_metrics):
    """If an alert expression queries a metric, then it is in CONTRACT.md or Prometheus' own ``up``."""
    allowed = exported_metrics | ALLOWED_NON_SERVICE_METRICS
    unknown = [(r["alert"], n) for r in alert_rules for n, _ in vector_selectors(r["expr"]) if n not in allowed]
    assert unknown == []


def test_if_alerts_are_grouped_then_they_follow_mixin_naming():
    """If an alert is defined, then its name is CamelCase with the ``KVResponder`` prefix and ``for`` is set."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert re.fullmatch(r"KVResponder[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
                assert re.fullmatch(r"\d+m", rule.get("for", "")), (rule["alert"], rule.get("for"))



def _metric_rows(path: str, heading: str) -> dict:
    """
    name -> {label: [values]} from the metric table under ``heading``: a label's values are what it lists in
    parentheses (``result (sent, failed)``); a parenthesis of prose, alone or after a label, is a note.
    """
    text = (ROOT / path).read_text(encoding="utf-8")
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) < 4 or not re.match(r"`?[a-z_]+`?$", cells[1]) or cells[1] == "name":
            continue
        labels = {}
        for label, values in re.findall(r"(?:^|, )([a-z_]+)(?: \(([^)]*)\))?", re.sub(r"^\([^)]*\)$", "", cells[3])):
            values = [value.strip() for value in values.split(",")] if values else []
            # A label's values are bare words; a parenthesis of prose is a note on the label.
            labels[label] = sorted(values) if all(re.match(r"[a-z0-9_]+$", v) for v in values) else []
        rows[cells[1].strip("`")] = labels
    return rows


def test_if_an_operator_reads_the_metric_reference_then_it_agrees_with_the_contract():
    """
    MONITORING.md's metric reference (for operators) and CONTRACT.md's table (which the exposition tests read)
    name the same metrics, with the same labels and the same label values.
    """
    monitoring = _metric_rows("docs/MONITORING.md", "## Metric reference")
    contract = _metric_rows("docs/CONTRACT.md", "## Metrics")
    assert len(contract) > 30
    assert monitoring == {name: labels for name, labels in contract.items() if name in monitoring}
    missing = sorted(set(contract) - set(monitoring))
    assert missing == [], missing
