"""The program format: a `.py` source file, or a zip archive of modules with a main.py.

    main.py (or the single uploaded file):   async def main(args): ...
                                             (HTTP servers: async def handle(request))

`args` is the launch argument list (parse it with argparse). An archive may
hold more modules and packages (`util.py`, `pkg/__init__.py`, `pkg/x.py`),
imported by main.py as usual; non-.py members are ignored. A zipped folder
(every member under `app/`, with `app/main.py`) works too. All sources are UTF-8.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

from pie.interfaces import PieError
from pie.runtime.sandbox.loader import MAIN_MODULE, ProgramError, compile_modules, module_name

ZIP_MAGIC = b"PK\x03\x04"
DEFAULT_MAX_SOURCE_BYTES = 4 * 1024 * 1024
"""Uncompressed source accepted from one program (a zip bomb inflates to no more). Checking a
program compiles it, which takes about 150 times its size in memory at the peak."""
DEFAULT_MAX_FILES = 1000
"""Members one program archive may have (of any kind: the listing alone costs memory)."""
CHECKED_SOURCE_BYTES = 64 * 1024 * 1024
"""Sources of the programs that passed `check` lately, kept so a launch need not check again."""


@dataclass(frozen=True)
class Limits:
    """What one program may be (settings max_program_source and max_program_files)."""

    max_source_bytes: int = DEFAULT_MAX_SOURCE_BYTES
    max_files: int = DEFAULT_MAX_FILES


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, eq=False)
class Checked:
    """A program that passed `check`: its modules, ready for an executor's run().

    `key` (sha256 of the program's bytes) names it in the executors' caches.
    """

    files: dict[str, str]
    key: bytes

    @property
    def size(self) -> int:
        return sum(len(source) for source in self.files.values())


_checked: OrderedDict[bytes, Checked] = OrderedDict()
_checked_lock = threading.Lock()  # check() runs in threads


def parse(program: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, str]:
    """The program's modules as {path: source}; PieError if it is not a program."""
    if program.startswith(ZIP_MAGIC):
        files = _unzip(program, limits)
    else:
        if len(program) > limits.max_source_bytes:
            raise PieError(f"the program's source exceeds {limits.max_source_bytes} bytes")
        files = {MAIN_MODULE + ".py": _decode("the program", program)}
    if MAIN_MODULE + ".py" not in files:
        raise PieError("the program archive has no main.py")
    return files


def prepare(program: bytes, limits: Limits = DEFAULT_LIMITS) -> Checked:
    """The program's modules and key, not compiled yet (the sandbox compiles them)."""
    return Checked(parse(program, limits), hashlib.sha256(program).digest())


def check(program: bytes, limits: Limits = DEFAULT_LIMITS) -> Checked:
    """Parse and compile every module, here; PieError with the first syntax error's message.

    Slow for a big program (a second per MB of source), in one piece and holding the
    GIL: the dev executor calls it in a thread, the sandbox compiles in the sandbox
    instead (WasmExecutor.check). A program that passed lately is not compiled again
    (each launch by bytes checks its program).
    """
    key = hashlib.sha256(program).digest()
    with _checked_lock:
        found = _checked.get(key)
        if found is not None:
            _checked.move_to_end(key)
            return found
    files = parse(program, limits)
    try:
        compile_modules(files)
    except ProgramError as error:
        raise PieError(str(error)) from None
    except MemoryError:
        raise PieError("the program is too big to compile") from None
    checked = Checked(files, key)
    with _checked_lock:
        _checked[key] = checked
        total = sum(c.size for c in _checked.values())
        while total > CHECKED_SOURCE_BYTES and len(_checked) > 1:
            total -= _checked.popitem(last=False)[1].size
    return checked


def _single_folder(paths: list[str]) -> str:
    """'app/' if every module is under app/ and there is app/main.py (a zipped folder), else ''."""
    if not paths or MAIN_MODULE + ".py" in paths:
        return ""
    top = paths[0].split("/", 1)[0] + "/"
    if all(p.startswith(top) for p in paths) and top + MAIN_MODULE + ".py" in paths:
        return top
    return ""


def _decode(what: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PieError(f"{what} is not UTF-8 text ({error})") from None


def _unzip(program: bytes, limits: Limits) -> dict[str, str]:
    """The .py members, within the limits: their declared sizes are checked before anything
    is inflated, and zipfile inflates no member beyond its declared size."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(program))
        entries = archive.infolist()
        if len(entries) > limits.max_files:
            raise PieError(
                f"the program archive has {len(entries)} members; the limit is {limits.max_files}"
            )
        members = [m for m in entries if m.filename.endswith(".py") and not m.is_dir()]
        if sum(m.file_size for m in members) > limits.max_source_bytes:
            raise PieError(f"the program's sources exceed {limits.max_source_bytes} bytes")
        names = [m.filename.removeprefix("./") for m in members]
        top = _single_folder(names)
        files = {}
        for member, path in zip(members, names, strict=True):
            path = path.removeprefix(top)
            try:
                module_name(path)
            except ValueError as error:
                raise PieError(f"bad module in the program archive: {error}") from None
            files[path] = _decode(path, archive.read(member))
        return files
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as error:
        raise PieError(f"the program archive is not a valid zip file: {error}") from None
