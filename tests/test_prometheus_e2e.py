"""
The real Prometheus server scraping two real nodes, with the chart's alert rules (their ``for:`` shortened):
series carry the tenant, and killing a node fires KVResponderDown.
"""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import requests
import yaml

from .conftest import require_tool
from .harness import REPO, Cluster, die_with_parent, free_port

pytestmark = pytest.mark.e2e

TENANT = "prom-e2e"
NAMESPACE = "test"


def shortened_rules(text: str) -> str:
    """
    The alert rules with every ``for:`` cut to 2s, so that an alert can fire within a test.
    """
    shortened, count = re.subn(r"(?m)^(\s*)for:\s*\S+\s*$", r"\1for: 2s", text)
    assert count >= 1
    return shortened


def prometheus_config(nodes, rules_path: str) -> dict:
    # As the chart's ServiceMonitor: the service's own tenant label is kept (honor_labels), and every target
    # carries namespace, pod and tenant labels (here static, there relabelled from the pod's metadata).
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules_path],
        "scrape_configs": [{
            "job_name": "kv-responder",
            "metrics_path": "/%s/metrics" % (TENANT,),
            "honor_labels": True,
            "static_configs": [
                {"targets": ["127.0.0.1:%d" % (node.port,)],
                 "labels": {"namespace": NAMESPACE, "pod": node.node_id, "tenant": TENANT}}
                for node in nodes
            ],
        }],
    }


class Prometheus:
    def __init__(self, binary: str, workdir: str, config: dict) -> None:
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % (self.port,)
        config_path = os.path.join(workdir, "prometheus.yml")
        with open(config_path, "w") as out:
            yaml.safe_dump(config, out)
        self.log_path = os.path.join(workdir, "prometheus.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [binary, "--config.file=" + config_path, "--storage.tsdb.path=" + os.path.join(workdir, "tsdb"),
             "--web.listen-address=127.0.0.1:%d" % (self.port,), "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, preexec_fn=die_with_parent)

    def log_tail(self) -> str:
        with open(self.log_path, "rb") as log:
            return log.read()[-3000:].decode("utf-8", "replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "prometheus exited:\n" + self.log_tail()
            try:
                if requests.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus not ready:\n" + self.log_tail())

    def query(self, expr: str) -> list:
        answer = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def alerts(self) -> list:
        answer = requests.get(self.url + "/api/v1/alerts", timeout=5).json()
        assert answer["status"] == "success", answer
        return answer["data"]["alerts"]

    def rule_health(self) -> list:
        answer = requests.get(self.url + "/api/v1/rules", timeout=5).json()
        return [(rule["name"], rule.get("health"), rule.get("lastError"))
                for group in answer["data"]["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


def wait_until(predicate, timeout: float, what: str, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError("timed out after %ss waiting for %s\n%s" % (timeout, what, detail()))


def test_prometheus_scrapes_tenant_series_and_fires_down_alert_when_a_node_dies(tmp_path):
    binary = require_tool("prometheus")
    started = time.monotonic()
    with open(os.path.join(REPO, "helm", "rules", "alerts.yaml"), encoding="utf-8") as rules:
        rules_text = shortened_rules(rules.read())
    assert all(rule.get("for") in (None, "2s") for group in yaml.safe_load(rules_text)["groups"]
               for rule in group["rules"])
    rules_path = str(tmp_path / "alerts.yaml")
    with open(rules_path, "w", encoding="utf-8") as out:
        out.write(rules_text)

    cluster = Cluster(TENANT, str(tmp_path), env={"REPLICATION_FACTOR": "2"})
    prometheus = None
    try:
        n1 = cluster.add("n1")
        n2 = cluster.add("n2")
        cluster.wait_formed()
        n1.put("prom-key", {"v": 1})
        prometheus = Prometheus(binary, str(tmp_path), prometheus_config([n1, n2], rules_path))
        prometheus.wait_ready()

        wait_until(lambda: len(prometheus.query('up{job="kv-responder"} == 1')) == 2, 20, "both targets up",
                   prometheus.log_tail)
        # Tenant-labelled series from both nodes, with the target labels of the ServiceMonitor.
        info = wait_until(lambda: prometheus.query('kv_build_info{tenant="%s"}' % (TENANT,)), 10,
                          "kv_build_info")
        assert len(info) == 2
        assert {(s["metric"]["namespace"], s["metric"]["pod"], s["metric"]["job"]) for s in info} == {
            (NAMESPACE, "n1", "kv-responder"), (NAMESPACE, "n2", "kv-responder")}
        [count] = prometheus.query('count by (namespace, tenant) (kv_build_info)')
        assert count["metric"] == {"namespace": NAMESPACE, "tenant": TENANT} and count["value"][1] == "2"
        assert not prometheus.query('{job="kv-responder", tenant!="%s"}' % (TENANT,))
        assert [s["value"][1] for s in prometheus.query('kv_ring_members{pod="n1"}')] == ["2"]

        # Every rule loaded and evaluates; with both nodes healthy, nothing is down.
        wait_until(lambda: all(health == "ok" for _, health, _ in prometheus.rule_health()), 10,
                   "every rule evaluated", lambda: repr(prometheus.rule_health()))
        # (Right after the first scrapes, one evaluation may see one node's series before the other's and
        # hold a KVResponderDown pending for a moment; once both are scraped, none remains.)
        wait_until(lambda: not [a for a in prometheus.alerts() if a["labels"]["alertname"] == "KVResponderDown"],
                   10, "no KVResponderDown while both nodes are healthy", lambda: repr(prometheus.alerts()))

        # A healthy tenant's error panels show 0, not "No data" (which looks like a broken scrape): the 5xx
        # series exist only once some node has answered a 5xx.
        for _ in range(3):
            n1.put("prom-key", {"v": 2})
        # (The readiness probes' 503s while the nodes joined are not clients' requests: the panels leave them out.)
        assert not prometheus.query('kv_http_requests_total{status=~"5..", route!~"/health.*|/metrics|/_internal/.*"}')
        for title, expr in dashboard_panels(("5xx ratio", "Request rate by status class")):
            expr = (expr.replace("$namespace", NAMESPACE).replace("$tenant", TENANT)
                    .replace("$__rate_interval", "5s"))

            def answered(expr=expr):
                # Clients' traffic within the rate's window: with none at all a ratio is 0/0.
                n1.put("prom-key", {"v": 3})
                values = prometheus.query(expr)
                return values if values and all(value["value"][1] != "NaN" for value in values) else None
            values = wait_until(answered, 10, "%s: %s" % (title, expr))
            assert all(float(value["value"][1]) >= 0 for value in values), (title, values)
            if "5.." in expr.split(" / ")[0]:
                assert [float(value["value"][1]) for value in values] == [0.0], (title, expr, values)

        n2.kill()
        # up == 0 for the killed target: the target_down rule of KVResponderDown, naming the pod.
        firing = wait_until(
            lambda: [a for a in prometheus.alerts() if a["state"] == "firing"
                     and a["labels"]["alertname"] == "KVResponderDown"
                     and a["labels"].get("reason") == "target_down"],
            40, "KVResponderDown (target_down) to fire", lambda: repr(prometheus.alerts()))
        assert [(a["labels"]["pod"], a["labels"]["namespace"], a["labels"]["tenant"]) for a in firing] == [
            ("n2", NAMESPACE, TENANT)]
    finally:
        if prometheus is not None:
            prometheus.stop()
        cluster.stop()
    assert time.monotonic() - started < 90


def dashboard_panels(titles):
    """
    The queries of the dashboard's panels titled ``titles``: ``(title, expr)``.
    """
    with open(os.path.join(REPO, "helm", "dashboards", "kv-responder.json"), encoding="utf-8") as board:
        panels = json.load(board)["panels"]
    return [(panel["title"], target["expr"]) for panel in panels if panel.get("title") in titles
            for target in panel.get("targets", [])]


def documented_scrape_job() -> dict:
    """
    The plain-Prometheus scrape job of docs/MONITORING.md ("Setup without the Prometheus Operator").
    """
    with open(os.path.join(REPO, "docs", "MONITORING.md"), encoding="utf-8") as doc:
        text = doc.read()
    section = text[text.index("## Setup without the Prometheus Operator"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    [job] = yaml.safe_load(block)["scrape_configs"]
    return job


def test_the_documented_scrape_job_finds_each_tenants_metrics_path_from_the_pods_labels(tmp_path):
    """
    If the documented one-job scrape config (its pod discovery swapped for static targets that carry the same
    pod metadata a tenant's pod has, and one that is no KV Responder's) is loaded into a real Prometheus, then the
    node is scraped at its tenant's path, with the job, tenant, namespace and pod labels the alerts expect, and
    the other target is dropped.
    """
    binary = require_tool("prometheus")
    job = documented_scrape_job()
    assert "kubernetes_sd_configs" in job
    del job["kubernetes_sd_configs"]
    cluster = Cluster(TENANT, str(tmp_path))
    prometheus = None
    try:
        node = cluster.add("n1")
        pod = {"__meta_kubernetes_namespace": "cache", "__meta_kubernetes_pod_name": "kv-0",
               "__meta_kubernetes_pod_container_port_name": "http",
               "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "kv-responder",
               "__meta_kubernetes_pod_label_kv_responder_tenant": TENANT}
        stranger = dict(pod, __meta_kubernetes_pod_label_app_kubernetes_io_part_of="other",
                        __meta_kubernetes_pod_name="other-0")
        job["static_configs"] = [{"targets": ["127.0.0.1:%d" % (node.port,)], "labels": pod},
                                 {"targets": ["127.0.0.1:%d" % (free_port(),)], "labels": stranger}]
        prometheus = Prometheus(binary, str(tmp_path), {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [job]})
        prometheus.wait_ready()
        [up] = wait_until(lambda: prometheus.query('up == 1'), 20, "the node scraped", prometheus.log_tail)
        assert up["metric"] == {"__name__": "up", "job": "kv-responder", "instance": "127.0.0.1:%d" % (node.port,),
                                "tenant": TENANT, "namespace": "cache", "pod": "kv-0"}
        assert len(prometheus.query("up")) == 1
        [info] = wait_until(lambda: prometheus.query("kv_build_info"), 10, "kv_build_info")
        assert info["metric"]["tenant"] == TENANT and info["metric"]["pod"] == "kv-0"
    finally:
        if prometheus is not None:
            prometheus.stop()
        cluster.stop()
