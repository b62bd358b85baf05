import importlib
import os
import pkgutil
import shutil
import tempfile

import pytest

import kvresponder


def _import_every_project_module() -> None:
    """
    Hypothesis draws some of its examples from the literals of the project's modules imported so far (its
    "local constants"), so a property test's examples depended on which modules the tests before it had
    imported lazily (``kvresponder.tap``, for one): the same test could pass alone and fail after others.
    Importing every module before the first test fixes that pool for the whole run.
    """
    for module in pkgutil.walk_packages(kvresponder.__path__, "kvresponder."):
        importlib.import_module(module.name)
    importlib.import_module("twisted.plugins.kvresponder_plugin")


_import_every_project_module()


def require_tool(name: str) -> str:
    """
    The path of a tool the test needs. Locally a missing tool skips the test; in CI (CI=true), where
    .ci/run installs every tool, it fails it, so that a broken install cannot pass as a skip.
    """
    path = shutil.which(name)
    if path is None:
        message = "%s is not installed (bash .ci/run installs it)" % (name,)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def eliot_logger():
    """
    Eliot's messages, in memory, for the test's length: what the code under test logs, validated against its types.
    """
    from eliot import MemoryLogger
    from eliot.testing import swap_logger

    memory = MemoryLogger()
    previous = swap_logger(memory)
    try:
        yield memory
    finally:
        swap_logger(previous)


@pytest.fixture
def log_dir():
    path = tempfile.mkdtemp(prefix="kvtest-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """The pod suite's measurements (image size, build time), when it ran."""
    from .containers import REPORT

    for name, value in REPORT.items():
        terminalreporter.write_line("pods: %s: %s" % (name, value))
