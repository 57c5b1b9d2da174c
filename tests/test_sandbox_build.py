"""Building and caching the runtime component (without running componentize-py)."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from pie.cli import sandbox as sandbox_cli
from pie.interfaces import PieError
from pie.runtime.executors import build, wasm
from tests.executor_contract import ExecutorHelpers
from tests.wasm_artifact import pinned_artifact

pytestmark = pytest.mark.slow


class CacheKeyTests(TestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp())

    def test_key_follows_guest_sources_and_wit(self) -> None:
        guest = Path(self.mktemp())
        guest.write_text("x = 1\n")
        wit = Path(self.mktemp())
        wit.write_text("package a:b;\n")
        self.patch(build, "REPO_PIE", guest.parent)
        self.patch(build, "WIT_PATH", wit)
        self.patch(build, "guest_files", lambda: [guest])
        first = build.cache_key()
        self.assertEqual(build.cache_key(), first)
        guest.write_text("x = 2\n")
        second = build.cache_key()
        self.assertNotEqual(second, first)
        wit.write_text("package a:c;\n")
        self.assertNotEqual(build.cache_key(), second)

    def test_guest_files_are_only_pure_guest_packages(self) -> None:
        relative = {str(p.relative_to(build.REPO_PIE)) for p in build.guest_files()}
        self.assertIn("inferlet/_abi.py", relative)
        self.assertIn("runtime/sandbox/app.py", relative)
        self.assertNotIn("inferlet/testing.py", relative)  # FakeWorld: pie's host, not guest code
        self.assertFalse(
            any(p.startswith(("runtime/executors", "server", "model")) for p in relative)
        )

    def test_artifact_lives_under_pie_home(self) -> None:
        self.assertEqual(build.artifact_path(self.home).parent.parent, self.home / "sandbox")
        self.patch(os, "environ", {**os.environ, "PIE_HOME": str(self.home)})
        self.assertEqual(build.pie_home(), self.home)

    def test_stage_has_empty_host_packages_and_the_guest_sources(self) -> None:
        staging = Path(self.mktemp())
        build._stage(staging)
        self.assertEqual((staging / "pie" / "__init__.py").read_text(), "")
        self.assertEqual((staging / "pie" / "runtime" / "__init__.py").read_text(), "")
        self.assertEqual(
            (staging / "pie" / "inferlet" / "_driver.py").read_bytes(),
            (build.REPO_PIE / "inferlet" / "_driver.py").read_bytes(),
        )
        self.assertFalse((staging / "pie" / "runtime" / "executors").exists())

    def test_cached_artifact_is_reused_without_building(self) -> None:
        target = build.artifact_path(self.home)
        target.parent.mkdir(parents=True)
        target.write_bytes(b"compiled")
        self.patch(build, "componentize", lambda *a: self.fail("must not rebuild"))
        self.assertEqual(build.build(self.home), target)

    def test_prune_keeps_the_newest_builds(self) -> None:
        for age, name in enumerate(["runtime-a", "runtime-b", "runtime-c", "runtime-d"]):
            artifact = self.home / "sandbox" / name / build.ARTIFACT
            artifact.parent.mkdir(parents=True)
            artifact.write_bytes(b"x")
            os.utime(artifact, (1000 - age, 1000 - age))
        building = self.home / "sandbox" / "runtime-e"  # no artifact yet: being built elsewhere
        building.mkdir()
        removed = build.prune(self.home, keep=2)
        self.assertEqual(sorted(p.name for p in removed), ["runtime-c", "runtime-d"])
        left = sorted(p.name for p in (self.home / "sandbox").iterdir())
        self.assertEqual(left, ["runtime-a", "runtime-b", "runtime-e"])

    def test_cli_status_and_build_failure(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(sandbox_cli.main(["status", "--home", str(self.home)]), 1)
        self.assertIn("not built", out.getvalue())

        def broken(output, progress):
            progress("componentize-py: building ...")
            raise RuntimeError("componentize-py failed to build the sandbox runtime:\nboom")

        self.patch(build, "componentize", broken)
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(sandbox_cli.main(["build", "--home", str(self.home)]), 1)
        self.assertIn("componentize-py: building", out.getvalue())
        self.assertIn("boom", err.getvalue())


class LazyBuildTests(ExecutorHelpers, TestCase):
    """The daemon builds the runtime in a thread on first use; instances wait for it."""

    def setUp(self) -> None:
        self.home = Path(self.mktemp())

    @inlineCallbacks
    def test_first_run_waits_for_the_build(self) -> None:
        real = pinned_artifact()  # the shared, cached runtime stands in for a fresh build
        built = []

        def fake_build(home, force, progress):
            built.append(home)
            return real

        self.patch(build, "build", fake_build)
        self.executor = wasm.WasmExecutor(home=self.home)
        _, _, outcome = self.launch(b"async def main(args):\n    return 'after the build'\n")
        _, _, outcome2 = self.launch(b"async def main(args):\n    return 'me too'\n")
        self.assertEqual(outcome, [])  # waiting for the build thread
        runtime = yield self.executor.ready()
        self.assertIsInstance(runtime, wasm.Runtime)
        self.assertEqual(built, [self.home])  # one build for all waiters
        self.assertFinishedWith(outcome, "after the build")
        self.assertFinishedWith(outcome2, "me too")

    @inlineCallbacks
    def test_instance_killed_while_the_runtime_builds_never_starts(self) -> None:
        real = pinned_artifact()
        self.patch(build, "build", lambda home, force, progress: real)
        self.executor = wasm.WasmExecutor(home=self.home)
        execution, host, outcome = self.launch(
            b"from pie.inferlet import send\nasync def main(args):\n    send('ran')\n"
        )
        execution.kill("stopped while waiting")
        yield self.executor.ready()
        self.assertFailedWith(outcome, "stopped while waiting")
        self.assertEqual(host.sent, [])  # main never ran

    @inlineCallbacks
    def test_failed_build_fails_the_waiting_instances(self) -> None:
        def broken(home, force, progress):
            raise RuntimeError("componentize-py failed: no space left")

        self.patch(build, "build", broken)
        self.executor = wasm.WasmExecutor(home=self.home)
        execution, _, outcome = self.launch(b"async def main(args):\n    return 'x'\n")
        yield execution.finished.addErrback(lambda _: None)
        self.assertFailedWith(outcome, "sandbox runtime unavailable", PieError)
        self.assertIn("no space left", str(outcome[0].value))
        self.assertIsNone(self.executor._runtime)


class MakeExecutorTests(TestCase):
    def test_names(self) -> None:
        from pie.runtime.executors import make_executor
        from pie.runtime.executors.dev import DevExecutor

        wasm_executor = make_executor("wasm", self.mktemp(), deadline_ms=250)
        self.assertEqual((wasm_executor.name, wasm_executor.deadline_ms), ("wasm", 250))
        self.assertIsInstance(make_executor("dev"), DevExecutor)
        error = self.assertRaises(PieError, make_executor, "docker")
        self.assertIn("wasm, dev", str(error))


class PinnedArtifactTests(ExecutorHelpers, TestCase):
    def test_missing_pinned_runtime_fails_the_instance(self) -> None:
        missing = Path(self.mktemp()) / "runtime.cwasm"
        self.executor = wasm.WasmExecutor(artifact=missing)
        _, _, outcome = self.launch(b"async def main(args):\n    return 'x'\n")
        text = self.assertFailedWith(outcome, "sandbox runtime unavailable", PieError)
        self.assertIn("does not exist", text)
