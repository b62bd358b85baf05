"""
How the package is wired: what the style guide asks of every module, checked over the source.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvresponder"


def _imports_the_global_reactor(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
            if any(alias.name == "reactor" for alias in node.names):
                return True
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet.reactor":
            return True
        if isinstance(node, ast.Import) and any(alias.name == "twisted.internet.reactor" for alias in node.names):
            return True
    return False


def test_if_a_module_below_the_tap_imports_the_global_reactor_then_this_fails():
    """
    If any module of the package but ``tap.py`` imports the global reactor, then this fails: every class gets
    its reactor or clock as an argument, so that tests drive it with a Clock.
    """
    found = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if _imports_the_global_reactor(ast.parse(path.read_text(), str(path))))
    assert found == ["tap.py"]


def test_the_reactor_check_sees_each_form_of_the_import():
    """
    If a module imports the reactor in any of its three forms, then the check above sees it.
    """
    for source in ("from twisted.internet import reactor", "from twisted.internet import task, reactor as r",
                   "import twisted.internet.reactor", "def f():\n    from twisted.internet import reactor\n"):
        assert _imports_the_global_reactor(ast.parse(source))
    assert not _imports_the_global_reactor(ast.parse("from twisted.internet import task"))
