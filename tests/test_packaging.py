"""
The project's standing promises about how it is installed, run and checked.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from configparser import ConfigParser

import pytest

from .harness import REPO


def _read(*path):
    with open(os.path.join(REPO, *path), encoding="utf-8") as source:
        return source.read()


def test_ci_runs_the_readmes_test_command():
    """
    If the README names a test command, then .ci/run runs exactly that command, and exits if any part of it
    fails (``set -e`` alone would go on past a failed install, the first command of an ``&&`` list).
    """
    readme = _read("README.md")
    ci = _read(".ci", "run")
    command = "python3 -m pip install -q -c requirements/test.txt '.[test]' && python3 -m pytest"
    assert command in readme.split("## ")[0], "the README does not open with the test command"
    assert command + " || exit 1" in ci.splitlines()


def test_the_plugin_directory_has_no_init():
    """
    If twisted/plugins had an __init__.py, then it would shadow Twisted's own plugin package.
    """
    assert os.path.exists(os.path.join(REPO, "twisted", "plugins", "kvresponder_plugin.py"))
    assert not os.path.exists(os.path.join(REPO, "twisted", "plugins", "__init__.py"))


def test_twistd_lists_the_plugin_without_importing_the_server():
    """
    If twistd lists its plugins, then kvresponder is among them, and listing does not import the server.
    """
    code = ("import sys; from twisted.plugin import getPlugins; from twisted.application.service import "
            "IServiceMaker; names = [p.tapname for p in getPlugins(IServiceMaker)]; "
            "print('kvresponder' in names, 'kvresponder.tap' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=REPO, timeout=120)
    assert result.stdout.split() == [b"True", b"False"], result.stderr


def test_sources_stay_python_3_11_syntax():
    """
    If any module used syntax newer than Python 3.11 (the oldest supported, and PyPy's), then parsing it as 3.11
    fails.
    """
    import ast
    failures = []
    for top in ("kvresponder", "tests", "bench", "twisted"):
        for directory, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    try:
                        ast.parse(_read(path), filename=path, feature_version=(3, 11))
                    except SyntaxError as error:
                        failures.append("%s: %s" % (path, error))
    assert failures == []


def _pins(path):
    """
    The ``name==version`` pins of a requirements file, by normalized name, with each one's hash count.
    """
    pins = {}
    for block in re.split(r"\n(?=\S)", _read(path)):
        match = re.match(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)==(\S+)", block)
        if match:
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            pins[name] = (match.group(2), block.count("--hash=sha256:"))
    return pins


def _install_requires():
    config = ConfigParser()
    config.read_string(_read("setup.cfg"))
    names = []
    for line in config["options"]["install_requires"].splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][-A-Za-z0-9_.]*", line).group(0)).lower())
    return names


LOCKS = ("cpython311", "cpython312", "cpython313", "cpython314", "pypy311")


@pytest.mark.parametrize("lock", LOCKS)
def test_each_interpreters_lock_pins_every_dependency_with_hashes_at_the_test_locks_versions(lock):
    """
    If a dependency were added to setup.cfg without a refresh of the locks, or a lock disagreed with the test
    constraints, then the image would not run the versions the tests ran: every lock pins every direct
    dependency, each pin with at least one hash, at the version of requirements/test.txt.
    """
    pins = _pins(os.path.join("requirements", lock + ".txt"))
    tested = _pins(os.path.join("requirements", "test.txt"))
    assert set(_install_requires()) <= set(pins)
    assert all(hashes > 0 for _, hashes in pins.values())
    assert {name: version for name, (version, _) in pins.items()} == {
        name: tested[name][0] for name in pins}


def test_the_pypy_lock_takes_cffi_from_pypy_and_no_capped_cryptography():
    """
    If the PyPy lock pinned cffi (PyPy's own, built in) or a cryptography without PyPy 3.11 wheels (before 44),
    then the PyPy image would need a compiler or a Rust toolchain.
    """
    pypy = _pins(os.path.join("requirements", "pypy311.txt"))
    cpython = _pins(os.path.join("requirements", "cpython311.txt"))
    assert "cffi" not in pypy and "cffi" in cpython
    assert int(pypy["cryptography"][0].split(".")[0]) >= 44
    assert "cryptography" not in _read("setup.cfg")


def test_the_image_installs_from_its_interpreters_lock_with_hashes():
    """
    If the Dockerfile resolved dependencies itself, then two builds could run different versions: it names the
    lock of its interpreter and checks hashes, and it defaults to PyPy for Python 3.11.
    """
    dockerfile = _read("Dockerfile")
    assert re.search(r"^ARG PYTHON_IMAGE=pypy:3\.11-slim$", dockerfile, re.M)
    assert "--require-hashes" in dockerfile and 'requirements/$(' in dockerfile
    assert "--no-index" in dockerfile
    assert "ensurepip" in dockerfile


def test_the_image_builds_the_projects_wheel_with_the_hash_checked_build_system():
    """
    If the image built wheels from source (the project's own; zope.interface's and markupsafe's on PyPy) in pip's
    build isolation, then pip would fetch setuptools and wheel unpinned and unchecked: the one step of the build
    that took files by name alone. requirements/build.txt pins every requirement of pyproject.toml's build
    system (and what they need), each with hashes and within its specifier, and the Dockerfile installs it with
    --require-hashes and builds every wheel without build isolation.
    """
    import tomllib

    from packaging.requirements import Requirement

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as source:
        requires = [Requirement(line) for line in tomllib.load(source)["build-system"]["requires"]]
    pins = _pins(os.path.join("requirements", "build.txt"))
    assert {re.sub(r"[-_.]+", "-", requirement.name).lower() for requirement in requires} <= set(pins)
    assert all(hashes > 0 for _, hashes in pins.values())
    for requirement in requires:
        version, hashes = pins[re.sub(r"[-_.]+", "-", requirement.name).lower()]
        assert hashes > 0 and requirement.specifier.contains(version), (requirement, version)
    dockerfile = _read("Dockerfile")
    assert re.search(r"pip install [^\n]*--require-hashes[^&]*-r requirements/build\.txt", dockerfile)
    # Each build without isolation checks that the build system installed meets what the package asks for.
    assert re.search(r"--no-deps --no-build-isolation --check-build-dependencies", dockerfile)
    assert re.search(r"--require-hashes --no-build-isolation --check-build-dependencies\s*\\\s*--wheel-dir /wheels "
                     r"-r \"\$LOCK\"", dockerfile)


def _bare_venv(path):
    """
    The python of a venv holding only pip and setuptools: made by Debian's own python3 (pip 23.0, from
    python3-venv) where it can, else by the running interpreter; ``None`` where neither can make one (an
    interpreter without ensurepip).
    """
    for python in ("/usr/bin/python3", sys.executable):
        if os.path.exists(python) and subprocess.run([python, "-m", "venv", "--clear", str(path)],
                                                     capture_output=True, timeout=120).returncode == 0:
            return str(path / "bin" / "python")
    return None


def test_pip_builds_the_wheel_in_a_bare_venv(tmp_path):
    """
    If the project had no pyproject.toml build system, then pip 23.0 (Debian 12's) took the legacy
    ``setup.py bdist_wheel`` path and failed without ``wheel`` installed. In a venv holding only pip and
    setuptools, ``pip wheel .`` builds the wheel, with the plugin and the Python 3.11 floor.
    """
    python = _bare_venv(tmp_path / "venv")
    if python is None:
        # Still the pyproject.toml path (pip builds in an isolated environment), with this environment's pip.
        python = sys.executable
    else:
        installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                                   text=True, check=True, timeout=60).stdout
        assert "wheel==" not in installed
    work = tmp_path / "src"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "__pycache__", ".hypothesis", "kvresponder-logs", "bench", "docs"))
    result = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), "."],
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("kvresponder-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "twisted/plugins/kvresponder_plugin.py" in names
    assert "kvresponder/http/openapi.json" in names
    assert "Requires-Python: >=3.11" in metadata
    assert re.search(r"^Requires-Dist: eliot-tree", metadata, re.M)
    assert re.search(r"^Requires-Dist: twisted<27", metadata, re.M)
