"""
The project's standing promises about how it is installed, run and checked.
"""

import os
import subprocess
import sys

from .harness import REPO


def _read(*path):
    with open(os.path.join(REPO, *path), encoding="utf-8") as source:
        return source.read()


def test_ci_runs_the_readmes_test_command():
    """
    If the README names a test command, then .ci/run runs exactly that command.
    """
    readme = _read("README.md")
    ci = _read(".ci", "run")
    command = "python3 -m pip install -q '.[test]' && python3 -m pytest"
    assert command in readme.split("## ")[0], "the README does not open with the test command"
    assert command in ci.splitlines()


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
    If any module used syntax newer than Python 3.11 (the oldest supported: CPython 3.11 and PyPy for 3.11),
    then parsing it as 3.11 fails.
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
