"""Turn a program's sources into its `main` function, without touching sys.modules.

A program is a set of modules (path -> source) with a `main.py` defining
`async def main(args)` (or, for an HTTP server, `async def handle(request)`,
wrapped with pie.inferlet.server.http_main). The program's own modules are imported through a
per-program `__import__`, so two programs (in dev mode, in one process) can
both have a `utils.py` without seeing each other's; every other import goes
to the interpreter as usual (inside the sandbox that is the bundled stdlib
allow-list and `pie.inferlet`).

Pure Python: runs inside the runtime component and in the dev executor.
"""

from __future__ import annotations

import builtins
import dis
import linecache
from collections.abc import Callable
from types import CodeType, ModuleType
from typing import Any

MAIN_MODULE = "main"

COMPILE_ONLY = "\0compile-only"
"""A `start` file entry (not a module path, so never a program's own file) that asks the
runtime to compile the program's modules and return them marshalled, without running it."""
COMPILED = "\0compiled"
"""A `start` file entry holding that marshalled code (latin-1 text): the program is loaded
from it instead of being compiled again (compiling is a third of an instance's start)."""


def module_name(path: str) -> str:
    """'pkg/util.py' -> 'pkg.util'; 'pkg/__init__.py' -> 'pkg'."""
    if not path.endswith(".py"):
        raise ValueError(f"not a Python module: {path}")
    parts = path[:-3].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or not all(p.isidentifier() for p in parts):
        raise ValueError(f"not an importable module path: {path}")
    return ".".join(parts)


class Program:
    """The modules of one program instance, imported lazily on first use."""

    def __init__(
        self, files: dict[str, str], tag: str = "", compiled: dict[str, CodeType] | None = None
    ) -> None:
        self._compiled = compiled or {}
        self._sources: dict[str, tuple[str, str, bool]] = {}
        for path, source in files.items():
            name = module_name(path)
            self._sources[name] = (tag + path, source, path.endswith("__init__.py"))
        if MAIN_MODULE not in self._sources:
            raise ImportError("the program has no main.py")
        self._tops = {name.partition(".")[0] for name in self._sources}
        self._modules: dict[str, ModuleType] = {}
        self._builtins = dict(vars(builtins), __import__=self._import)

    def main(self) -> Callable[[list[str]], Any]:
        """Execute main.py and return its `main` function."""
        module = self._load(MAIN_MODULE)
        main = getattr(module, "main", None)
        handle = getattr(module, "handle", None)
        if main is None and callable(handle):  # an HTTP server program (launch_server_instance)
            from pie.inferlet.server import http_main

            return http_main(handle)
        if not callable(main):
            raise ImportError("main.py defines no `async def main(args)`")
        return main

    def _load(self, name: str) -> ModuleType:
        module = self._modules.get(name)
        if module is not None:
            return module
        if name not in self._sources:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        parent, _, child = name.rpartition(".")
        parent_module = self._load(parent) if parent else None
        filename, source, is_package = self._sources[name]
        module = ModuleType(name)
        module.__file__ = filename
        module.__package__ = name if is_package else parent
        module.__builtins__ = self._builtins
        if is_package:
            module.__path__ = []
        self._modules[name] = module
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            code = self._compiled.get(filename) or compile(source, filename, "exec")
            exec(code, module.__dict__)
        except BaseException:
            del self._modules[name]
            raise
        if parent_module is not None:
            setattr(parent_module, child, module)
        return module

    def _import(
        self,
        name: str,
        globals: dict | None = None,
        locals: Any = None,
        fromlist: tuple = (),
        level: int = 0,
    ) -> ModuleType:
        if level:
            package = (globals or {}).get("__package__") or ""
            base = package.rsplit(".", level - 1)[0] if level > 1 else package
            if not base:
                raise ImportError("relative import outside the program's packages")
            name = f"{base}.{name}" if name else base
        if name.partition(".")[0] not in self._tops:
            return builtins.__import__(name, globals, locals, fromlist, 0)
        module = self._load(name)
        if not fromlist:
            return self._modules[name.partition(".")[0]]
        for item in fromlist:
            sub = f"{name}.{item}"
            if item != "*" and not hasattr(module, item) and sub in self._sources:
                self._load(sub)
        return module


class ProgramError(ValueError):
    """The program cannot run: a syntax error, or no entry point; str(self) says which."""


ENTRY_POINTS = ("main", "handle")
_STORES = (dis.opmap["STORE_NAME"], dis.opmap["STORE_GLOBAL"])


def compile_modules(files: dict[str, str]) -> dict[str, CodeType]:
    """Each module's code, by file name, as Program compiles it (for `compiled`).

    ProgramError with the first syntax error ("SyntaxError: invalid syntax (main.py,
    line 1): ..."), or if main.py binds neither `main` nor `handle`.
    """
    compiled = {path: _compile(path, source) for path, source in files.items()}
    main = compiled.get(MAIN_MODULE + ".py")
    if main is not None and not binds_entry_point(main):
        raise ProgramError(
            "main.py must define `async def main(args)` "
            "(or `async def handle(request)` for an HTTP server)"
        )
    return compiled


def _compile(path: str, source: str) -> CodeType:
    try:
        return compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as error:
        where = f"{error.filename}, line {error.lineno}"
        text = (error.text or "").strip()
        message = f"SyntaxError: {error.msg} ({where})" + (f": {text}" if text else "")
        raise ProgramError(message) from None
    except (ValueError, RecursionError) as error:  # NUL bytes, absurd nesting
        raise ProgramError(f"{path} cannot be compiled: {type(error).__name__}: {error}") from None


def binds_entry_point(code: CodeType) -> bool:
    """True if the module's own code (not a function's) binds `main` or `handle`:
    a def, an assignment or an import at the top level. Scans the bytecode for the
    store (a big module has hundreds of thousands of instructions)."""
    raw = code.co_code
    for name in ENTRY_POINTS:
        if name not in code.co_names:
            continue
        index = code.co_names.index(name)
        if index > 255:  # needs EXTENDED_ARG: decode the instructions (slow, and rare)
            return any(
                op.opcode in _STORES and op.argval in ENTRY_POINTS
                for op in dis.get_instructions(code)
            )
        for store in _STORES:  # 2-byte code units: an (opcode, arg) pair at an even offset
            at = raw.find(bytes((store, index)))
            while at != -1:
                if at % 2 == 0:
                    return True
                at = raw.find(bytes((store, index)), at + 1)
    return False


def load_main(
    files: dict[str, str], tag: str = "", compiled: dict[str, CodeType] | None = None
) -> Callable[[list[str]], Any]:
    """The program's main function; `tag` prefixes file names in tracebacks.

    `compiled` (from compile_modules, untagged) replaces compiling those modules.
    """
    return Program(files, tag, compiled).main()
