"""
The chart's pods as podman containers, started the way a kubelet starts them.

Nothing here knows what the chart contains: :func:`render` runs the real ``helm template``, and a
:class:`Release` runs whatever its Deployment says on one podman bridge network:

- the env, with ``fieldRef`` (pod IP, name, namespace, labels...), ``resourceFieldRef``, ``secretKeyRef`` and
  ``configMapKeyRef`` resolved and ``$(VAR)`` references expanded; ``envFrom``;
- Secret and ConfigMap volumes (items, defaultMode, fsGroup ownership), ``emptyDir`` as a tmpfs;
- the security context: runAsUser/runAsGroup/runAsNonRoot, fsGroup and supplementalGroups, readOnlyRootFilesystem
  (with nothing else writable), capabilities, allowPrivilegeEscalation: false as no-new-privileges;
- command and args, workingDir, memory and CPU limits;
- startup, liveness and readiness probes (httpGet, tcpSocket, exec) at their periods and thresholds: a failed
  liveness probe restarts the container, a container that exits is restarted with the kubelet's back-off, and
  readiness decides whether the pod is in the client's rotation (:meth:`Release.endpoints`);
- deletion: out of rotation first, then ``podman stop`` with ``terminationGracePeriodSeconds``;
- the headless Services that select the pods, as network aliases (short name and FQDN);
- the Deployment's strategy (RollingUpdate with maxSurge/maxUnavailable and minReadySeconds, or Recreate).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import socket
import string
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import yaml

from .containers import Podman

CLUSTER_DOMAIN = "cluster.local"
#: Pod names and uids from the OS: the random module may have been seeded by an earlier test.
_random = random.SystemRandom()
NODE_NAME = "kv-pods-node"


# --------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Manifests:
    """The documents of one ``helm template`` run."""

    documents: Tuple[dict, ...]
    namespace: str

    def all(self, kind: str) -> List[dict]:
        return [d for d in self.documents if d.get("kind") == kind]

    def one(self, kind: str, name: Optional[str] = None) -> dict:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, "expected one %s %s, found %d" % (kind, name or "", len(found))
        return found[0]

    def get(self, kind: str, name: str) -> Optional[dict]:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        return found[0] if found else None


def render(chart: Path, release: str, namespace: str, *args: str) -> Manifests:
    """The chart rendered by the real helm binary, as ``helm install`` would apply it."""
    helm = shutil.which("helm") or "/usr/local/bin/helm"
    result = subprocess.run([helm, "template", release, str(chart), "--namespace", namespace, *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return Manifests(tuple(d for d in yaml.safe_load_all(result.stdout) if d), namespace)


def pod_template(manifests: Manifests) -> dict:
    return manifests.one("Deployment")["spec"]["template"]


def desired_replicas(manifests: Manifests) -> int:
    """The Deployment's replicas or, when an HPA owns them, the HPA's minimum (what it starts with)."""
    deployment = manifests.one("Deployment")
    if "replicas" in deployment["spec"]:
        return int(deployment["spec"]["replicas"])
    for hpa in manifests.all("HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]:
            return int(hpa["spec"].get("minReplicas", 1))
    return 1


def headless_names(manifests: Manifests, labels: Dict[str, str]) -> List[str]:
    """The DNS names of every headless Service that selects pods with ``labels``: short and FQDN."""
    names = []
    for service in manifests.all("Service"):
        spec = service["spec"]
        selector = spec.get("selector") or {}
        if spec.get("clusterIP") == "None" and selector and all(labels.get(k) == v for k, v in selector.items()):
            name, ns = service["metadata"]["name"], service["metadata"].get("namespace", manifests.namespace)
            names += [name, "%s.%s" % (name, ns), "%s.%s.svc" % (name, ns), "%s.%s.svc.%s" % (name, ns, CLUSTER_DOMAIN)]
    return names


# --------------------------------------------------------------------------
# Quantities


_SUFFIXES = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9,
             "T": 10 ** 12, "m": 0.001, "": 1}


def quantity(value) -> float:
    """A Kubernetes quantity (``64Mi``, ``250m``, ``1``) as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value).strip())
    assert match and match.group(2) in _SUFFIXES, "unsupported quantity %r" % (value,)
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def resource_field(container: dict, resource: str, divisor="1") -> str:
    """``resourceFieldRef`` as the kubelet resolves it: rounded up, a missing limit being the node's capacity."""
    kind, _, name = resource.partition(".")
    value = (container.get("resources") or {}).get(kind, {}).get(name)
    if value is None:
        value = os.cpu_count() if name == "cpu" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return str(int(math.ceil(quantity(value) / quantity(divisor))))


# --------------------------------------------------------------------------
# The pod's environment


@dataclass(frozen=True)
class PodIdentity:
    name: str
    namespace: str
    uid: str
    ip: str
    host_ip: str
    labels: Dict[str, str]
    annotations: Dict[str, str]
    service_account: str


def _secret_data(manifests: Manifests, name: str, extra: Dict[str, Dict[str, bytes]]) -> Optional[Dict[str, bytes]]:
    if name in extra:
        return extra[name]
    secret = manifests.get("Secret", name)
    if secret is None:
        return None
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def _config_map_data(manifests: Manifests, name: str, extra: Dict[str, Dict[str, bytes]]) -> Optional[Dict[str, bytes]]:
    if name in extra:
        return extra[name]
    config_map = manifests.get("ConfigMap", name)
    if config_map is None:
        return None
    data = {k: v.encode() for k, v in (config_map.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (config_map.get("binaryData") or {}).items()})
    return data


def field_ref(path: str, pod: PodIdentity) -> str:
    simple = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": pod.uid,
              "status.podIP": pod.ip, "status.podIPs": pod.ip, "status.hostIP": pod.host_ip,
              "status.hostIPs": pod.host_ip, "spec.nodeName": NODE_NAME, "spec.serviceAccountName": pod.service_account}
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (pod.labels if match.group(1) == "labels" else pod.annotations).get(match.group(2), "")
    raise NotImplementedError("fieldRef %s" % (path,))


def _expand(value: str, env: Dict[str, str]) -> str:
    """``$(VAR)`` expansion as Kubernetes does it: defined names only, ``$$`` escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def container_env(container: dict, pod: PodIdentity, manifests: Manifests,
                  secrets: Dict[str, Dict[str, bytes]]) -> Dict[str, str]:
    """The container's environment, resolved in order as the kubelet resolves it."""
    env: Dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        ref = source.get("secretRef") or source.get("configMapRef")
        lookup = _secret_data if "secretRef" in source else _config_map_data
        data = lookup(manifests, ref["name"], secrets)
        if data is None:
            assert ref.get("optional"), "envFrom: %s not found" % (ref["name"],)
            continue
        env.update({prefix + k: v.decode() for k, v in data.items()})
    for entry in container.get("env") or []:
        name = entry["name"]
        if "value" in entry:
            env[name] = _expand(str(entry["value"]), env)
            continue
        source = entry.get("valueFrom")
        if source is None:
            env[name] = ""
        elif "fieldRef" in source:
            env[name] = field_ref(source["fieldRef"]["fieldPath"], pod)
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            env[name] = resource_field(container, ref["resource"], ref.get("divisor", "1"))
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            ref = source.get("secretKeyRef") or source["configMapKeyRef"]
            lookup = _secret_data if "secretKeyRef" in source else _config_map_data
            data = lookup(manifests, ref["name"], secrets)
            if data is None or ref["key"] not in data:
                assert ref.get("optional"), "%s: %s/%s not found" % (name, ref["name"], ref["key"])
                continue
            env[name] = data[ref["key"]].decode()
        else:
            raise NotImplementedError("env source %r" % (source,))
    return env


# --------------------------------------------------------------------------
# Volumes and the security context


def _items(data: Dict[str, bytes], items: Optional[list], mode: int, source: str) -> List[Tuple[str, bytes, int]]:
    """The files of one Secret or ConfigMap source: the listed items (each with its mode), or every key."""
    wanted = items if items is not None else [{"key": k, "path": k} for k in data]
    files = []
    for item in wanted:
        if item["key"] not in data:
            raise AssertionError("key %s not in %s" % (item["key"], source))
        files.append((item["path"], data[item["key"]], int(item.get("mode", mode))))
    return files


def volume_files(volume: dict, pod: "Pod") -> List[Tuple[str, bytes, int]]:
    """
    The files the kubelet projects for a ``secret``, ``configMap``, ``downwardAPI`` or ``projected`` volume (an
    optional source that is missing adds none).
    """
    manifests, secrets = pod.release.manifests, pod.release.secrets
    if "projected" in volume:
        mode = int(volume["projected"].get("defaultMode", 0o644))
        sources = volume["projected"].get("sources") or []
    else:
        kind = next(k for k in ("secret", "configMap", "downwardAPI") if k in volume)
        mode = int((volume[kind] or {}).get("defaultMode", 0o644))
        sources = [{kind: volume[kind]}]
    files: List[Tuple[str, bytes, int]] = []
    for source in sources:
        if "secret" in source or "configMap" in source:
            ref = source.get("secret") or source["configMap"]
            name = ref.get("secretName") or ref.get("name")
            lookup = _secret_data if "secret" in source else _config_map_data
            data = lookup(manifests, name, secrets)
            if data is None:
                assert ref.get("optional"), "volume %s: %s not found" % (volume["name"], name)
                continue
            files += _items(data, ref.get("items"), mode, name)
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                assert "fieldRef" in item, "downwardAPI item %r" % (item,)
                value = field_ref(item["fieldRef"]["fieldPath"], pod.identity).encode()
                files.append((item["path"], value, int(item.get("mode", mode))))
        elif "serviceAccountToken" in source:
            files.append((source["serviceAccountToken"]["path"], b"kv-pods-not-a-real-token", mode))
        else:
            raise NotImplementedError("projected source %r" % (source,))
    return files


def _write_projection(directory: Path, files: List[Tuple[str, bytes, int]], fs_group: Optional[int]) -> None:
    """
    The files as the kubelet writes them; with an fsGroup, group-owned by it and group-readable (the kubelet's
    ownership pass on a read-only volume).
    """
    directory.mkdir(parents=True)
    directory.chmod(0o755)
    for relative, data, mode in files:
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if fs_group is not None:
            os.chown(path, 0, fs_group)
            mode |= 0o440
        path.chmod(mode)


def security_args(pod_spec: dict, container: dict, image_user: str) -> List[str]:
    """podman run arguments for the pod's and the container's security contexts."""
    pod_context = pod_spec.get("securityContext") or {}
    context = dict(pod_context)
    context.update(container.get("securityContext") or {})
    args: List[str] = []
    user, group = context.get("runAsUser"), context.get("runAsGroup")
    if context.get("runAsNonRoot"):
        # The kubelet's check: a numeric, non-zero uid from the context or the image, or it refuses to start.
        effective = user if user is not None else image_user.split(":")[0]
        assert str(effective).isdigit(), "runAsNonRoot with a non-numeric image user %r" % (image_user,)
        assert int(effective) != 0, "runAsNonRoot, but the container would run as root"
    if user is not None or group is not None:
        # Without runAsGroup the runtime takes the user's group from the image, as podman does with a bare uid.
        args += ["--user", str(user if user is not None else image_user.split(":")[0] or 0)
                 + (":%s" % (group,) if group is not None else "")]
    for extra in ([pod_context["fsGroup"]] if "fsGroup" in pod_context else []) + list(
            pod_context.get("supplementalGroups") or []):
        args += ["--group-add", str(extra)]
    if context.get("readOnlyRootFilesystem"):
        # Only the pod's volumes are writable; podman's own tmpfs mounts on /tmp, /run and /var/tmp are not
        # in a pod.
        args += ["--read-only", "--read-only-tmpfs=false"]
    if context.get("privileged"):
        args += ["--privileged"]
    capabilities = context.get("capabilities") or {}
    for name in capabilities.get("drop") or []:
        args += ["--cap-drop", name]
    for name in capabilities.get("add") or []:
        args += ["--cap-add", name]
    if context.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    for sysctl in pod_context.get("sysctls") or []:
        args += ["--sysctl", "%s=%s" % (sysctl["name"], sysctl["value"])]
    return args


# --------------------------------------------------------------------------
# Probes


def probe_once(probe: dict, pod: "Pod") -> bool:
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        get = probe["httpGet"]
        host = get.get("host") or pod.ip
        port = pod.port_number(get["port"])
        connection_class = http.client.HTTPSConnection if get.get("scheme") == "HTTPS" else http.client.HTTPConnection
        try:
            connection = connection_class(host, port, timeout=timeout)
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            connection.request("GET", get.get("path", "/"), headers=headers)
            status = connection.getresponse().status
            connection.close()
            return 200 <= status < 400
        except (OSError, http.client.HTTPException):
            return False
    if "tcpSocket" in probe:
        try:
            socket.create_connection((probe["tcpSocket"].get("host") or pod.ip,
                                      pod.port_number(probe["tcpSocket"]["port"])), timeout=timeout).close()
            return True
        except OSError:
            return False
    if "exec" in probe:
        result = pod.podman.run("exec", pod.container, *probe["exec"]["command"], check=False,
                                timeout=timeout + 5)
        return result.returncode == 0
    raise NotImplementedError("probe %r" % (probe,))


@dataclass
class ProbeState:
    probe: dict
    next_at: float
    successes: int = 0
    failures: int = 0

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        self.next_at = now + float(self.probe.get("periodSeconds", 10))

    @property
    def failed(self) -> bool:
        return self.failures >= int(self.probe.get("failureThreshold", 3))

    @property
    def succeeded(self) -> bool:
        return self.successes >= int(self.probe.get("successThreshold", 1))


# --------------------------------------------------------------------------
# Pods


@dataclass
class PodEvent:
    at: float
    pod: str
    what: str


class Pod:
    """One replica of the pod template: one container, its volumes, its prober."""

    def __init__(self, release: "Release", template: dict, image: str, ip: str, name: str) -> None:
        self.release = release
        self.podman: Podman = release.podman
        self.template = template
        self.spec = template["spec"]
        assert len(self.spec["containers"]) == 1, "one container a pod is what the suite runs"
        self.container_spec = self.spec["containers"][0]
        self.image = image
        self.ip = ip
        self.name = name
        self.container = "%s-%s" % (release.network.prefix, name)
        self.ready = False
        self.terminating = False
        self.restarts = 0
        self.ready_since: Optional[float] = None
        self.final_logs = ""
        self._stop = threading.Event()
        self._prober: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.volume_dir = release.workdir / name
        self.identity = PodIdentity(
            name=name, namespace=release.manifests.namespace,
            uid="%08x-0000-4000-8000-%012x" % (_random.getrandbits(32), _random.getrandbits(48)),
            ip=ip, host_ip=release.network.gateway,
            labels=dict(template["metadata"].get("labels") or {}),
            annotations=dict(template["metadata"].get("annotations") or {}),
            service_account=self.spec.get("serviceAccountName", "default"))

    # -- what podman runs

    def port_number(self, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in self.container_spec.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise AssertionError("no container port named %r" % (port,))

    @property
    def grace(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))

    def env(self) -> Dict[str, str]:
        return container_env(self.container_spec, self.identity, self.release.manifests, self.release.secrets)

    def run_args(self) -> List[str]:
        container, spec = self.container_spec, self.spec
        image_user = self.podman.output("image", "inspect", "--format", "{{.Config.User}}", self.image)
        args = ["run", "--detach", "--name", self.container, "--hostname", self.name,
                "--network", self.release.network.name, "--ip", self.ip,
                "--label", "kv-pods=" + self.release.network.prefix, "--stop-timeout", str(self.grace),
                "--pull=never"]
        for alias in headless_names(self.release.manifests, self.identity.labels):
            args += ["--network-alias", alias]
        env = self.env()
        for name, value in env.items():
            args += ["--env", "%s=%s" % (name, value)]
        args += security_args(spec, container, image_user)
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            assert "subPath" not in mount, "subPath mounts are not emulated"
            read_only = ",ro" if mount.get("readOnly") else ""
            if "emptyDir" in volume:
                size = (volume["emptyDir"] or {}).get("sizeLimit")
                option = ",tmpfs-size=%d" % (quantity(size),) if size else ""
                args += ["--mount", "type=tmpfs,destination=%s,tmpfs-mode=1777%s%s" % (
                    mount["mountPath"], option, read_only)]
            elif any(kind in volume for kind in ("secret", "configMap", "downwardAPI", "projected")):
                files = volume_files(volume, self)
                directory = self.volume_dir / mount["name"]
                if not directory.exists():
                    _write_projection(directory, files, fs_group)
                # These volumes are always read-only in a pod.
                args += ["--volume", "%s:%s:ro" % (directory, mount["mountPath"])]
            else:
                raise NotImplementedError("volume %r" % (volume,))
        limits = (container.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            args += ["--memory", "%d" % (quantity(limits["memory"]),)]
        if "cpu" in limits:
            args += ["--cpus", "%g" % (quantity(limits["cpu"]),)]
        if container.get("workingDir"):
            args += ["--workdir", container["workingDir"]]
        if container.get("command"):
            args += ["--entrypoint", json.dumps(container["command"])]
        args.append(self.image)
        args += [_expand(a, env) for a in container.get("args") or []]
        return args

    # -- lifecycle

    def start(self) -> None:
        self.release.event(self, "start")
        self.podman.run(*self.run_args())
        self._prober = threading.Thread(target=self._supervise, name="prober-" + self.name, daemon=True)
        self._prober.start()

    def _supervise(self) -> None:
        """The kubelet's loop for this pod: probes, liveness restarts, restarts of exited containers."""
        backoff = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            outcome = self._probe_until_trouble(started)
            if outcome is None:
                return
            failed_probe = self.container_spec.get(outcome + "Probe") or {}
            grace = int(failed_probe.get("terminationGracePeriodSeconds", self.grace))
            with self._lock:
                if self._stop.is_set():
                    return
                self.ready, self.ready_since = False, None
                self.restarts += 1
                self.release.event(self, "restart (%s)" % (outcome,))
                if outcome in ("liveness", "startup"):
                    self.podman.run("stop", "--time", str(grace), self.container, check=False, timeout=grace + 30)
            # CrashLoopBackOff: the first restart at once, then 10 s, doubled each time, 5 minutes at most.
            if self._stop.wait(backoff if outcome == "exited" else 0):
                return
            backoff = min(max(backoff * 2, 10.0), 300.0)
            with self._lock:
                if self._stop.is_set():
                    return
                self.podman.run("start", self.container, check=False)

    def _probe_until_trouble(self, started: float) -> Optional[str]:
        def state(kind: str) -> Optional[ProbeState]:
            probe = self.container_spec.get(kind)
            return ProbeState(probe, started + float(probe.get("initialDelaySeconds", 0))) if probe else None

        startup, liveness, readiness = state("startupProbe"), state("livenessProbe"), state("readinessProbe")
        started_up = startup is None
        if readiness is None:
            self.ready, self.ready_since = True, time.monotonic()
        next_state_check = started
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if now >= next_state_check:
                next_state_check = now + 2
                status = self.podman.run("container", "inspect", "--format", "{{.State.Status}}", self.container,
                                         check=False).stdout.strip()
                if status in ("exited", "stopped"):
                    return "exited"
            if not started_up:
                if now >= startup.next_at:
                    startup.record(probe_once(startup.probe, self), now)
                    if startup.succeeded:
                        started_up = True
                        for other in (liveness, readiness):
                            if other is not None:
                                other.next_at = max(other.next_at, now)
                    elif startup.failed:
                        return "startup"
                continue
            if liveness is not None and now >= liveness.next_at:
                liveness.record(probe_once(liveness.probe, self), time.monotonic())
                if liveness.failed:
                    return "liveness"
            if readiness is not None and now >= readiness.next_at:
                readiness.record(probe_once(readiness.probe, self), time.monotonic())
                if readiness.succeeded and not self.ready:
                    self.ready, self.ready_since = True, time.monotonic()
                    self.release.event(self, "ready")
                elif readiness.failed and self.ready:
                    self.ready, self.ready_since = False, None
                    self.release.event(self, "not ready")
        return None

    def delete(self, grace: Optional[int] = None) -> None:
        """
        Delete the pod as the API server and kubelet do: out of the endpoints first, then SIGTERM and, after
        the grace period, SIGKILL.
        """
        self.terminating = True
        self.release.event(self, "terminating")
        with self._lock:
            self._stop.set()
        seconds = self.grace if grace is None else grace
        self.podman.run("stop", "--time", str(seconds), self.container, check=False, timeout=seconds + 60)
        self.release.event(self, "stopped")
        # Kept for the test's report: the container and its logs are gone once removed.
        self.final_logs = self.logs()
        self.podman.run("rm", "--force", "--time", "0", self.container, check=False)
        if self._prober is not None:
            self._prober.join(10)

    def kill(self) -> None:
        """SIGKILL the container, as a crash would; the kubelet then restarts it."""
        self.release.event(self, "killed")
        self.podman.run("kill", "--signal", "KILL", self.container)

    @property
    def available(self) -> bool:
        min_ready = int(self.release.deployment["spec"].get("minReadySeconds", 0))
        return (self.ready and not self.terminating and self.ready_since is not None
                and time.monotonic() - self.ready_since >= min_ready)

    def logs(self) -> str:
        return self.podman.run("logs", self.container, check=False).stdout


# --------------------------------------------------------------------------
# The network and the Deployment


@dataclass
class Network:
    """One podman bridge network (the cluster's pod network, for one test)."""

    podman: Podman = field(repr=False)
    prefix: str
    name: str = ""
    gateway: str = ""
    _hosts: List[str] = field(default_factory=list, repr=False)

    def create(self) -> "Network":
        self.name = self.prefix + "-net"
        # Internal: no default route, no masquerading, and the network's DNS answers only its own names; this
        # machine still reaches the pods through the bridge (probes, clients), and nothing goes beyond it.
        self.podman.run("network", "create", "--internal", "--label", "kv-pods=" + self.prefix,
                        "--label", "kv-pods-run=" + self.podman.prefix, self.name)
        subnet = self.podman.inspect("network", self.name)["subnets"][0]
        self.gateway = subnet["gateway"]
        base, bits = subnet["subnet"].split("/")
        first = [int(x) for x in base.split(".")]
        count = 2 ** (32 - int(bits))
        number = (first[0] << 24) | (first[1] << 16) | (first[2] << 8) | first[3]
        self._hosts = [".".join(str((n >> s) & 255) for s in (24, 16, 8, 0))
                       for n in range(number + 10, number + min(count - 1, 250))]
        return self

    def allocate_ip(self) -> str:
        return self._hosts.pop(0)

    def remove(self) -> None:
        for container in self.podman.output("ps", "--all", "--quiet", "--filter", "network=" + self.name).split():
            self.podman.run("rm", "--force", "--time", "0", container, check=False)
        self.podman.run("network", "rm", "--force", self.name, check=False)


def _template_hash(template: dict) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


class Release:
    """
    One Helm release's Deployment run on a network: its pods, its endpoints, its rollouts.

    :param secrets: Secrets the release expects to exist already (``existingSecret``), by name.
    """

    def __init__(self, podman: Podman, network: Network, manifests: Manifests, workdir: Path,
                 secrets: Optional[Dict[str, Dict[str, bytes]]] = None) -> None:
        self.podman = podman
        self.network = network
        self.manifests = manifests
        self.deployment = manifests.one("Deployment")
        self.workdir = workdir
        # The Secrets as the API server holds them once applied.
        self.secrets = dict(secrets or {})
        self._apply_secrets(manifests)
        self.pods: List[Pod] = []
        self.events: List[PodEvent] = []
        self._deleting: List[threading.Thread] = []
        self._created = time.monotonic()

    def _apply_secrets(self, manifests: Manifests) -> None:
        """
        Keep the Secrets already applied: ``helm template`` cannot run the chart's ``lookup``, which on a real
        ``helm upgrade`` renders the existing Secret's value again instead of a new random one.
        """
        for secret in manifests.all("Secret"):
            name = secret["metadata"]["name"]
            if name not in self.secrets:
                self.secrets[name] = _secret_data(manifests, name, {})

    def event(self, pod: Pod, what: str) -> None:
        self.events.append(PodEvent(self.clock(), pod.name, what))

    def clock(self) -> float:
        """Seconds since the release was created, for its timeline."""
        return round(time.monotonic() - self._created, 2)

    def timeline(self) -> List[Tuple[float, str, str]]:
        return [(e.at, e.pod, e.what) for e in self.events]

    @property
    def tenant_path(self) -> str:
        """The first path segment of the readiness probe (``/<tenant>``), which is where the API lives."""
        path = self.deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
        return "/" + path.strip("/").split("/")[0]

    def new_pod(self) -> Pod:
        template = self.deployment["spec"]["template"]
        suffix = "".join(_random.choice(string.ascii_lowercase + string.digits) for _ in range(5))
        name = "%s-%s-%s" % (self.deployment["metadata"]["name"], _template_hash(template), suffix)
        pod = Pod(self, template, template["spec"]["containers"][0]["image"], self.network.allocate_ip(), name)
        self.pods.append(pod)
        pod.start()
        return pod

    def endpoints(self) -> List[Pod]:
        """The pods the Service sends traffic to: ready and not terminating."""
        return [p for p in self.pods if p.ready and not p.terminating]

    def deploy(self, timeout: float = 180) -> List[Pod]:
        """Create the Deployment: every replica at once, then wait until each is ready."""
        pods = [self.new_pod() for _ in range(desired_replicas(self.manifests))]
        self.wait(lambda: all(p.available for p in pods), timeout, "every pod ready")
        return pods

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %s; events: %s\n%s" % (
                    what, self.timeline()[-30:], self.recent_logs()))
            time.sleep(0.2)

    def recent_logs(self) -> str:
        return "\n".join("--- %s\n%s" % (p.name, p.logs()[-1500:]) for p in self.pods if not p.terminating)

    def delete_pod(self, pod: Pod, wait: bool = True) -> None:
        thread = threading.Thread(target=pod.delete, name="delete-" + pod.name, daemon=True)
        thread.start()
        self._deleting.append(thread)
        if wait:
            thread.join()

    def roll_to(self, manifests: Manifests, timeout: float = 600) -> None:
        """
        Roll the Deployment to a new revision as its controller would: with RollingUpdate, start new pods up
        to replicas + maxSurge, delete an old pod only while replicas - maxUnavailable stay available; with
        Recreate, delete every old pod, then start the new ones.
        """
        self.manifests, self.deployment = manifests, manifests.one("Deployment")
        self._apply_secrets(manifests)
        replicas = desired_replicas(manifests)
        strategy = self.deployment["spec"].get("strategy") or {"type": "RollingUpdate"}
        old = [p for p in self.pods if not p.terminating]
        new: List[Pod] = []
        if strategy.get("type") == "Recreate":
            for pod in old:
                self.delete_pod(pod, wait=False)
            for thread in self._deleting:
                thread.join()
            new = [self.new_pod() for _ in range(replicas)]
            self.wait(lambda: all(p.available for p in new), timeout, "the new pods ready")
            return
        surge, unavailable = self.rolling_bounds()
        assert surge or unavailable, "maxSurge and maxUnavailable cannot both be 0"
        deadline = time.monotonic() + timeout
        while old or len(new) < replicas:
            assert time.monotonic() < deadline, "rollout timed out: %s" % (self.events[-20:],)
            progressed = False
            while len(old) + len(new) < replicas + surge and len(new) < replicas:
                new.append(self.new_pod())
                progressed = True
            available = sum(p.available for p in old + new)
            while old and available - (1 if old[0].available else 0) >= replicas - unavailable:
                victim = old.pop(0)
                available -= 1 if victim.available else 0
                self.delete_pod(victim, wait=False)
                progressed = True
            if not progressed:
                time.sleep(0.2)
        self.wait(lambda: all(p.available for p in new), timeout, "the new pods ready")
        for thread in self._deleting:
            thread.join()

    def rolling_bounds(self) -> Tuple[int, int]:
        """maxSurge and maxUnavailable of the Deployment's RollingUpdate strategy, in pods."""
        replicas = desired_replicas(self.manifests)
        rolling = (self.deployment["spec"].get("strategy") or {}).get("rollingUpdate") or {}
        return (_scaled(rolling.get("maxSurge", "25%"), replicas, math.ceil),
                _scaled(rolling.get("maxUnavailable", "25%"), replicas, math.floor))

    def teardown(self) -> None:
        for pod in self.pods:
            pod._stop.set()
        for pod in self.pods:
            self.podman.run("rm", "--force", "--time", "0", pod.container, check=False)
        for thread in self._deleting:
            thread.join(30)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _scaled(value, replicas: int, rounding) -> int:
    if isinstance(value, str) and value.endswith("%"):
        return int(rounding(replicas * int(value[:-1]) / 100.0))
    return int(value)
