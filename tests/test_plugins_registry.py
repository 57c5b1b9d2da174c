"""Service types and model loaders are plugins found in pie.plugins (issue 6, point 1)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile

from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs
from twisted.plugin import IPlugin
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pie.interfaces import IRemoteServiceType, PieError
from pie.plugins import pie_l4m
from pie.service import servicetypes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pie-echo-plugin")

PROBE = """
import json
from pie.service.servicetypes import attach_remote_service, model_loaders, service_types
out = []
attach_remote_service(None, "ws://10.0.0.1:1", "echo", "svc").addBoth(out.append)
print(json.dumps([sorted(service_types()), sorted(model_loaders()), str(out[0])]))
"""


@implementer(IPlugin, IRemoteServiceType)
class _Broken:
    """Claims IRemoteServiceType but lacks `attach` and `description`."""

    typeName = "broken"


class BuiltinTypeTests(unittest.TestCase):
    def test_l4m_is_found_and_provides_the_interface(self):
        """The built-in l4m type is discovered with getPlugins and really provides the interface."""
        types = servicetypes.service_types()
        self.assertIs(types["l4m"], pie_l4m.l4m)
        self.assertTrue(verifyObject(IRemoteServiceType, types["l4m"]))

    def test_unknown_type_fails_clearly(self):
        """An unknown service_type errbacks with a PieError naming it and the installed types."""
        failure = self.failureResultOf(
            servicetypes.attach_remote_service(None, "ws://x:1", "grpc", "s"), PieError
        )
        self.assertIn("Unknown service type: 'grpc'", str(failure.value))
        self.assertIn("l4m", str(failure.value))

    def test_broken_plugin_is_left_out(self):
        """A plugin that does not satisfy the interface is ignored (and logged); l4m survives."""
        self.patch(servicetypes, "getPlugins", lambda iface, pkg: [_Broken(), pie_l4m.l4m])
        with capturedLogs() as events:
            self.assertEqual(list(servicetypes.service_types()), ["l4m"])
        self.assertEqual([e["module"] for e in events], [__name__])


class ThirdPartyPackageTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="pie-plugin-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    async def _pip_install(self, target: str) -> None:
        if importlib.util.find_spec("setuptools") is None:  # Python >= 3.12 venvs lack it
            raise unittest.SkipTest("building the fixture needs setuptools in this venv")
        source = os.path.join(self.tmp, "src")
        shutil.copytree(FIXTURE, source)  # the build writes into its source tree
        args = ["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, args + ["--target", target, source], env=dict(os.environ)
        )
        self.assertEqual(code, 0, err.decode())
        self.assertFalse(os.path.exists(os.path.join(target, "pie", "__init__.py")))

    async def _probe(self, *paths: str) -> list:
        """[service types, model loaders, result of attaching type 'echo'] in a fresh interpreter."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join((ROOT,) + paths))
        out, err, code = await getProcessOutputAndValue(sys.executable, ["-c", PROBE], env=env)
        self.assertEqual(code, 0, err.decode())
        return json.loads(out)

    async def test_installed_distribution_adds_a_service_type_and_a_loader(self):
        """A pip-installed package shipping only pie/plugins/pie_echo.py adds type and loader;
        the same probe without it on the path knows neither."""
        target = os.path.join(self.tmp, "site")
        await self._pip_install(target)
        types, loaders, attached = await self._probe(target)
        self.assertEqual(types, ["echo", "l4m"])
        self.assertIn("echo", loaders)
        self.assertEqual(attached, "echo attached ws://10.0.0.1:1 as svc")

        types, loaders, attached = await self._probe()
        self.assertEqual(types, ["l4m"])
        self.assertNotIn("echo", loaders)
        self.assertIn("Unknown service type: 'echo' (installed: l4m)", attached)
