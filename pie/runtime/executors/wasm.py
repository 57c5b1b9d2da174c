"""WasmExecutor: inferlets as CPython inside WebAssembly (the sandbox).

One runtime component (see build.py) is loaded once per process and
instantiated per instance in its own wasmtime Store:

- isolation: the guest sees nothing but the WIT `host` imports and a WASI
  context with no preopened directories, no environment, no arguments, no
  network and no stdin; stdout/stderr go to the server log, prefixed with the
  instance. A trap ends only its own Store.
- memory: `Store.set_limits(memory_size=...)`; a hog traps or gets MemoryError.
- CPU: epoch interruption. A ticker thread bumps the engine epoch every
  TICK_S; each step and each host call re-arms the deadline, so a guest gets at
  most `deadline_ms` of CPU between two host calls.
- parking: a step returns when every guest task waits on a host future; the
  instance then costs memory only, and is resumed from the reactor when a
  result arrives, so many parked instances join one model batch.
- kill: dropping the Store (after the current step, if one is running).

Every wasm call runs on the reactor thread, one at a time: wasmtime-py keeps
the exception raised by a host function in a process global, so calls into
two stores must not overlap. A guest can therefore hold the reactor for at most
`deadline_ms`.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import wasmtime
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from wasmtime.component import Component, Linker
from zope.interface import implementer

from pie.interfaces import IInferletExecutor, InstanceFault, PieError
from pie.runtime.executors import build, program
from pie.runtime.executors.base import Execution, Killed, Step
from pie.runtime.executors.fastcall import ExportSignature, ValueMismatch, add_host_func
from pie.runtime.hostcalls import HOST_CALLS
from pie.runtime.sandbox.loader import COMPILE_ONLY, COMPILED
from pie.runtime.witgen import kebab, resume_export

log = Logger()

TICK_S = 0.01
DEFAULT_DEADLINE_MS = 500
DEFAULT_MEMORY_LIMIT = 256 * 1024 * 1024
OUTPUT_LINE_LIMIT = 2000
"""Characters of one guest stdout/stderr write kept in the server log."""
COMPILED_CACHE_SIZE = 64
"""Programs whose compiled code the executor keeps (see WasmExecutor.compiled)."""
COMPILED_SOURCE_LIMIT = 256 * 1024
"""Larger programs are compiled by each instance (bounds the cache's memory)."""
OUTPUT_WRITES_LIMIT = 1000
"""Non-empty writes per instance logged; the rest are dropped (a print loop must not flood the log)."""

_active: WasmExecution | None = None
"""The instance whose step is running; host imports act on it (one step at a time)."""


class _Ticker(threading.Thread):
    """Advances the engine's epoch; a separate thread because the reactor may be inside wasm."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        super().__init__(name="pie-wasm-epoch", daemon=True)
        self._engine = engine

    def run(self) -> None:
        while True:
            time.sleep(TICK_S)
            self._engine.increment_epoch()


class Runtime:
    """The loaded runtime component plus the linker that gives it the host imports."""

    _shared: dict[str, Runtime] = {}

    def __init__(self, path: Path) -> None:
        self.engine = wasmtime.Engine(build.engine_config())
        self.component = Component.deserialize_file(self.engine, str(path))
        self.linker = Linker(self.engine)
        self.linker.add_wasip2()
        with self.linker.root() as root, root.add_instance("pie:inferlet/host") as iface:
            for call in HOST_CALLS.values():
                name = kebab(call.name).lstrip("%")
                add_host_func(iface, name, _host_import(call.name, call.mode))
        self.exports = {name: self.component.get_export_index(name) for name in _export_names()}
        self.signatures: dict[str, ExportSignature] = {}
        _Ticker(self.engine).start()

    @classmethod
    def shared(cls, path: Path) -> Runtime:
        """One Runtime (engine, compiled code, ticker) per artifact per process."""
        runtime = cls._shared.get(str(path))
        if runtime is None:
            runtime = cls._shared[str(path)] = cls(path)
        return runtime


def _signature(runtime: Runtime, export: str, func: Any, store: wasmtime.Store) -> ExportSignature:
    """The export's call signature, worked out once per runtime."""
    signature = runtime.signatures.get(export)
    if signature is None:
        signature = runtime.signatures[export] = ExportSignature(export, func, store)
    return signature


def _new_store(
    runtime: Runtime, executor: WasmExecutor, wasi: wasmtime.WasiConfig
) -> wasmtime.Store:
    store = wasmtime.Store(runtime.engine)
    store.set_wasi(wasi)
    store.set_limits(memory_size=executor.memory_limit)
    store.set_epoch_deadline(executor.deadline_ticks)
    return store


def _compile_in_sandbox(runtime: Runtime, executor: WasmExecutor, files: list) -> str | None:
    """The program's modules compiled and marshalled by a throwaway instance that runs
    none of its code (so the result is not the program's to forge); None if that fails,
    and the instance then compiles for itself, failing with its usual message."""
    store = _new_store(runtime, executor, wasmtime.WasiConfig())
    try:
        instance = runtime.linker.instantiate(store, runtime.component)
        funcs = {e: instance.get_func(store, runtime.exports[e]) for e in ("start", "outcome")}
        start = _signature(runtime, "start", funcs["start"], store)
        if not start.call(funcs["start"], store, [*files, (COMPILE_ONLY, "")], []):
            return None
        outcome = _signature(runtime, "outcome", funcs["outcome"], store)
        result = outcome.call(funcs["outcome"], store)
        return result.payload if result.tag == "ok" else None
    except (wasmtime.Trap, wasmtime.WasmtimeError, ValueMismatch):
        return None
    finally:
        store.close()


_RESUME_EXPORTS = {c.name: resume_export(c) for c in HOST_CALLS.values() if c.mode == "async"}
"""Async host call -> the export that delivers its result."""


def _export_names() -> list[str]:
    return ["start", "outcome", *sorted(set(_RESUME_EXPORTS.values()))]


def _host_import(name: str, mode: str):
    """The wasmtime host function for one row of the host-call table."""

    def sync_call(*args: Any) -> Any:
        return _active.host_import(name, args, False)

    def async_call(*args: Any) -> int:
        return _active.host_import(name, args, True)

    def command_call(*args: Any) -> None:
        _active.host_import(name, args, False)

    return {"sync": sync_call, "async": async_call, "command": command_call}[mode]


class _GuestKilled(Exception):
    """Raised out of a host import to unwind a killed guest (becomes a trap)."""


class WasmExecution(Execution):
    def __init__(
        self, executor: WasmExecutor, files: dict[str, str], arguments: list[str], host: Any
    ) -> None:
        super().__init__(host)
        self._executor = executor
        self._files = sorted(files.items())
        self._arguments = list(arguments)
        self._runtime: Runtime | None = None
        self._store: wasmtime.Store | None = None
        self._instance = None
        self._funcs: dict[str, Any] = {}
        self._label = ""
        self._writes = 0

    def begin(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.start()

    # ------------------------------------------------------------ Execution hooks

    def _enter_start(self) -> Step:
        runtime = self._runtime
        files = self._files
        code = self._executor.compiled(runtime, files)
        if code is not None:
            files = [*files, (COMPILED, code)]
        wasi = wasmtime.WasiConfig()  # no preopens, env, args, stdin or network
        wasi.stdout_custom = self._output("stdout")
        wasi.stderr_custom = self._output("stderr")
        store = self._store = _new_store(runtime, self._executor, wasi)
        with _Active(self):
            self._instance = runtime.linker.instantiate(store, runtime.component)
        return self._call("start", files, self._arguments)

    def _enter_resume(self, fut: int, name: str, value: Any) -> Step:
        export = _RESUME_EXPORTS[name]
        if export == "resume":
            return self._call(export, fut)
        return self._call(export, fut, value)

    def _release(self) -> None:
        self._funcs.clear()
        self._instance = None
        store, self._store = self._store, None
        if store is not None:
            store.close()

    def _describe(self, error: BaseException) -> InstanceFault:
        if isinstance(error, ValueMismatch):
            return InstanceFault(str(error))
        if not isinstance(error, wasmtime.Trap | wasmtime.WasmtimeError):
            return InstanceFault(f"sandbox error: {type(error).__name__}: {error}")
        text = str(error)
        found = re.search(r"wasm trap: (.+)", text)
        trap = found.group(1).strip() if found else (text.strip().splitlines() or ["?"])[0]
        if trap == "interrupt":
            ms = self._executor.deadline_ms
            return InstanceFault(f"CPU deadline exceeded (over {ms} ms without a host call)")
        if "memory" in trap and ("limit" in trap or "grow" in trap):
            return InstanceFault(self._memory_message())
        return InstanceFault(f"trap: {trap}")

    def _memory_message(self) -> str:
        return f"memory limit exceeded ({self._executor.memory_limit // (1024 * 1024)} MiB)"

    # ------------------------------------------------------------ wasm calls

    def _prefix(self) -> str:
        """`Inst <first 8 characters of the instance id>`, as Pie prints guest output."""
        if not self._label:
            try:
                self._label = "Inst " + str(self.host.call("get_instance_id", ()))[:8]
            except Exception:
                self._label = "Inst ?"
        return self._label

    def _call(self, export: str, *params: Any) -> Step:
        func = self._funcs.get(export)
        if func is None:
            index = self._runtime.exports[export]
            func = self._funcs[export] = self._instance.get_func(self._store, index)
        signature = _signature(self._runtime, export, func, self._store)
        self._store.set_epoch_deadline(self._executor.deadline_ticks)
        with _Active(self):
            result = signature.call(func, self._store, *params)
        if export == "outcome":
            return result
        if not result:
            return ("parked",)
        outcome = self._call("outcome")
        if outcome.tag == "ok":
            return ("done", outcome.payload)
        if outcome.payload.rstrip().endswith("MemoryError"):
            return ("failed", self._memory_message() + "\n" + outcome.payload)
        return ("failed", outcome.payload)

    def host_import(self, name: str, args: tuple, is_async: bool) -> Any:
        """A host import called by the guest (inside a step, on the reactor thread)."""
        try:
            if is_async:
                result = self.call_async(name, args)
            else:
                result = self.call(name, args)
        except Killed:
            raise _GuestKilled("instance killed") from None
        self._store.set_epoch_deadline(self._executor.deadline_ticks)
        return result

    def _output(self, stream: str):
        def write(data: bytes) -> None:
            text = data.decode("utf-8", "replace").rstrip("\n")[:OUTPUT_LINE_LIMIT]
            if not text:
                return
            self._writes += 1
            if self._writes <= OUTPUT_WRITES_LIMIT:
                log.info(
                    "[{label}] {stream}: {text}", label=self._prefix(), stream=stream, text=text
                )
            elif self._writes == OUTPUT_WRITES_LIMIT + 1:
                log.info("[{label}] more output dropped", label=self._prefix())

        return write


class _Active:
    """Marks which instance the host imports belong to during one wasm call.

    Restores the previous one on exit: a host import may (through a kill and
    the runtime's callbacks) start another instance before it returns.
    """

    __slots__ = ("_execution", "_previous")

    def __init__(self, execution: WasmExecution) -> None:
        self._execution = execution

    def __enter__(self) -> None:
        global _active
        self._previous, _active = _active, self._execution

    def __exit__(self, *exc: Any) -> None:
        global _active
        _active = self._previous


@implementer(IInferletExecutor)
class WasmExecutor:
    """Runs each instance in its own wasmtime Store of the shared runtime component."""

    name = "wasm"

    def __init__(
        self,
        home: Path | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        deadline_ms: int = DEFAULT_DEADLINE_MS,
        artifact: Path | None = None,
    ) -> None:
        """`artifact` pins a compiled runtime file (no build); default: the cached build."""
        self.home = home
        self.artifact = artifact
        self.memory_limit = memory_limit
        self.deadline_ms = deadline_ms
        self.deadline_ticks = max(1, round(deadline_ms / 1000 / TICK_S))
        self._runtime: Runtime | None = None
        self._waiters: list[Deferred] = []
        self._compiled: OrderedDict[bytes, str | None] = OrderedDict()

    def compiled(self, runtime: Runtime, files: list[tuple[str, str]]) -> str | None:
        """The marshalled code of a program's modules, compiled in the sandbox once per
        program (the last COMPILED_CACHE_SIZE programs): instances load it rather than
        compile the same sources again, a third of their start. None: compile as usual."""
        if sum(len(source) for _, source in files) > COMPILED_SOURCE_LIMIT:
            return None
        key = hashlib.sha256(repr(files).encode()).digest()
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        code = self._compiled[key] = _compile_in_sandbox(runtime, self, files)
        if len(self._compiled) > COMPILED_CACHE_SIZE:
            self._compiled.popitem(last=False)
        return code

    def check(self, program_bytes: bytes) -> None:
        program.check(program_bytes)

    def run(self, program_bytes: bytes, arguments: list[str], host: Any) -> WasmExecution:
        """Run main(args) to its first park now (once the runtime is loaded, if it is not yet).

        Raises PieError if the program is not valid.
        """
        files = program.check(program_bytes)
        execution = WasmExecution(self, files, arguments, host)

        def unavailable(failure: Failure) -> None:
            execution.fail(PieError(f"sandbox runtime unavailable: {failure.value}"))

        self.ready().addCallbacks(execution.begin, unavailable)
        return execution

    def ready(self) -> Deferred:
        """Deferred firing with the loaded Runtime; builds it in a thread the first time."""
        if self._runtime is not None:
            return succeed(self._runtime)
        path = self.artifact or build.artifact_path(self.home)
        if path.exists():
            self._runtime = Runtime.shared(path)
            return succeed(self._runtime)
        if self.artifact is not None:
            return fail(PieError(f"the pinned sandbox runtime {path} does not exist"))
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            log.info("building the sandbox runtime (once per install, ~15 s) ...")
            progress = lambda line: log.info("sandbox build: {line}", line=line)  # noqa: E731
            deferToThread(build.build, self.home, False, progress).addBoth(self._loaded)
        return waiter

    def _loaded(self, result: Path | Failure) -> None:
        if not isinstance(result, Failure):
            try:
                self._runtime = Runtime.shared(result)
            except Exception:
                result = Failure()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(self._runtime)
