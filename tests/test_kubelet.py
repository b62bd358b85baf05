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
    images = containers.dockerfile_base_images(ROOT / "Dockerfile")
    assert images
    for image in images:
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


class _FakePodman:
    """Answers the one question run_args asks podman: the image's user."""

    prefix = "kvpods-test"

    def output(self, *args, **kwargs):
        assert args[:2] == ("image", "inspect")
        return "10001:10001"


def _pod(tmp_path, manifests, secrets=None):
    fake = _FakePodman()
    network = kubelet.Network(fake, "kvpods-net", name="kvpods-net-net", gateway="10.89.0.1")
    release = kubelet.Release(fake, network, manifests, tmp_path / "release", secrets)
    template = kubelet.pod_template(manifests)
    return kubelet.Pod(release, template, template["spec"]["containers"][0]["image"], "10.89.0.10", "p-1")


def _option_values(args, option):
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == option]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the fsGroup needs root")
def test_if_a_pod_has_a_command_args_volumes_and_limits_then_podman_runs_them_as_the_kubelet_would(tmp_path):
    deployment = {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1, "template": {
        "metadata": {"labels": {"app": "x"}},
        "spec": {
            "terminationGracePeriodSeconds": 45,
            "securityContext": {"fsGroup": 2000},
            "containers": [{
                "name": "c", "image": "img:1", "command": ["twistd", "-n"], "args": ["--flag=$(NAME)", "$$(NAME)"],
                "env": [{"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                 {"name": "secrets", "mountPath": "/etc/s", "readOnly": True}]}],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Mi"}},
                        {"name": "secrets", "projected": {"defaultMode": 0o400, "sources": [
                            {"secret": {"name": "given", "items": [{"key": "k", "path": "token"}]}},
                            {"secret": {"name": "absent", "optional": True}},
                            {"downwardAPI": {"items": [{"path": "name",
                                                        "fieldRef": {"fieldPath": "metadata.name"}}]}}]}}]}}}}
    service = {"kind": "Service", "metadata": {"name": "d-headless"},
               "spec": {"clusterIP": "None", "selector": {"app": "x"}}}
    pod = _pod(tmp_path, _manifests(deployment, service), {"given": {"k": b"t0ken"}})
    args = pod.run_args()
    assert args[-3:] == ["img:1", "--flag=p-1", "$(NAME)"]
    assert _option_values(args, "--entrypoint") == ['["twistd", "-n"]']
    assert _option_values(args, "--memory") == [str(64 * 2 ** 20)] and _option_values(args, "--cpus") == ["0.5"]
    assert _option_values(args, "--stop-timeout") == ["45"]
    assert _option_values(args, "--mount") == ["type=tmpfs,destination=/tmp,tmpfs-mode=1777,tmpfs-size=1048576"]
    assert "d-headless.kv.svc.cluster.local" in _option_values(args, "--network-alias")
    assert _option_values(args, "--ip") == ["10.89.0.10"]
    volume, = _option_values(args, "--volume")
    source, target, mode = volume.split(":")
    assert (target, mode) == ("/etc/s", "ro")
    assert (Path(source) / "token").read_bytes() == b"t0ken"
    assert (Path(source) / "name").read_bytes() == b"p-1"
    assert stat.S_IMODE((Path(source) / "token").stat().st_mode) == 0o440


def test_if_the_default_install_is_run_then_its_secret_reaches_the_pod_and_its_address_is_the_pod_ip(tmp_path):
    require_tool("helm")
    manifests = kubelet.render(ROOT / "helm", "kv-responder-analytics", "kv", "--set", "tenant=analytics")
    pod = _pod(tmp_path, manifests)
    args = pod.run_args()
    env = dict(value.split("=", 1) for value in _option_values(args, "--env"))
    # Through an env var (secretKeyRef) or a file of a mounted volume, whichever the chart uses.
    files = {(Path(volume.split(":")[0]) / name).read_text()
             for volume in _option_values(args, "--volume") for name in os.listdir(volume.split(":")[0])}
    secret = manifests.one("Secret")
    assert base64.b64decode(next(iter(secret["data"].values()))).decode() in set(env.values()) | files
    assert env["TENANT"] == "analytics"
    # status.podIP is the address the pod was given on the network.
    assert "10.89.0.10" in env.values()
