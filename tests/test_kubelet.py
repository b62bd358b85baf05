"""
The pod suite's kubelet emulation (tests/kubelet.py) and image tooling (tests/containers.py), checked without podman:
what a rendered pod turns into is what Kubernetes would make of it.
"""

import base64
import os
import stat
from pathlib import Path

import pytest

from . import containers, kubelet
from .conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent

POD = kubelet.PodIdentity(name="rel-abc-x1y2z", namespace="kv", uid="u-1", ip="10.89.0.10", host_ip="10.89.0.1",
                          labels={"app": "kv"}, annotations={}, service_account="default")


def _manifests(*documents):
    return kubelet.Manifests(tuple(documents), "kv")


def test_if_the_dockerfile_names_its_base_in_an_arg_then_the_base_image_is_the_arg_default_or_the_build_arg(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("ARG PYTHON_IMAGE=pypy:3.11-slim\nFROM ${PYTHON_IMAGE} AS build\nRUN true\n"
                          "FROM ${PYTHON_IMAGE}\nCOPY --from=build /x /x\nFROM build AS again\n")
    assert containers.dockerfile_base_images(dockerfile) == ["pypy:3.11-slim"]
    assert containers.dockerfile_base_images(dockerfile, {"PYTHON_IMAGE": "python:3.11-slim"}) == ["python:3.11-slim"]


def test_if_the_repository_dockerfile_is_read_then_its_base_image_has_a_stand_in_recipe():
    for image in containers.dockerfile_base_images(ROOT / "Dockerfile"):
        assert containers.canonical_image(image) in containers.BASE_RECIPES


def test_if_env_refers_to_fields_secrets_and_earlier_variables_then_they_resolve_as_the_kubelet_resolves_them():
    secret = {"kind": "Secret", "metadata": {"name": "s"}, "data": {"k": base64.b64encode(b"hush").decode()}}
    container = {"name": "c", "resources": {"limits": {"memory": "1Gi"}}, "env": [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "ADDRESS", "value": "$(POD_IP):3000"},
        {"name": "ESCAPED", "value": "$$(POD_IP)"},
        {"name": "UNDEFINED", "value": "$(NOPE)"},
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "MISSING", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        {"name": "MEMORY", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
    ]}
    env = kubelet.container_env(container, POD, _manifests(secret), {})
    assert env == {"POD_IP": "10.89.0.10", "ADDRESS": "10.89.0.10:3000", "ESCAPED": "$(POD_IP)",
                   "UNDEFINED": "$(NOPE)", "NAME": "rel-abc-x1y2z", "LABEL": "kv", "SECRET": "hush",
                   "MEMORY": "1024"}


def test_if_a_required_secret_is_missing_then_the_pod_does_not_start():
    container = {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}
    with pytest.raises(AssertionError):
        kubelet.container_env(container, POD, _manifests(), {})


def test_if_the_security_context_is_the_charts_then_podman_runs_read_only_unprivileged_as_its_user():
    pod_spec = {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}}
    container = {"securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]}}}
    args = kubelet.security_args(pod_spec, container, "10001:10001")
    assert " ".join(args) == ("--user 10001:10001 --group-add 10001 --read-only --read-only-tmpfs=false "
                              "--cap-drop ALL --security-opt no-new-privileges")


def test_if_run_as_non_root_meets_a_root_or_named_image_user_then_the_pod_does_not_start():
    for image_user in ("", "0", "root", "kvresponder"):
        with pytest.raises(AssertionError):
            kubelet.security_args({"securityContext": {"runAsNonRoot": True}}, {}, image_user)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the fsGroup needs root")
def test_if_a_projected_secret_has_a_default_mode_and_an_fs_group_then_its_files_are_group_readable_only(tmp_path):
    kubelet._write_projection(tmp_path / "v", [("cluster-secret", b"s", 0o400)], 10001)
    info = (tmp_path / "v" / "cluster-secret").stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 10001, 0o440)


def test_if_rolling_bounds_are_percentages_then_surge_rounds_up_and_unavailable_down():
    assert kubelet._scaled("25%", 3, kubelet.math.ceil) == 1
    assert kubelet._scaled("25%", 3, kubelet.math.floor) == 0
    assert kubelet._scaled(2, 3, kubelet.math.floor) == 2


def test_if_the_default_install_is_rendered_then_its_headless_service_names_are_the_pods_aliases():
    require_tool("helm")
    manifests = kubelet.render(ROOT / "helm", "kv-responder-analytics", "kv", "--set", "tenant=analytics")
    labels = kubelet.pod_template(manifests)["metadata"]["labels"]
    names = kubelet.headless_names(manifests, labels)
    assert "kv-responder-analytics-headless" in names
    assert "kv-responder-analytics-headless.kv.svc.cluster.local" in names
    assert kubelet.headless_names(manifests, {"app": "another"}) == []
