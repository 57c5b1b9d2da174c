"""The runtime component's exports: load a program, then start and resume its driver.

componentize-py pre-initialises this module at build time, so every module
imported here is snapshotted into the component. Nothing else of the stdlib
is available inside the sandbox, hence the explicit allow-list below.
"""

# The stdlib allow-list: imported for the snapshot (user programs import them freely).
import argparse  # noqa: F401
import bisect  # noqa: F401
import collections  # noqa: F401
import copy  # noqa: F401
import dataclasses  # noqa: F401
import enum  # noqa: F401
import functools  # noqa: F401
import gc
import heapq  # noqa: F401
import importlib
import io
import itertools  # noqa: F401
import json  # noqa: F401
import linecache
import locale  # noqa: F401  (argparse's messages import it lazily, via gettext)
import marshal
import math  # noqa: F401
import operator  # noqa: F401
import pkgutil
import random  # noqa: F401
import re  # noqa: F401
import string  # noqa: F401
import sys
import textwrap  # noqa: F401
import typing  # noqa: F401

import wit_world
from componentize_py_types import Err
from wit_world.imports import host  # (snapshotted here; pie.inferlet._abi binds it)

import pie.inferlet  # noqa: F401  (the SDK, with every submodule it imports)
from pie.inferlet import _abi
from pie.inferlet._driver import Driver, Step, format_failure
from pie.runtime.sandbox import guard
from pie.runtime.sandbox.loader import (
    COMPILE_ONLY,
    COMPILED,
    ProgramError,
    compile_modules,
    load_main,
)

guard.install(host)  # malformed host calls fail the step instead of trapping

_driver: Driver | None = None
_last: Step = ("parked",)


def _warm_up() -> None:
    """Exercise the allow-list once so modules they import lazily land in the snapshot too."""
    parser = argparse.ArgumentParser(prog="warm-up", description="d")
    parser.add_argument("--flag", type=int, default=1, help="h")
    parser.add_argument("rest", nargs="*")
    parser.parse_args(["--flag", "2", "x"])
    parser.format_help()
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        parser.parse_args(["--nope"])
    except SystemExit:
        pass
    finally:
        sys.stderr = stderr

    @dataclasses.dataclass(frozen=True, order=True)
    class Point:
        x: int = 0
        y: list = dataclasses.field(default_factory=list)

    dataclasses.asdict(Point(1, [2]))
    json.loads(json.dumps({"a": [1.5, None, "é"]}, indent=1, sort_keys=True))
    re.compile(r"(?P<w>\w+)\s*").findall("a b")
    rng = random.Random(7)
    rng.choices([1, 2], weights=[1, 2])
    rng.gauss(0, 1)
    random.random()
    textwrap.dedent(textwrap.fill("a b c", 2))
    string.Template("$a").substitute(a=1)
    enum.Enum("Colour", "RED GREEN")
    copy.deepcopy({"a": [1]})
    typing.get_type_hints(Point)


class _Idle:
    """A binding for the warm-up run: every host call answers nothing."""

    def call(self, name, args):
        return None

    def call_async(self, name, args):
        return 0


def _warm_up_loader() -> None:
    """Load and step one program, and format one failure, so that the interpreter state
    they initialise lazily (compiler, type caches) is in the snapshot rather than built
    again by the first program of every instance."""
    main = load_main({"main.py": _WARM_UP_PROGRAM})
    _abi.run(main, ["--n", "1"], _Idle())
    try:
        raise ValueError("warm-up")
    except ValueError as error:
        format_failure(error)
    linecache.clearcache()


_WARM_UP_PROGRAM = """
import argparse, json
from pie.inferlet import _abi

async def main(args):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int)
    opts = parser.parse_args(args)
    await _abi.call_async("receive")
    return json.dumps({"n": opts.n})
"""


def _import_sdk() -> None:
    """Import every pie.inferlet module so it is in the snapshot (only imports work at runtime)."""
    for info in pkgutil.iter_modules(pie.inferlet.__path__, "pie.inferlet."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # a host-only helper module; programs cannot use it in the sandbox
            pass


_warm_up()
_import_sdk()
_warm_up_loader()
# Everything so far is in the snapshot every instance starts from; freezing it keeps the
# collector from walking (and so copying, page by page) that shared heap in each instance.
gc.collect()
gc.freeze()


def _ended(step: Step) -> bool:
    """Keep the step for `outcome`; true once main has ended (or made a malformed host call)."""
    global _last
    if guard.invalid() is not None:
        step = ("failed", f"invalid host call: {guard.invalid()}")
    _last = step
    return step[0] != "parked"


def _resume(fut: int, value) -> bool:
    if _driver is None:
        return _ended(("failed", "resume before start"))
    return _ended(_driver.resume(fut, value))


def _compile_only(files: dict[str, str]) -> bool:
    """Compile without running: the outcome is the marshalled code, as latin-1 text, or
    what is wrong with the program (the text the upload fails with)."""
    try:
        code = marshal.dumps(compile_modules(files))
    except ProgramError as error:
        return _ended(("failed", str(error)))
    except MemoryError:
        return _ended(("failed", "the program is too big to compile within the memory limit"))
    except BaseException as error:
        return _ended(("failed", format_failure(error)))
    return _ended(("done", code.decode("latin-1")))


class WitWorld(wit_world.WitWorld):
    def start(self, files, args):
        global _driver
        sys.argv = ["main.py"]  # no WASI args in the sandbox; argparse wants a program name
        random.seed()  # the seed in the snapshot is shared by every instance; draw a fresh one
        files = dict(files)
        if files.pop(COMPILE_ONLY, None) is not None:
            return _compile_only(files)
        try:
            compiled = files.pop(COMPILED, None)
            code = marshal.loads(compiled.encode("latin-1")) if compiled else None
            main = load_main(files, compiled=code)
            _driver, step = _abi.run(main, list(args))
        except BaseException as error:  # a broken program fails itself, with its message
            return _ended(("failed", format_failure(error)))
        return _ended(step)

    def resume(self, fut):
        return _resume(fut, None)

    def outcome(self):
        if _last[0] == "done":
            return _last[1]
        raise Err(_last[1] if _last[0] == "failed" else "main(args) has not ended")


def _value_resume(self, fut, value):
    return _resume(fut, value)


# One `resume-<call>` export per async call with a result (see pie/runtime/witgen.py);
# they all deliver the value the same way.
for _name in wit_world.WitWorld.__abstractmethods__:
    if _name.startswith("resume_"):
        setattr(WitWorld, _name, _value_resume)
WitWorld.__abstractmethods__ = frozenset()
