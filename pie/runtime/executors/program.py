"""The program format: a `.py` source file, or a zip archive of modules with a main.py.

    main.py (or the single uploaded file):   async def main(args): ...
                                             (HTTP servers: async def handle(request))

`args` is the launch argument list (parse it with argparse). An archive may
hold more modules and packages (`util.py`, `pkg/__init__.py`, `pkg/x.py`),
imported by main.py as usual; non-.py members are ignored. A zipped folder
(every member under `app/`, with `app/main.py`) works too. All sources are UTF-8.
"""

from __future__ import annotations

import ast
import hashlib
import io
import zipfile
from collections import OrderedDict

from pie.interfaces import PieError
from pie.runtime.sandbox.loader import MAIN_MODULE, module_name

MAX_SOURCE_BYTES = 16 * 1024 * 1024
"""Total uncompressed source accepted from one archive (guards against zip bombs)."""
ZIP_MAGIC = b"PK\x03\x04"
CHECKED_PROGRAMS = 256
"""Digests of the programs that passed `check` lately (each launch checks its program)."""

_checked: OrderedDict[bytes, None] = OrderedDict()


def parse(program: bytes) -> dict[str, str]:
    """The program's modules as {path: source}; PieError if it is not a program."""
    if program.startswith(ZIP_MAGIC):
        files = _unzip(program)
    else:
        files = {MAIN_MODULE + ".py": _decode("the program", program)}
    if MAIN_MODULE + ".py" not in files:
        raise PieError("the program archive has no main.py")
    return files


def check(program: bytes) -> dict[str, str]:
    """Parse and compile every module; PieError with the first syntax error's message.

    A program that passed lately is not parsed again: every launch checks its program,
    and 32 instances of one program should not parse it 32 times next to the model.
    """
    files = parse(program)
    digest = hashlib.sha256(program).digest()
    if digest in _checked:
        _checked.move_to_end(digest)
        return files
    for path, source in files.items():
        try:
            tree = ast.parse(source, filename=path)
        except SyntaxError as error:
            where = f"{error.filename}, line {error.lineno}"
            text = (error.text or "").strip()
            message = f"SyntaxError: {error.msg} ({where})" + (f": {text}" if text else "")
            raise PieError(message) from None
        if path == MAIN_MODULE + ".py" and not (_binds(tree, "main") or _binds(tree, "handle")):
            raise PieError(
                "main.py must define `async def main(args)` "
                "(or `async def handle(request)` for an HTTP server)"
            )
    _checked[digest] = None
    if len(_checked) > CHECKED_PROGRAMS:
        _checked.popitem(last=False)
    return files


def _binds(tree: ast.Module, name: str) -> bool:
    """True if a top-level statement binds `name`."""
    for node in tree.body:
        if isinstance(node, (ast.AsyncFunctionDef, ast.FunctionDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name) == name for alias in node.names):
                return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = ast.walk(node)
            if any(
                isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store)
                for n in targets
            ):
                return True
    return False


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


def _unzip(program: bytes) -> dict[str, str]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(program))
        members = [m for m in archive.infolist() if m.filename.endswith(".py") and not m.is_dir()]
        if sum(m.file_size for m in members) > MAX_SOURCE_BYTES:
            raise PieError(f"the program's sources exceed {MAX_SOURCE_BYTES} bytes")
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
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise PieError(f"the program archive is not a valid zip file: {error}") from None
