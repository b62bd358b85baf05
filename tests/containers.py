"""
Podman for the pod suite: its configuration, stand-ins for the official base images, and image builds.

There is no image registry here, so each base image the Dockerfile names (``FROM ${PYTHON_IMAGE}`` with its
default, or a ``--build-arg``) is made from Debian's archive with ``mmdebstrap`` and loaded with
``podman import``. The root filesystem tarball is cached in ``/var/tmp/kv-rootfs-cache``, keyed by a hash of
its recipe, so a run pays mmdebstrap once per base image and later runs not at all.

Everything the suite creates lives in a storage root of its own (removed at the end of the session), so a
run never touches the images or containers of anyone else on the machine; networks, which podman keeps in
one shared directory, carry the run's unique prefix and are removed by the fixtures that create them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOTFS_CACHE = Path(os.environ.get("KV_ROOTFS_CACHE", "/var/tmp/kv-rootfs-cache"))
DEBIAN_MIRROR = os.environ.get("KV_DEBIAN_MIRROR", "http://deb.debian.org/debian")

#: What the pod suite measured (the image's size, its build time), printed in pytest's terminal summary.
REPORT: Dict[str, str] = {}

#: This sandbox's needs (issue 17): crun refuses the host's cgroup layout, systemd is not running, there is
#: no journald, and the default rlimits are refused. netavark + aardvark-dns give the network DNS names, which
#: the headless Service's aliases need.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "netavark"
"""

STORAGE_CONF = """\
[storage]
driver = "{driver}"
graphroot = "{graphroot}"
runroot = "{runroot}"
"""

#: pip's configuration and CA certificates, mounted read-only into builds so pip inside them reaches PyPI
#: the way this machine's pip does (``pip config list -v`` names the files).
PIP_HOST_FILES = ("/etc/pip.conf", "/etc/xdg/pip", "/etc/ssl/certs")


@dataclass(frozen=True)
class BaseRecipe:
    """
    How to make a stand-in for an official interpreter image from Debian: the suite, the packages, and the
    venv that puts the interpreter first on ``PATH`` as the official image does.
    """

    suite: str
    packages: Tuple[str, ...]
    interpreter: str
    venv: str
    #: The interpreter's Python version, for which pip picks the pip, setuptools and wheel releases.
    python_version: str

    def key(self, wheels: Sequence[str]) -> str:
        text = json.dumps([self.suite, self.packages, self.interpreter, self.venv, sorted(wheels), 2])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: The official images the Dockerfile may start from, and their stand-ins. Debian 13's PyPy is 7.3.19 for
#: Python 3.11; Debian 13's CPython is 3.13, close enough to stand in
#: for python:3.11-slim (the Dockerfile only needs ``python3 -m pip``).
BASE_RECIPES: Dict[str, BaseRecipe] = {
    "pypy:3.11-slim": BaseRecipe("trixie", ("pypy3", "pypy3-venv", "ca-certificates"), "pypy3", "/opt/pypy",
                                 "3.11"),
    "python:3.11-slim": BaseRecipe("trixie", ("python3", "python3-venv", "ca-certificates"), "python3",
                                   "/opt/python", "3.13"),
    "python:3.13-slim": BaseRecipe("trixie", ("python3", "python3-venv", "ca-certificates"), "python3",
                                   "/opt/python", "3.13"),
}


def canonical_image(name: str) -> str:
    """``docker.io/library/pypy:3.11-slim`` and ``pypy:3.11-slim`` are one image."""
    for prefix in ("docker.io/library/", "docker.io/", "library/", "localhost/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def dockerfile_base_images(dockerfile: Path, build_args: Optional[Dict[str, str]] = None) -> List[str]:
    """
    The external images a Dockerfile starts from: every ``FROM`` that is not an earlier stage, with
    ``ARG`` defaults (or ``build_args``) substituted, as the builder resolves them.
    """
    args: Dict[str, str] = {}
    stages = set()
    images: List[str] = []
    for line in _logical_lines(dockerfile.read_text()):
        words = line.split()
        if not words:
            continue
        instruction = words[0].upper()
        if instruction == "ARG" and len(words) > 1:
            name, _, default = words[1].partition("=")
            args[name] = (build_args or {}).get(name, default.strip("\"'"))
        elif instruction == "FROM":
            rest = [w for w in words[1:] if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), rest[0])
            if len(rest) >= 3 and rest[1].upper() == "AS":
                stages.add(rest[2])
            if image not in stages and image != "scratch" and image not in images:
                images.append(image)
    return images


def _logical_lines(text: str) -> List[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


@dataclass
class Podman:
    """
    The podman CLI with the suite's configuration (``CONTAINERS_CONF`` and ``CONTAINERS_STORAGE_CONF``
    point at files written by :func:`configure`).
    """

    env: Dict[str, str] = field(repr=False)
    prefix: str
    workdir: Path
    created_images: List[str] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, timeout: float = 120, input: Optional[str] = None
            ) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise RuntimeError("podman %s failed (%d):\n%s%s" % (
                " ".join(args), result.returncode, result.stdout[-2000:], result.stderr[-4000:]))
        return result

    def output(self, *args: str, timeout: float = 120) -> str:
        return self.run(*args, timeout=timeout).stdout.strip()

    def inspect(self, kind: str, name: str) -> dict:
        return json.loads(self.output(kind, "inspect", name))[0]

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def tag(self, image: str, *names: str) -> None:
        self.run("tag", image, *names)
        self.created_images.extend(names)

    def ensure_base_image(self, name: str) -> str:
        """
        Load a stand-in for the official image ``name`` into the suite's storage, from the cached root
        filesystem tarball (made by mmdebstrap the first time).
        """
        wanted = canonical_image(name)
        if self.image_exists("localhost/" + wanted):
            return "localhost/" + wanted
        recipe = BASE_RECIPES.get(wanted)
        if recipe is None:
            raise RuntimeError("no stand-in recipe for base image %r (known: %s)" % (name, sorted(BASE_RECIPES)))
        tarball = rootfs_tarball(recipe, self.workdir)
        path = "PATH=%s/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" % (recipe.venv,)
        self.run("import", "--change", "ENV " + path, "--change", "ENV LANG=C.UTF-8",
                 "--change", 'CMD ["%s"]' % (recipe.interpreter,), str(tarball), "localhost/" + wanted,
                 timeout=600)
        self.created_images.append("localhost/" + wanted)
        # FROM pypy:3.11-slim resolves to docker.io/library/... first; give it that name too, so the build
        # never tries a registry.
        self.tag("localhost/" + wanted, "docker.io/library/" + wanted)
        return "localhost/" + wanted

    def build(self, context: Path, tag: str, build_args: Optional[Dict[str, str]] = None,
              timeout: float = 900) -> str:
        """
        Build ``context``'s Dockerfile, unchanged, from the stand-in base images. ``--no-cache`` because
        buildah 1.28 loses ``RUN --mount=type=bind,from=<stage>`` when the stage comes from cache.
        """
        for image in dockerfile_base_images(context / "Dockerfile", build_args):
            self.ensure_base_image(image)
        command = ["build", "--no-cache", "--pull=never", "--network", "host", "--tag", tag]
        for path in PIP_HOST_FILES:
            if os.path.exists(path):
                command += ["--volume", "%s:%s:ro" % (path, path)]
        for name, value in (build_args or {}).items():
            command += ["--build-arg", "%s=%s" % (name, value)]
        self.run(*command, str(context), timeout=timeout)
        self.created_images.append(tag)
        return tag

    def remove_created(self) -> None:
        for image in reversed(self.created_images):
            self.run("rmi", "--force", image, check=False)
        self.created_images.clear()


def configure(prefix: str, root: Path) -> Podman:
    """
    Write the suite's containers.conf and storage.conf under ``root`` and return a :class:`Podman` that uses
    them. The storage driver is overlay when the kernel mounts it here, vfs otherwise.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "containers.conf").write_text(CONTAINERS_CONF)
    runroot = Path("/run") / (prefix + "-run")
    env = dict(os.environ)
    env.update(CONTAINERS_CONF=str(root / "containers.conf"), CONTAINERS_STORAGE_CONF=str(root / "storage.conf"))
    for driver in (os.environ.get("KV_PODS_STORAGE_DRIVER", "overlay"), "vfs"):
        (root / "storage.conf").write_text(STORAGE_CONF.format(
            driver=driver, graphroot=root / ("storage-" + driver), runroot=runroot))
        podman = Podman(env=env, prefix=prefix, workdir=root)
        if podman.run("info", "--format", "{{.Store.GraphDriverName}}", check=False).returncode == 0:
            return podman
    raise RuntimeError("podman cannot start with overlay or vfs storage:\n" +
                       podman.run("info", check=False).stderr[-3000:])


def teardown(podman: Podman) -> None:
    """
    Remove everything the run created: its networks, then its containers and images, then its storage. Not
    ``podman system reset``: that also removes every network in podman's shared configuration directory,
    those of runs going on beside this one included.
    """
    networks = podman.run("network", "ls", "--quiet", "--filter", "label=kv-pods-run=" + podman.prefix, check=False)
    for network in networks.stdout.split():
        podman.run("network", "rm", "--force", network, check=False)
    podman.run("rm", "--all", "--force", "--time", "0", check=False, timeout=300)
    podman.remove_created()
    podman.run("rmi", "--all", "--force", check=False, timeout=300)
    roots = (str(podman.workdir) + "/", "/run/%s-run/" % (podman.prefix,))
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = [line.split()[4] for line in mountinfo]
    # Deepest first: the storage's own private bind mount holds the layers' mounts.
    for mount in sorted((m for m in mounts if (m + "/").startswith(roots)), key=len, reverse=True):
        subprocess.run(["umount", mount], capture_output=True)
    shutil.rmtree(podman.workdir, ignore_errors=True)
    shutil.rmtree("/run/%s-run" % (podman.prefix,), ignore_errors=True)


def rootfs_tarball(recipe: BaseRecipe, workdir: Path) -> Path:
    """
    The root filesystem of ``recipe`` as a tarball, made with mmdebstrap once and cached. A lock file keeps
    two concurrent runs from bootstrapping the same recipe twice.
    """
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    wheels_dir = Path(tempfile.mkdtemp(prefix="wheels-", dir=workdir))
    try:
        # pip, setuptools and wheel as the official images carry them (Debian 12's pip 23.0 alone cannot
        # build a wheel of a setup.py project); downloaded by this machine's pip, installed offline.
        subprocess.run(["python3", "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                        "--python-version", recipe.python_version, "--dest", str(wheels_dir),
                        "pip", "setuptools", "wheel"],
                       check=True, capture_output=True, timeout=300)
        wheels = sorted(p.name for p in wheels_dir.glob("*.whl"))
        tarball = ROOTFS_CACHE / ("%s-%s-%s.tar" % (recipe.suite, recipe.interpreter, recipe.key(wheels)))
        with open(str(tarball) + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not tarball.exists():
                _mmdebstrap(recipe, wheels_dir, wheels, tarball)
        return tarball
    finally:
        shutil.rmtree(wheels_dir, ignore_errors=True)


def _mmdebstrap(recipe: BaseRecipe, wheels_dir: Path, wheels: List[str], tarball: Path) -> None:
    pip_wheel = next(w for w in wheels if w.startswith("pip-"))
    clean_env = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin"
    hooks = [
        'mkdir -p "$1/tmp/wheels"',
        "copy-in %s /tmp/wheels" % (" ".join(str(wheels_dir / w) for w in wheels),),
        'chroot "$1" %s %s -m venv --without-pip %s' % (clean_env, recipe.interpreter, recipe.venv),
        # A pip wheel runs from itself: python pip-X.whl/pip install ...
        "chroot \"$1\" %s sh -c '%s/bin/%s /tmp/wheels/%s/pip install --no-index --no-cache-dir /tmp/wheels/*.whl'"
        % (clean_env, recipe.venv, recipe.interpreter, pip_wheel),
        'rm -rf "$1/tmp/wheels" "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
    ]
    partial = Path(str(tarball) + ".partial")
    command = ["mmdebstrap", "--mode=root", "--variant=minbase", "--include=" + ",".join(recipe.packages),
               "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
               "--dpkgopt=path-exclude=/usr/share/locale/*", "--format=tar"]
    command += ["--customize-hook=" + hook for hook in hooks]
    command += [recipe.suite, str(partial), DEBIAN_MIRROR]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError("mmdebstrap failed:\n" + result.stderr[-4000:])
    partial.rename(tarball)
