"""Host calls inside the sandbox are checked before they cross: a malformed one ends the step.

componentize-py's bindings trap (`unreachable`) when an argument does not have
its WIT type, before the host ever hears of the call: the instance would end
with "wasm `unreachable` instruction executed". `install` wraps every import of
the WIT `host` interface with the host's own check (pie.runtime.witcheck). A
malformed call is remembered and raises InvalidHostCall; from then on every
host call raises it again, and app.py fails the step with "invalid host call:
<what>", whatever the program did with the exception. That is how dev mode
ends it too (the host refuses the call and records the fault).

Module state is per instance: each instance has its own interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn

from pie.runtime.hostcalls import HOST_CALLS
from pie.runtime.witcheck import CHECKERS, BadArgument, InvalidCall, check_call

_invalid: str | None = None


class InvalidHostCall(BaseException):
    """A malformed host call (a BaseException: `except Exception` does not swallow it)."""


def refuse(detail: str) -> NoReturn:
    """Record a malformed call (the first one is the reason) and unwind the program."""
    global _invalid
    if _invalid is None:
        _invalid = detail
    raise InvalidHostCall(f"invalid host call: {_invalid}")


def invalid() -> str | None:
    """What was wrong with the first malformed host call, if there was one."""
    return _invalid


def install(host: ModuleType) -> None:
    """Replace each host import of the generated `host` module by its checked version."""
    for name in HOST_CALLS:
        setattr(host, name, _checked(name, getattr(host, name)))


def _checked(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    checks = tuple(check for _, check in CHECKERS[name])
    arity = len(checks)

    def call(*args: Any) -> Any:
        if _invalid is None and len(args) == arity:  # the fast path: well-formed calls
            try:
                checked = [check(value) for check, value in zip(checks, args, strict=True)]
            except BadArgument:
                pass
            else:
                return function(*checked)
        if _invalid is not None:
            refuse(_invalid)
        try:
            check_call(name, args)  # the slow path, for the text of what is wrong
        except InvalidCall as error:
            refuse(str(error))
        raise AssertionError(f"{name}{args!r} failed its check once and passed it now")

    call.__name__ = call.__qualname__ = name
    call.__module__ = function.__module__  # still one of the `host` module's imports
    return call
