"""Build the sandbox runtime component once per install, and cache it compiled.

The runtime is CPython built into one WebAssembly component by componentize-py
from pie/runtime/sandbox/app.py, the bundled pie.inferlet SDK and the WIT world
pie/runtime/inferlet.wit. Building takes ~7 s and compiling it with cranelift
another ~7 s, so both happen once: the serialized compiled component
(`Component.serialize`) is cached under

    $PIE_HOME/sandbox/runtime-<key>/runtime.cwasm

where <key> hashes everything the artifact depends on (wasmtime and
componentize-py versions, engine settings, the WIT text, every guest source
file). Change any of them and the next start builds a new one. Loading the
cached file takes a few milliseconds. A file lock keeps two processes from
building the same key at once.

CLI: `pie sandbox build [--force]` and `pie sandbox status` (dispatched here
by pie/cli/sandbox.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime
from wasmtime.component import Component

from pie.config import default_home
from pie.runtime.witgen import WIT_PATH, WORLD

REPO_PIE = Path(__file__).resolve().parents[2]
"""The `pie` package directory; the guest sources are taken from it."""
GUEST_DIRS = ("inferlet", "runtime/sandbox")
"""Packages under pie/ bundled into the guest (pure Python, no host imports)."""
GUEST_MODULES = ("runtime/hostcalls.py", "runtime/witcheck.py")
"""Single modules under pie/ bundled too: the guest checks host-call arguments with them."""
HOST_ONLY = ("inferlet/testing.py",)
"""Modules of the guest packages left out: FakeWorld runs pie's host, it is no guest code."""
APP_MODULE = "pie.runtime.sandbox.app"
ARTIFACT = "runtime.cwasm"
KEEP_BUILDS = 3

Progress = Callable[[str], None]


def pie_home() -> Path:
    return Path(default_home())


def engine_config() -> wasmtime.Config:
    """The engine settings every sandbox uses; a cached artifact is only valid for these."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.wasm_component_model = True
    config.cranelift_opt_level = "speed"
    return config


ENGINE_SETTINGS = "epoch_interruption=1;component_model=1;opt=speed"
"""Text form of engine_config(), part of the cache key (Config is write-only)."""


def guest_files() -> list[Path]:
    """Every source file bundled into the guest, in a stable order."""
    files = []
    for sub in GUEST_DIRS:
        files += sorted((REPO_PIE / sub).rglob("*.py"))
    files += [REPO_PIE / module for module in GUEST_MODULES]
    host_only = {REPO_PIE / module for module in HOST_ONLY}
    return [f for f in files if "__pycache__" not in f.parts and f not in host_only]


def cache_key() -> str:
    digest = hashlib.sha256()
    for part in (
        importlib.metadata.version("wasmtime"),
        importlib.metadata.version("componentize-py"),
        ENGINE_SETTINGS,
        WIT_PATH.read_text(encoding="utf-8"),
    ):
        digest.update(part.encode() + b"\0")
    for path in guest_files():
        digest.update(str(path.relative_to(REPO_PIE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def artifact_path(home: Path | None = None) -> Path:
    """Where the compiled runtime for the current sources lives (built or not)."""
    return (home or pie_home()) / "sandbox" / f"runtime-{cache_key()}" / ARTIFACT


def _stage(into: Path) -> None:
    """Lay out the guest package tree: pie/{inferlet,runtime/sandbox} with empty parents.

    The parents are empty on purpose: the host-side pie/__init__.py and
    pie/runtime/__init__.py may import host-only modules.
    """
    for parent in ("pie", "pie/runtime"):
        (into / parent).mkdir(parents=True, exist_ok=True)
        (into / parent / "__init__.py").write_text("")
    for path in guest_files():
        target = into / "pie" / path.relative_to(REPO_PIE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def componentize(output: Path, progress: Progress) -> None:
    """Run componentize-py on the staged guest tree (~7 s, ~400 MB RAM)."""
    with tempfile.TemporaryDirectory(prefix="pie-sandbox-") as tmp:
        staging = Path(tmp)
        _stage(staging)
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        command = [
            sys.executable, "-c", "import sys, componentize_py; sys.exit(componentize_py.script())",
            "-q", "-d", str(WIT_PATH), "-w", WORLD,
            "componentize", APP_MODULE, "-p", str(staging), "-o", str(output),
        ]  # fmt: skip
        progress("componentize-py: building the CPython runtime component ...")
        done = subprocess.run(command, cwd=staging, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                "componentize-py failed to build the sandbox runtime:\n"
                + (done.stderr or done.stdout).strip()[-4000:]
            )


def build(
    home: Path | None = None, force: bool = False, progress: Progress = lambda line: None
) -> Path:
    """Make sure the compiled runtime exists; its path. Blocking (~15 s when it must build)."""
    target = artifact_path(home)
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if target.exists() and not force:
            return target
        started = time.monotonic()
        wasm = target.with_suffix(".wasm")
        componentize(wasm, progress)
        progress(
            f"built {wasm.stat().st_size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s; "
            "compiling with cranelift ..."
        )
        compiled_at = time.monotonic()
        engine = wasmtime.Engine(engine_config())
        component = Component.from_file(engine, str(wasm))
        partial = target.with_suffix(".partial")
        partial.write_bytes(component.serialize())
        os.replace(partial, target)
        wasm.unlink()
        progress(f"compiled in {time.monotonic() - compiled_at:.1f} s: {target}")
    for stale in prune(home):
        progress(f"removed an old build: {stale}")
    return target


def prune(home: Path | None = None, keep: int = KEEP_BUILDS) -> list[Path]:
    """Delete all but the `keep` most recent runtime builds; the removed folders.

    Old builds are left by upgrades and source changes (36 MB each). A process
    that already loaded one is unaffected: the loaded code stays mapped.
    """
    root = (home or pie_home()) / "sandbox"
    builds = sorted(
        (d for d in root.glob("runtime-*") if (d / ARTIFACT).exists()),
        key=lambda d: (d / ARTIFACT).stat().st_mtime,
        reverse=True,
    )
    for stale in builds[keep:]:
        shutil.rmtree(stale, ignore_errors=True)
    return builds[keep:]
