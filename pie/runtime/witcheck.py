"""Checking host-call arguments against their WIT types, in the host and in the guest.

A host call whose arguments do not fit its row of pie.runtime.hostcalls is a
broken guest: the instance ends with "invalid host call: <what>". The host
(pie.runtime.hostapi) checks every call, from either executor. Inside the
sandbox the guest checks them too, before they are lowered by componentize-py's
bindings, because those trap (`unreachable`) on a value of the wrong type and
the host never hears of the call (pie.runtime.sandbox.app).

Pure Python over the host-call table, so it is bundled into the runtime component.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pie.runtime.hostcalls import HOST_CALLS


class InvalidCall(Exception):
    """A host call that does not fit the table; str(self) says what is wrong."""


class BadArgument(Exception):
    """One argument does not have its WIT type."""


def _check_string(value):
    if not isinstance(value, str):
        raise BadArgument(f"expected a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadArgument(f"string is not valid Unicode ({e.reason})") from None
    return value


def _check_bool(value):
    if not isinstance(value, bool):
        raise BadArgument(f"expected a bool, got {type(value).__name__}")
    return value


def _check_f32(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadArgument(f"expected a number (f32), got {type(value).__name__}")
    if not math.isfinite(value):
        raise BadArgument(f"{value} is not a finite number")
    return float(value)


def _unsigned(bits: int) -> Callable[[object], int]:
    top = (1 << bits) - 1

    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadArgument(f"expected an integer (u{bits}), got {type(value).__name__}")
        if not 0 <= value <= top:
            raise BadArgument(f"{value} is out of range for u{bits}")
        return int(value)

    return check


def _check_bytes(value):
    """list<u8> arrives as bytes from both executors (componentize-py lowers it so)."""
    if not isinstance(value, bytes | bytearray):
        raise BadArgument(f"expected bytes, got {type(value).__name__}")
    return bytes(value)


def _u32_list(value):
    """list<u32>, the hot path of every forward call: one pass, no per-item function call."""
    if not isinstance(value, list | tuple):
        raise BadArgument(f"expected a list, got {type(value).__name__}")
    if not all(type(x) is int and 0 <= x <= 0xFFFFFFFF for x in value):
        for i, x in enumerate(value):
            try:
                _unsigned(32)(x)
            except BadArgument as e:
                raise BadArgument(f"item {i}: {e}") from None
    return list(value)


def _list_of(item: Callable[[object], object]) -> Callable[[object], list]:
    def check(value):
        if not isinstance(value, list | tuple):
            raise BadArgument(f"expected a list, got {type(value).__name__}")
        out = []
        for i, x in enumerate(value):
            try:
                out.append(item(x))
            except BadArgument as e:
                raise BadArgument(f"item {i}: {e}") from None
        return out

    return check


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _checker(wit_type: str) -> Callable[[object], object]:
    """A checker-and-normaliser for a WIT parameter type of the host table."""
    t = wit_type.strip()
    if t == "string":
        return _check_string
    if t == "bool":
        return _check_bool
    if t == "f32":
        return _check_f32
    if t in ("u8", "u32", "u64"):
        return _unsigned(int(t[1:]))
    if t == "list<u32>":
        return _u32_list
    if t == "list<u8>":
        return _check_bytes
    if t.startswith("list<") and t.endswith(">"):
        return _list_of(_checker(t[5:-1]))
    if t.startswith("option<") and t.endswith(">"):
        inner = _checker(t[7:-1])
        return lambda value: None if value is None else inner(value)
    if t.startswith("tuple<") and t.endswith(">"):
        items = [_checker(p) for p in _split_top_level(t[6:-1])]

        def check_tuple(value):
            if not isinstance(value, list | tuple) or len(value) != len(items):
                raise BadArgument(f"expected a tuple of {len(items)}")
            return tuple(c(v) for c, v in zip(items, value, strict=True))

        return check_tuple
    raise ValueError(f"no checker for WIT type {wit_type!r}")


CHECKERS: dict[str, tuple[tuple[str, Callable], ...]] = {
    name: tuple((pname, _checker(ptype)) for pname, ptype in call.params)
    for name, call in HOST_CALLS.items()
}


def check_call(name: object, args: object) -> tuple:
    """The arguments, checked and normalised (e.g. ints to floats for f32); InvalidCall if not."""
    checkers = CHECKERS.get(name) if isinstance(name, str) else None
    if checkers is None:
        raise InvalidCall(f"unknown host call {name!r}")
    if not isinstance(args, tuple | list):
        raise InvalidCall(f"{name}: arguments must be a tuple, not {type(args).__name__}")
    if len(args) != len(checkers):
        wanted = ", ".join(p for p, _ in checkers) or "none"
        raise InvalidCall(f"{name} takes {len(checkers)} arguments ({wanted}), got {len(args)}")
    checked = []
    for (pname, check), value in zip(checkers, args, strict=True):
        try:
            checked.append(check(value))
        except BadArgument as e:
            raise InvalidCall(f"{name}: argument {pname!r}: {e}") from None
    return tuple(checked)
