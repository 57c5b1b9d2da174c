"""The runtime's inferlet-source tests again, with every instance in the wasm sandbox (issue 4 point 2)."""

from __future__ import annotations

import pytest
from twisted.trial import unittest

from pie.runtime.executors import build
from pie.runtime.executors.wasm import DEFAULT_DEADLINE_MS, WasmExecutor
from pie.runtime.instances import NORMAL_FINISH
from tests.inferlet_sources import InferletSourceTests
from tests.runtime_doubles import FakeModelService, RecordingOwner, make_runtime


class WasmExecutorTests(InferletSourceTests, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # Cached under $PIE_HOME/sandbox; rebuilt (a minute on a busy machine) only when the
        # guest sources change. Here, not in setUp, so the build is outside any test's timeout.
        build.build()

    def make_executor(self):
        return WasmExecutor()


VOCABULARY = b"""
from pie.inferlet import get_auto_model

def fingerprint(ids, pieces):
    # sizes, a digest of the bytes and one of where each token ends (no hashlib in the guest)
    data = b"".join(pieces)
    ends = sum(i * len(piece) for i, piece in enumerate(pieces))
    return f"{len(ids)} {sum(ids)} {len(data)} {int.from_bytes(data) % (2**61 - 1)} {ends}"

async def main(args):
    return fingerprint(*get_auto_model().get_tokenizer().get_vocabs())
"""


@pytest.mark.slow  # loads the real model
class SmolLM2VocabularyTests(unittest.TestCase):
    """The real vocabulary (49k tokens) reaches a sandboxed guest within the default deadline."""

    timeout = 120

    @classmethod
    def setUpClass(cls):
        build.build()

    async def test_get_vocabs_fits_the_default_cpu_deadline(self):
        from gguf import GGUFReader

        from pie.engine.loaders.gguf_loader import read_metadata
        from pie.engine.tokenizer import Tokenizer
        from tests.model_fixtures import model_path

        path = model_path()
        if path is None:
            raise unittest.SkipTest("SmolLM2 is not in $PIE_HOME/models")
        model = FakeModelService()
        model.tokenizer = Tokenizer.from_gguf_metadata(read_metadata(GGUFReader(path)))
        executor = WasmExecutor()
        self.assertEqual(executor.deadline_ms, DEFAULT_DEADLINE_MS)
        runtime = make_runtime(self, executor=executor, services={"smollm2": model})
        owner = RecordingOwner()
        instance_id = await runtime.launch(await runtime.add_program(VOCABULARY), [], owner)
        reason = await owner.ended(instance_id)
        ids, pieces = model.tokenizer.vocabs()
        program: dict = {}
        exec(VOCABULARY, program)  # the guest's own fingerprint, computed on the host's vocabulary
        self.assertGreater(len(ids), 49000)
        self.assertEqual(reason, NORMAL_FINISH)
        self.assertEqual(owner.messages(instance_id), [program["fingerprint"](ids, pieces)])
