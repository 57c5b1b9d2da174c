"""Calls across the wasm boundary with cached function types.

wasmtime-py 50 reflects a component function's type over FFI on every call,
in both directions (host import callbacks and export calls); for our small
signatures that reflection is most of the cost of a host call. The types of a
given import or export never change, so this module looks them up once and
reuses them, and makes the types' own reflection (a list's element type, an
option's payload type, ...) computed once per type object. It uses the same FFI entry points and exception plumbing as
wasmtime.component (`_linker.func_impl`, `_func.Func.__call__`), only without
the per-call reflection. Pinned to wasmtime 50.* (setup.cfg); if a future
wasmtime-py caches types itself, this module can go.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Callable
from ctypes import CFUNCTYPE, byref, c_void_p, create_string_buffer, pointer
from typing import Any

from wasmtime import WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime._slab import Slab
from wasmtime.component import Func, LinkerInstance
from wasmtime.component._enter import catch_exceptions, enter_wasm
from wasmtime.component._types import (
    F32,
    F64,
    S8,
    S16,
    S32,
    S64,
    U8,
    U16,
    U32,
    U64,
    Bool,
    FuncType,
    ListType,
    OptionType,
    RecordType,
    ResultType,
    TupleType,
    VariantLikeType,
    VariantType,
)


def _cache_type_reflection() -> None:
    """Type objects are immutable: remember what their properties reflect over FFI."""
    for cls, name in (
        (ListType, "element"), (RecordType, "fields"), (TupleType, "elements"),
        (VariantType, "cases"), (OptionType, "payload"), (ResultType, "ok"), (ResultType, "err"),
    ):  # fmt: skip
        reflected = cls.__dict__.get(name)
        if isinstance(reflected, property):
            cached = functools.cached_property(reflected.fget)
            cached.__set_name__(cls, name)
            setattr(cls, name, cached)
    tagged = VariantLikeType._tagged
    if getattr(tagged, "pie_cached", False):
        return

    def cached_tagged(self: VariantLikeType) -> bool:
        try:
            return self.__dict__["_pie_tagged"]
        except KeyError:
            value = self.__dict__["_pie_tagged"] = tagged(self)
            return value

    cached_tagged.pie_cached = True
    VariantLikeType._tagged = cached_tagged


_cache_type_reflection()

# A wasmtime_component_val_t is 32 bytes: the kind byte, then the value at offset 8.
_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_component_val_t)
_VAL_OFFSET = ffi.wasmtime_component_val_t.of.offset
_PRIMITIVES = {
    ty: (code, struct.calcsize(f"<{code}"), getattr(ffi, f"WASMTIME_COMPONENT_{kind}").value)
    for ty, code, kind in (
        (Bool, "?", "BOOL"), (S8, "b", "S8"), (U8, "B", "U8"), (S16, "h", "S16"),
        (U16, "H", "U16"), (S32, "i", "S32"), (U32, "I", "U32"), (S64, "q", "S64"),
        (U64, "Q", "U64"), (F32, "f", "F32"), (F64, "d", "F64"),
    )
}  # fmt: skip
"""Element type -> (struct code, its width, value kind): lists of these cross in bulk."""


def _scatter(packed: bytes, count: int, width: int, kind: int) -> bytearray:
    """`count` packed values of `width` bytes -> an array of wasmtime_component_val_t.

    Strided slice assignment copies each byte column in C, so a 300 kB list<u8>
    (a vocabulary's bytes) costs milliseconds, not a Python call per element.
    """
    vals = bytearray(count * _VAL_SIZE)
    vals[0::_VAL_SIZE] = bytes([kind]) * count
    for k in range(width):
        vals[_VAL_OFFSET + k :: _VAL_SIZE] = packed[k::width]
    return vals


def _gather(vals: bytes, count: int, width: int) -> bytes:
    """The inverse of _scatter (without the kinds): the values packed back to back."""
    if width == 1:
        return vals[_VAL_OFFSET::_VAL_SIZE]
    packed = bytearray(count * width)
    for k in range(width):
        packed[k::width] = vals[_VAL_OFFSET + k :: _VAL_SIZE]
    return bytes(packed)


def _cache_list_conversion() -> None:
    """Lists of numbers (token ids, distributions, masks, bytes) cross the boundary in bulk."""
    to_c, from_c = ListType.convert_to_c, ListType.convert_from_c
    if getattr(to_c, "pie_bulk", False):
        return

    def bulk_to_c(self: ListType, store: Any, val: Any, ptr: Any) -> None:
        primitive = _PRIMITIVES.get(type(self.element))
        if primitive is None:
            return to_c(self, store, val, ptr)
        code, width, kind = primitive
        if code == "B":
            if not isinstance(val, bytes):
                raise TypeError("expected bytes value")
            packed = val
        else:
            if not isinstance(val, list):
                raise TypeError("expected list value")
            try:
                packed = struct.pack(f"<{len(val)}{code}", *val)
            except (struct.error, OverflowError) as error:
                name = type(self.element).__name__
                raise TypeError(f"list element does not fit {name}: {error}") from None
        raw = ffi.wasmtime_component_vallist_t()
        ffi.wasmtime_component_vallist_new_uninit(raw, len(val))
        if val:
            vals = _scatter(packed, len(val), width, kind)
            ctypes.memmove(raw.data, (ctypes.c_char * len(vals)).from_buffer(vals), len(vals))
        ptr.contents.kind = ffi.WASMTIME_COMPONENT_LIST
        ptr.contents.of.list = raw

    def bulk_from_c(self: ListType, c: Any) -> Any:
        primitive = _PRIMITIVES.get(type(self.element))
        if primitive is None:
            return from_c(self, c)
        code, width, _ = primitive
        size = c.of.list.size
        try:
            vals = ctypes.string_at(c.of.list.data, size * _VAL_SIZE) if size else b""
        finally:
            ffi.wasmtime_component_vallist_delete(byref(c.of.list))
        packed = _gather(vals, size, width)
        return packed if code == "B" else list(struct.unpack(f"<{size}{code}", packed))

    bulk_to_c.pie_bulk = True
    ListType.convert_to_c = bulk_to_c
    ListType.convert_from_c = bulk_from_c


_cache_list_conversion()

_HOST_FUNCS: Slab[list] = Slab()
"""idx -> [name, python function, (param types, result type, owning FuncType) once known]."""


class ValueMismatch(TypeError):
    """A Python value handed to wasm does not have the shape of its WIT type.

    wasmtime-py is strict: a WIT list must be a list, a tuple a tuple, a
    list<u8> bytes, an option None or the value.
    """


def _lower(ty: Any, store: Any, value: Any, into: Any, what: str) -> None:
    try:
        ty.convert_to_c(store, value, into)
    except (TypeError, ValueError, OverflowError) as error:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueMismatch(f"{what} {shown} does not fit its WIT type: {error}") from None


@ffi.wasmtime_component_func_callback_t
def _host_call(idx, context, ty_raw, args, nargs, results, nresults):  # noqa: ANN001
    def run(store: Any) -> None:
        entry = _HOST_FUNCS.get(idx or 0)
        fty = FuncType._from_ptr(ty_raw, owner=store)
        if entry[2] is None:
            entry[2] = ([ty for _, ty in fty.params], fty.result, fty)  # keeps fty alive
        else:
            fty.close()
        params, result_ty, _ = entry[2]
        value = entry[1](*[ty.convert_from_c(args[i]) for i, ty in enumerate(params)])
        if result_ty is not None:
            _lower(result_ty, store, value, results, f"host call {entry[0]} returned")

    return catch_exceptions(context, run)


@CFUNCTYPE(None, c_void_p)
def _finalize(idx) -> None:  # noqa: ANN001
    if _HOST_FUNCS:
        _HOST_FUNCS.deallocate(idx or 0)


def add_host_func(instance: LinkerInstance, name: str, function: Callable[..., Any]) -> None:
    """Like LinkerInstance.add_func, but `function(*args)` gets no store and types are cached."""
    instance._assert_not_locked()
    encoded = name.encode("utf-8")
    idx = _HOST_FUNCS.allocate([name, function, None])
    error = ffi.wasmtime_component_linker_instance_add_func(
        instance.ptr(), create_string_buffer(encoded), len(encoded), _host_call, idx, _finalize
    )
    if error:
        raise WasmtimeError._from_ptr(error)


class ExportSignature:
    """The cached type of one export; `call` replaces Func.__call__."""

    def __init__(self, name: str, func: Func, store: Any) -> None:
        self._name = name
        self._fty = func.type(store)
        self._params = [ty for _, ty in self._fty.params]
        self._result = self._fty.result

    def call(self, func: Func, store: Any, *params: Any) -> Any:
        if len(params) != len(self._params):
            raise TypeError(f"expected {len(self._params)} parameters, got {len(params)}")
        param_capi = (ffi.wasmtime_component_val_t * len(params))()
        lowered = 0
        try:
            for ty, value in zip(self._params, params, strict=True):
                _lower(ty, store, value, pointer(param_capi[lowered]), f"{self._name} got")
                lowered += 1
            result_space = ffi.wasmtime_component_val_t()
            result_ref = byref(result_space) if self._result is not None else None
            context = store._context()

            def run() -> ctypes._Pointer:
                return ffi.wasmtime_component_func_call(
                    byref(func._func), context, param_capi, lowered, result_ref,
                    1 if self._result is not None else 0,
                )  # fmt: skip

            enter_wasm(run)
            return None if self._result is None else self._result.convert_from_c(result_space)
        finally:
            for i in range(lowered):
                ffi.wasmtime_component_val_delete(byref(param_capi[i]))
