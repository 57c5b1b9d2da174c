"""The layers meet only at their seams (docs/architecture.md): checked on the real import graph.

Each probe runs in a fresh interpreter, so what one test imported cannot hide
what another module pulls in.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from twisted.trial import unittest

import pie

PROBE = """
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
{extra}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {watched!r})))
"""


def modules_of(package: str) -> list[str]:
    """Every module under pie/<package>, found on disk (a new file is checked without a list)."""
    root = pie.__path__[0] + "/" + package
    return [f"pie.{package}"] + [
        f"pie.{package}.{info.name}"
        for info in pkgutil.walk_packages([root], prefix="")
        if not info.name.endswith("__main__")
    ]


SHARED = ["pie.interfaces", "pie.namespaces"]


def top_level_modules() -> list[str]:
    """The modules directly in pie/ (not packages), found on disk, but the shared ones."""
    found = [
        f"pie.{info.name}"
        for info in pkgutil.iter_modules(pie.__path__)
        if not info.ispkg and f"pie.{info.name}" not in SHARED
    ]
    assert "pie.metrics" in found, found
    return found


def imported(modules: list[str], watched: tuple[str, ...], extra: str = "") -> set[str]:
    code = PROBE.format(modules=modules, watched=watched, extra=extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


class LayerTests(unittest.TestCase):
    def test_engine_imports_no_twisted(self):
        """Everything under pie/engine imports without Twisted, autobahn or txaio."""
        found = imported(modules_of("engine"), ("twisted", "autobahn", "txaio"))
        self.assertEqual(found, set())

    def test_service_imports_no_torch(self):
        """Everything under pie/service (and the remote wire and client) imports without torch."""
        modules = modules_of("service") + ["pie.remote.wire", "pie.remote.client"]
        self.assertEqual(imported(modules, ("torch",)), set())

    def test_modules_both_sides_import_neither_twisted_nor_torch(self):
        """pie/interfaces.py and pie/namespaces.py are imported by engine and service alike."""
        found = imported(SHARED, ("twisted", "autobahn", "txaio", "torch"))
        self.assertEqual(found, set())

    def test_top_level_reactor_modules_import_no_torch(self):
        """Every other top-level module (pie/config.py, pie/metrics.py, ...) is reactor-side: no torch."""
        self.assertEqual(imported(top_level_modules(), ("torch",)), set())

    def test_plugin_scans_import_neither_torch_nor_the_tap(self):
        """twistd's and pie's plugin scans stay light: no torch, no pie.tap."""
        scan = (
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "import pie.plugins\n"
            "from pie.interfaces import IModelLoader, IRemoteServiceType\n"
            "makers = {p.tapname for p in getPlugins(IServiceMaker)}\n"
            "assert {'pie', 'pie-worker'} <= makers, makers\n"
            "list(getPlugins(IModelLoader, pie.plugins)); list(getPlugins(IRemoteServiceType, pie.plugins))\n"
        )
        found = imported([], ("torch", "pie"), extra=scan)
        self.assertNotIn("torch", found)
        self.assertNotIn("pie.tap", found)
