"""
The chart's pods as containers: the Dockerfile built unchanged with podman on a stand-in for its official base
image, the chart rendered by helm, and the rendered Deployment's pods started the way a kubelet starts them
(tests/kubelet.py) on a podman bridge network of the test's own.

Needs root, podman, helm and mmdebstrap: locally the tests skip without them, in CI (CI=true) they fail.
"""

from __future__ import annotations

import os
import random
import string
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import requests

from . import containers
from .conftest import require_tool
from .kubelet import Manifests, Network, Pod, Release, desired_replicas, pod_template, render

pytestmark = pytest.mark.pods

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
EXAMPLES = ROOT / "examples"
NAMESPACE = "kv"


def _run_prefix() -> str:
    return "kvpods-" + "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(6))


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
    started = time.monotonic()
    tag = podman.build(ROOT, "localhost/%s/kv-responder:build" % (podman.prefix,))
    size = int(podman.output("image", "inspect", "--format", "{{.Size}}", tag))
    print("\nimage %s built in %.0f s from %s: %.1f MB" % (
        tag, time.monotonic() - started, containers.dockerfile_base_images(ROOT / "Dockerfile"), size / 1e6))
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
