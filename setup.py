"""
Packaging. The Twisted plugin lives in ``twisted/plugins/`` (with no ``__init__.py``, as Twisted requires),
and is installed by listing ``twisted.plugins`` as a package, so ``twistd --help`` lists ``kvresponder``
after a plain ``pip install .``. The plugin cache is refreshed after install when possible.
"""

from setuptools import setup
from setuptools.command.install import install


class InstallAndRefreshPlugins(install):
    def run(self):
        install.run(self)
        try:
            from twisted.plugin import IPlugin, getPlugins
            list(getPlugins(IPlugin))
        except Exception:
            # A read-only site-packages or Twisted not yet importable: twistd builds the cache on first use.
            pass


setup(
    packages=["kvresponder", "kvresponder.http", "kvresponder.log", "twisted.plugins"],
    package_data={"twisted": ["plugins/kvresponder_plugin.py"], "kvresponder": ["http/openapi.json"]},
    cmdclass={"install": InstallAndRefreshPlugins},
)
