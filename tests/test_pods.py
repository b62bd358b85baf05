"""
The chart's pods as containers: the Dockerfile built unchanged with podman on a stand-in for its official base
image, the chart rendered by helm, and the rendered Deployment's pods started the way a kubelet starts them
(tests/kubelet.py) on a podman bridge network of the test's own.

Needs root, podman, helm and mmdebstrap: locally the tests skip without them, in CI (CI=true) they fail.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import string
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import requests
import yaml

from . import containers
from .conftest import require_tool
from .kubelet import Manifests, Network, Pod, Release, desired_replicas, pod_template, render

pytestmark = pytest.mark.pods

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
EXAMPLES = ROOT / "examples"
NAMESPACE = "kv"


def _run_prefix() -> str:
    # From the OS, not the random module: a test that seeds the module would give concurrent runs one prefix.
    return "kvpods-" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6))


@pytest.fixture(scope="session")
def podman():
    for tool in ("podman", "helm", "mmdebstrap"):
        require_tool(tool)
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the pod suite needs root (rootful podman and mmdebstrap --mode=root)")
        pytest.skip("the pod suite needs root (rootful podman and mmdebstrap --mode=root)")
    prefix = _run_prefix()
    tool = containers.configure(prefix, Path("/var/tmp") / prefix)
    try:
        yield tool
    finally:
        containers.teardown(tool)


@pytest.fixture(scope="session")
def image(podman):
    """The repository's Dockerfile built unchanged (its default base image, as a stand-in)."""
    # KV_PODS_BUILD_ARGS="PYTHON_IMAGE=python:3.11-slim" runs the suite on another base image.
    build_args = dict(item.split("=", 1) for item in os.environ.get("KV_PODS_BUILD_ARGS", "").split(",") if item)
    started = time.monotonic()
    tag = podman.build(ROOT, "localhost/%s/kv-responder:build" % (podman.prefix,), build_args)
    size = int(podman.output("image", "inspect", "--format", "{{.Size}}", tag))
    containers.REPORT["image build"] = "%s in %.0f s from %s (stand-in), %.1f MB" % (
        tag, time.monotonic() - started,
        ", ".join(containers.dockerfile_base_images(ROOT / "Dockerfile", build_args)), size / 1e6)
    return tag


@pytest.fixture
def network(podman):
    net = Network(podman, _run_prefix()).create()
    try:
        yield net
    finally:
        net.remove()


@pytest.fixture
def start_release(podman, image, network, tmp_path):
    """Starts releases on the test's network; every pod is removed at the end, whatever happened."""
    releases: List[Release] = []

    def start(manifests: Manifests, deploy: bool = True) -> Release:
        tag_rendered_image(podman, image, manifests)
        release = Release(podman, network, manifests, tmp_path / ("release-%d" % (len(releases),)))
        releases.append(release)
        if deploy:
            release.deploy()
        return release

    try:
        yield start
    finally:
        for release in releases:
            release.teardown()


def tag_rendered_image(podman, image: str, manifests: Manifests) -> str:
    """The built image under the name the rendered Deployment asks for (a local "pull")."""
    wanted = pod_template(manifests)["spec"]["containers"][0]["image"]
    if not podman.image_exists(wanted):
        podman.tag(image, wanted if "/" in wanted.split(":")[0] else "localhost/" + wanted)
    return wanted


# --------------------------------------------------------------------------
# Talking to the pods


def base_url(release: Release, pod: Pod) -> str:
    probe = pod.container_spec["readinessProbe"]["httpGet"]
    return "http://%s:%d%s" % (pod.ip, pod.port_number(probe["port"]), release.tenant_path)


def health(release: Release, pod: Pod) -> dict:
    return requests.get(base_url(release, pod) + "/health", timeout=5).json()


def wait_for_one_cluster(release: Release, pods: List[Pod], timeout: float = 90) -> None:
    """Every pod sees every other as an alive peer, and every ring holds all of them."""
    names = {p.name for p in pods}

    def formed() -> bool:
        for pod in pods:
            try:
                peers = requests.get(base_url(release, pod) + "/peers", timeout=3).json()
                ring = health(release, pod)["ring_size"]
            except (requests.RequestException, ValueError):
                return False
            alive = {p["id"] for p in peers if p.get("state") == "alive"}
            if alive != names - {pod.name} or ring != len(pods):
                return False
        return True

    release.wait(formed, timeout, "one cluster of %s" % (sorted(names),))


def put(release: Release, pod: Pod, key: str, value) -> requests.Response:
    return requests.put(base_url(release, pod) + "/kv/" + key, json={"value": value}, timeout=10)


def get(release: Release, pod: Pod, key: str) -> requests.Response:
    return requests.get(base_url(release, pod) + "/kv/" + key, timeout=10)


def assert_reads_and_writes_through_every_pod(release: Release, pods: List[Pod], tag: str) -> Dict[str, int]:
    written = {}
    for index, pod in enumerate(pods):
        for n in range(10):
            key = "%s-%d-%d" % (tag, index, n)
            response = put(release, pod, key, index * 100 + n)
            assert response.status_code == 201, response.text
            written[key] = index * 100 + n
    for pod in pods:
        for key, value in written.items():
            response = get(release, pod, key)
            assert response.status_code == 200 and response.json()["value"] == value, (pod.name, key, response.text)
    return written


# --------------------------------------------------------------------------
# Scenarios


def test_if_the_default_install_starts_three_pods_then_they_form_one_cluster_that_serves_through_every_pod(
        start_release):
    manifests = render(CHART, "kv-responder-analytics", NAMESPACE, "--set", "tenant=analytics")
    assert desired_replicas(manifests) == 3
    release = start_release(manifests)
    wait_for_one_cluster(release, release.pods)
    assert_reads_and_writes_through_every_pod(release, release.pods, "default")
    for pod in release.pods:
        assert_security_context_holds(pod)


def assert_security_context_holds(pod: Pod) -> None:
    """The service process runs as the rendered security context says, seen from inside its container."""
    context = dict(pod.spec.get("securityContext") or {})
    context.update(pod.container_spec.get("securityContext") or {})
    status = dict(line.split(":\t", 1) for line in
                  pod.podman.output("exec", pod.container, "cat", "/proc/1/status").splitlines() if ":\t" in line)
    if "runAsUser" in context:
        assert status["Uid"].split()[:2] == [str(context["runAsUser"])] * 2
    if "runAsGroup" in context:
        assert status["Gid"].split()[:2] == [str(context["runAsGroup"])] * 2
    capabilities = context.get("capabilities") or {}
    if "ALL" in (capabilities.get("drop") or []) and not capabilities.get("add"):
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    if context.get("allowPrivilegeEscalation") is False:
        assert status["NoNewPrivs"].strip() == "1"
    writable = {m["mountPath"] for m in pod.container_spec.get("volumeMounts") or []
                if "emptyDir" in {v["name"]: v for v in pod.spec.get("volumes") or []}[m["name"]]}
    for path in writable:
        assert pod.podman.run("exec", pod.container, "sh", "-c", "echo x > %s/kv-write-check" % (path,),
                              check=False).returncode == 0, path
    if context.get("readOnlyRootFilesystem"):
        for path in ("/kv-write-check", "/var/tmp/kv-write-check", "/run/kv-write-check"):
            result = pod.podman.run("exec", pod.container, "sh", "-c", "echo x > " + path, check=False)
            assert result.returncode != 0, "%s is writable" % (path,)


def test_if_discovery_is_dns_only_then_the_pods_find_each_other_through_the_headless_service(start_release):
    """examples/d1-values.yaml: no multicast, only the headless Service's A records (the network alias)."""
    manifests = render(CHART, "kv-responder-d1", NAMESPACE, "-f", str(EXAMPLES / "d1-values.yaml"))
    env = {e["name"]: e.get("value") for e in pod_template(manifests)["spec"]["containers"][0]["env"]}
    assert env["DISCOVERY_MODE"] == "dns"
    release = start_release(manifests)
    wait_for_one_cluster(release, release.pods)
    assert_reads_and_writes_through_every_pod(release, release.pods, "dns")


def test_if_discovery_is_multicast_only_then_the_pods_find_each_other_on_the_podman_bridge(start_release):
    """A podman bridge carries multicast between its containers, as a single-node cluster's bridge CNI does."""
    manifests = render(CHART, "kv-responder-mc", NAMESPACE, "--set", "discovery.mode=multicast")
    release = start_release(manifests)
    wait_for_one_cluster(release, release.pods)


def test_if_a_pod_is_stopped_then_no_key_is_lost(start_release):
    manifests = render(CHART, "kv-responder-stop", NAMESPACE)
    release = start_release(manifests)
    wait_for_one_cluster(release, release.pods)
    written = write_keys(release, release.pods, "stop", 300)
    stopped = release.pods[0]
    started = time.monotonic()
    release.delete_pod(stopped)
    print("\npodman stop -t %d of %s took %.1f s" % (stopped.grace, stopped.name, time.monotonic() - started))
    survivors = [p for p in release.pods if p is not stopped]
    assert_every_key_reads_back(release, survivors, written)
    # The stopped node handed its entries over while it drained: every key has all its copies again at once,
    # not after an anti-entropy pass.
    replicas = int(container_env_value(manifests, "REPLICATION_FACTOR"))
    release.wait(lambda: sum(health(release, pod)["keys"] for pod in survivors) == replicas * len(written), 3,
                 "%d copies of %d keys on the survivors" % (replicas * len(written), len(written)))


def test_if_a_pod_is_killed_then_no_request_through_the_others_fails_and_its_copies_are_made_again(start_release):
    manifests = render(CHART, "kv-responder-kill", NAMESPACE)
    release = start_release(manifests)
    wait_for_one_cluster(release, release.pods)
    replicas = int(container_env_value(manifests, "REPLICATION_FACTOR"))
    written = write_keys(release, release.pods, "kill", 300)
    victim, others = release.pods[0], release.pods[1:]
    traffic = Traffic(release, lambda: others, "kill-traffic")
    traffic.start()
    try:
        time.sleep(2)
        victim.kill()
        # The kubelet restarts the container; the survivors keep serving while it is gone and rejoins.
        release.wait(lambda: victim.restarts >= 1, 30, "the kubelet restarting the killed container")
        release.wait(lambda: victim.available, 120, "the restarted pod ready again")
        time.sleep(3)
    finally:
        traffic.finish()
    print("\nkill: %d requests through the other pods, %d failed" % (traffic.requests, len(traffic.failures)))
    assert traffic.requests > 50
    assert traffic.failures == []
    written.update(traffic.acked)

    def copies() -> int:
        return sum(health(release, pod)["keys"] for pod in release.pods)

    # Every key has its replication factor's copies again (the restarted node came back empty).
    release.wait(lambda: copies() == replicas * len(written), 120,
                 "%d copies of %d keys" % (replicas * len(written), len(written)))
    assert_every_key_reads_back(release, release.pods, written)


def test_if_a_pod_hangs_then_readiness_takes_it_out_of_rotation_and_liveness_restarts_it(start_release):
    """
    SIGSTOP freezes a node as a hung process would: its readiness probe fails first (the client stops sending
    it requests), then its liveness probe, and the kubelet restarts it; it comes back into rotation once ready.
    """
    manifests = render(CHART, "kv-responder-hang", NAMESPACE)
    release = start_release(manifests)
    wait_for_one_cluster(release, release.pods)
    hung = release.pods[0]
    container = hung.container_spec
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    # One probe period and timeout more, and 2 s: the emulated kubelet runs each pod's probes and its
    # ``podman inspect`` one after another on one thread.
    out_within = (readiness["periodSeconds"] * (readiness["failureThreshold"] + 1) + 2 * readiness["timeoutSeconds"]
                  + 2)
    restart_within = (liveness["periodSeconds"] * (liveness["failureThreshold"] + 1)
                      + liveness["timeoutSeconds"] + hung.grace)
    stopped_at = time.monotonic()
    stopped_on_timeline = release.clock()
    release.podman.run("kill", "--signal", "STOP", hung.container)
    release.wait(lambda: hung not in release.endpoints(), out_within, "the hung pod out of rotation")
    out_after = time.monotonic() - stopped_at
    release.wait(lambda: hung.restarts >= 1, restart_within + 10, "the kubelet restarting the hung pod")
    restarted_after = time.monotonic() - stopped_at
    release.wait(lambda: hung in release.endpoints(), 120, "the restarted pod back in rotation")
    print("\nhung pod: out of rotation after %.0f s, restarted after %.0f s, back after %.0f s" % (
        out_after, restarted_after, time.monotonic() - stopped_at))
    # Out of rotation before the restart: its readiness failed first (a restart alone also takes a pod out).
    events = [what for at, pod, what in release.timeline() if pod == hung.name and at >= stopped_on_timeline]
    assert "not ready" in events and "restart (liveness)" in events, events
    assert events.index("not ready") < events.index("restart (liveness)"), events
    wait_for_one_cluster(release, release.pods)
    assert_reads_and_writes_through_every_pod(release, release.pods, "hang")


def test_if_every_pod_is_replaced_by_a_new_image_tag_under_traffic_then_no_acknowledged_write_is_lost(
        podman, image, start_release):
    manifests = render(CHART, "kv-responder-roll", NAMESPACE)
    release = start_release(manifests)
    wait_for_one_cluster(release, release.pods)
    written = write_keys(release, release.pods, "roll", 200)
    old_pods = list(release.pods)
    new_tag = "rolled-" + podman.prefix
    new_manifests = render(CHART, "kv-responder-roll", NAMESPACE, "--set", "image.tag=" + new_tag)
    new_image = tag_rendered_image(podman, image, new_manifests)
    assert new_image.endswith(":" + new_tag)
    traffic = Traffic(release, release.endpoints, "roll-traffic")
    traffic.start()
    started = time.monotonic()
    try:
        release.roll_to(new_manifests)
        time.sleep(2)
    finally:
        traffic.finish()
    print("\nrolling replacement: %.0f s, %d requests, %d failed: %s; slowest: %s" % (
        time.monotonic() - started, traffic.requests, len(traffic.failures), traffic.failures[:5],
        sorted(traffic.slowest, key=lambda slow: -slow[-1])[:5]))
    new_pods = [p for p in release.pods if not p.terminating]
    assert {p.image for p in new_pods} == {new_image}
    assert not set(new_pods) & set(old_pods)
    assert len(new_pods) == desired_replicas(new_manifests)
    # Never fewer pods serving than the strategy allows (maxUnavailable 0: all the replicas, all the time).
    assert traffic.min_endpoints >= desired_replicas(manifests) - release.rolling_bounds()[1]
    # Failures first, with what the pods that failed logged: a request left unanswered for the client's
    # timeout also leaves the traffic too few requests, and that assertion alone would say nothing of why.
    assert traffic.failures == [], (traffic.failures[:20], release.timeline(),
                                    failed_pods_logs(release, traffic, old_pods))
    assert traffic.requests > 100, (release.timeline(), traffic.slowest, pods_logs(old_pods + release.pods))
    written.update(traffic.acked)
    wait_for_one_cluster(release, new_pods)
    assert_every_key_reads_back(release, new_pods, written)


def test_if_two_tenants_share_one_network_then_their_clusters_and_data_stay_apart(start_release):
    """examples/t1-values.yaml and t2-values.yaml, on one bridge: two clusters, neither sees the other."""
    t1 = start_release(render(CHART, "kv-responder-t1", NAMESPACE, "-f", str(EXAMPLES / "t1-values.yaml")),
                       deploy=False)
    t2 = start_release(render(CHART, "kv-responder-t2", NAMESPACE, "-f", str(EXAMPLES / "t2-values.yaml")),
                       deploy=False)
    pods1 = [t1.new_pod() for _ in range(desired_replicas(t1.manifests))]
    pods2 = [t2.new_pod() for _ in range(desired_replicas(t2.manifests))]
    t1.wait(lambda: all(p.available for p in pods1 + pods2), 180, "both tenants ready")
    wait_for_one_cluster(t1, pods1)
    wait_for_one_cluster(t2, pods2)
    assert put(t1, pods1[0], "shared-name", "t1's").status_code == 201
    for pod in pods2:
        assert get(t2, pod, "shared-name").status_code == 404
        # A pod answers its own tenant's prefix only.
        assert requests.get(base_url(t1, pod) + "/kv/shared-name", timeout=5).status_code == 404
    assert put(t2, pods2[0], "shared-name", "t2's").status_code == 201
    assert get(t1, pods1[1], "shared-name").json()["value"] == "t1's"
    assert get(t2, pods2[1], "shared-name").json()["value"] == "t2's"


def test_if_the_image_runs_then_it_runs_as_a_numeric_non_root_user_and_writes_nothing_outside_tmp(
        podman, image, network, record_property):
    """
    The image alone, as ``docker run -e TENANT=demo`` starts it, with a writable root: ``podman diff`` then
    shows every path it wrote, and only /tmp may be among them.
    """
    config = podman.inspect("image", image)["Config"]
    # PyPy marks a major collection's heap a few MB a step, between requests, not all at once; its young
    # generation is larger than the cache-sized default, which slowed replicated writes.
    assert "PYPY_GC_INCREMENT_STEP=4MB" in config.get("Env", []), config.get("Env")
    assert "PYPY_GC_NURSERY=24MB" in config.get("Env", []), config.get("Env")
    user = config.get("User", "")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER %r is not a numeric non-root uid" % (user,)
    assert not gid or gid.isdigit(), "USER %r has a non-numeric group" % (user,)
    size = int(podman.output("image", "inspect", "--format", "{{.Size}}", image))
    record_property("image_size_bytes", size)
    containers.REPORT["image size"] = "%.1f MB (%s)" % (size / 1e6, image)
    print("\nimage size: %.1f MB" % (size / 1e6,))
    name = network.prefix + "-plain"
    ip = network.allocate_ip()
    podman.run("run", "--detach", "--name", name, "--network", network.name, "--ip", ip,
               "--env", "TENANT=demo", "--env", "POD_IP=" + ip, image)
    try:
        url = "http://%s:3000/demo" % (ip,)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, podman.run("logs", name, check=False).stdout[-3000:]
            time.sleep(0.3)
        assert requests.put(url + "/kv/k", json={"value": 1}, timeout=5).status_code == 201
        assert requests.get(url + "/kv/k", timeout=5).json()["value"] == 1
        diag = requests.get(url + "/diag", timeout=5).json()
        assert diag["process"]["uid"] == int(uid)
        podman.run("stop", "--time", "10", name)
        # What podman itself changes (the mount points of /etc/hosts, /etc/resolv.conf...) shows in a
        # container of the same image that ran nothing; only the service's own writes are counted.
        podman.run("run", "--name", name + "-baseline", "--network", network.name, "--entrypoint", "true", image)
        baseline = set(container_changes(podman, name + "-baseline"))
        outside = [path for path in container_changes(podman, name)
                   if path not in baseline and path != "/tmp" and not path.startswith("/tmp/")]
        assert outside == [], "written outside /tmp: %s" % (outside,)
    finally:
        podman.run("rm", "--force", "--time", "0", name, name + "-baseline", check=False)


def container_changes(podman, name: str) -> List[str]:
    diff = json.loads(podman.output("diff", "--format", "json", name))
    return [path for kind in ("changed", "added", "deleted") for path in diff.get(kind) or []]


# --------------------------------------------------------------------------
# Traffic and checks


class Traffic(threading.Thread):
    """
    A client that rotates over ``targets()`` (the Service's endpoints): a new key written, then an
    acknowledged one read back, in turn. It records every acknowledged write and every failed request.
    """

    def __init__(self, release: Release, targets, tag: str) -> None:
        super().__init__(name="traffic-" + tag, daemon=True)
        self.release, self.targets, self.tag = release, targets, tag
        self.acked: Dict[str, int] = {}
        self.failures: List[tuple] = []
        self.requests = 0
        #: Requests that took over half a second.
        self.slowest: List[tuple] = []
        self.min_endpoints: Optional[int] = None
        #: When the request being made was sent (the failures say when each failed, and when it was sent).
        self._sent_at = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._done.is_set():
            pods = self.targets()
            self.min_endpoints = len(pods) if self.min_endpoints is None else min(self.min_endpoints, len(pods))
            if not pods:
                time.sleep(0.05)
                continue
            n += 1
            key = "%s-%d" % (self.tag, n)
            self._request(pods[n % len(pods)], "put", key, n)
            # Each request goes to an endpoint of its moment, as a client following the Service's does: one chosen
            # before a PUT could have been leaving for longer than a leaving pod takes new connections.
            pods = self.targets()
            if self.acked and pods:
                old_key = random.choice(list(self.acked))
                self._request(pods[n % len(pods)], "get", old_key, self.acked[old_key])

    def _request(self, pod: Pod, method: str, key: str, value: int) -> None:
        self.requests += 1
        started = time.monotonic()
        self._sent_at = round(self.release.clock(), 2)
        try:
            self._send(pod, method, key, value)
        finally:
            took = time.monotonic() - started
            if took > 0.5:
                # The slow requests, for a run that made too few: which pod, when, and how long.
                self.slowest.append((round(self.release.clock(), 2), pod.name, method, key, round(took, 2)))

    def _send(self, pod: Pod, method: str, key: str, value: int) -> None:
        try:
            if method == "put":
                response = put(self.release, pod, key, value)
                if response.status_code in (200, 201):
                    self.acked[key] = value
                    return
            else:
                response = get(self.release, pod, key)
                if response.status_code == 200 and response.json()["value"] == value:
                    return
            self.failures.append((self.release.clock(), pod.name, method, key, response.status_code,
                                  response.text[:200], "sent at", self._sent_at))
        except requests.RequestException as error:
            self.failures.append((self.release.clock(), pod.name, method, key, type(error).__name__,
                                  str(error)[:200], "sent at", self._sent_at))

    def finish(self) -> None:
        self._done.set()
        self.join(30)


def failed_pods_logs(release: Release, traffic: "Traffic", replaced: List[Pod] = ()) -> Dict[str, str]:
    """
    The last lines each pod that failed one of ``traffic``'s requests logged (its container kept, if stopped),
    among the release's pods and those it ``replaced`` (no longer among them).
    """
    failed = {failure[1] for failure in traffic.failures}
    return pods_logs([pod for pod in list(replaced) + release.pods if pod.name in failed])


def pods_logs(pods: List[Pod], lines: int = 40) -> Dict[str, str]:
    """The last ``lines`` lines each of ``pods`` logged."""
    return {pod.name: "\n".join(pod.logs().splitlines()[-lines:]) for pod in pods}


def write_keys(release: Release, pods: List[Pod], tag: str, count: int) -> Dict[str, int]:
    written = {}
    for n in range(count):
        key = "%s-%d" % (tag, n)
        response = put(release, pods[n % len(pods)], key, n)
        assert response.status_code == 201, response.text
        written[key] = n
    return written


def assert_every_key_reads_back(release: Release, pods: List[Pod], written: Dict[str, int]) -> None:
    lost = []
    for n, (key, value) in enumerate(sorted(written.items())):
        response = get(release, pods[n % len(pods)], key)
        if response.status_code != 200 or response.json()["value"] != value:
            lost.append((key, response.status_code))
    assert lost == [], "%d of %d keys lost: %s" % (len(lost), len(written), lost[:10])


def container_env_value(manifests: Manifests, name: str) -> str:
    for entry in pod_template(manifests)["spec"]["containers"][0]["env"]:
        if entry["name"] == name:
            return entry["value"]
    raise KeyError(name)


#: Every example that runs a cache (a monitoring-only release has no pods: the chart tests check what it renders).
EXAMPLE_FILES = sorted(path.name for path in EXAMPLES.glob("*-values.yaml")
                       if not (yaml.safe_load(path.read_text()) or {}).get("monitoringOnly"))

#: Examples whose pods another scenario runs already.
EXAMPLES_RUN_ELSEWHERE = {
    "d1-values.yaml": test_if_discovery_is_dns_only_then_the_pods_find_each_other_through_the_headless_service,
    "t1-values.yaml": test_if_two_tenants_share_one_network_then_their_clusters_and_data_stay_apart,
    "t2-values.yaml": test_if_two_tenants_share_one_network_then_their_clusters_and_data_stay_apart,
}


@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_if_an_example_values_file_changes_the_pod_then_its_pods_form_a_cluster_and_serve(example, start_release):
    """
    Each example is rendered next to the default install of the same release and tenant; where its pod differs
    (resources, env, probes...), its own pods are run.
    """
    values = yaml.safe_load((EXAMPLES / example).read_text()) or {}
    release_name = "kv-responder-" + example[:-len("-values.yaml")]
    manifests = render(CHART, release_name, NAMESPACE, "-f", str(EXAMPLES / example))
    tenant = ["--set", "tenant=" + values["tenant"]] if values.get("tenant") else []
    default = render(CHART, release_name, NAMESPACE, *tenant)
    if pod_template(manifests) == pod_template(default) or example in EXAMPLES_RUN_ELSEWHERE:
        print("\n%s: its pod runs in %s" % (example, EXAMPLES_RUN_ELSEWHERE.get(example, _default_install).__name__))
        return
    release = start_release(manifests)
    wait_for_one_cluster(release, release.pods)
    assert_reads_and_writes_through_every_pod(release, release.pods, example.split("-")[0])


_default_install = test_if_the_default_install_starts_three_pods_then_they_form_one_cluster_that_serves_through_every_pod
