"""WasmExecutor: inferlets as CPython inside WebAssembly (the sandbox).

One runtime component (see build.py) is loaded once per process and
instantiated per instance in its own wasmtime Store:

- isolation: the guest sees nothing but the WIT `host` imports and a WASI
  context with no preopened directories, no environment, no arguments, no
  network and no stdin; stdout/stderr go to the server log, prefixed with the
  instance. A trap ends only its own Store.
- memory: `Store.set_limits(memory_size=...)`; a hog traps or gets MemoryError.
- CPU: epoch interruption. A ticker thread bumps the engine epoch every
  TICK_S; when a store's deadline passes, wasmtime calls `_on_epoch` on the
  thread running the guest, which asks the GuestScheduler what to do: go on,
  pause (the turn is over: the reactor runs, a later turn continues the step),
  or trap (killed; `deadline_ms` without a host call; over its CPU share).
- parking: a step returns when every guest task waits on a host future; the
  instance then costs memory only, and is resumed from the reactor when a
  result arrives, so many parked instances join one model batch.
- kill: dropping the Store (after the current step, if one is running).

Every wasm call runs on a guest thread of the GuestScheduler
(pie.runtime.executors.scheduler), never on the reactor thread, and one at a
time (the scheduler's baton): wasmtime-py keeps the exception raised by a host
function in a process global, so calls into two stores must not overlap. A
guest holds the reactor for at most one slice (`slice_ms`, 50 ms by default)
plus the host call it is in.
"""

from __future__ import annotations

import ctypes
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
from wasmtime import _ffi as ffi
from wasmtime.component import Component, Linker
from zope.interface import implementer

from pie.interfaces import IInferletExecutor, InstanceFault, PieError
from pie.runtime.executors import build, program
from pie.runtime.executors.base import Execution, Killed, Step
from pie.runtime.executors.fastcall import ExportSignature, ValueMismatch, add_host_func
from pie.runtime.executors.scheduler import (
    DEFAULT_CPU_PERCENT,
    DEFAULT_CPU_WINDOW_S,
    DEFAULT_MAX_PAUSED,
    DEFAULT_SLICE_MS,
    GuestScheduler,
)
from pie.runtime.hostcalls import HOST_CALLS
from pie.runtime.sandbox.loader import COMPILE_ONLY, COMPILED
from pie.runtime.witgen import kebab, resume_export

log = Logger()

TICK_S = 0.01
DEFAULT_DEADLINE_MS = 500
DEFAULT_MEMORY_LIMIT = 256 * 1024 * 1024
OUTPUT_LINE_LIMIT = 2000
"""Characters of one guest stdout/stderr write kept in the server log."""
COMPILED_CACHE_BYTES = 64 * 1024 * 1024
"""Marshalled code the executor keeps for programs (see WasmExecutor.compiled); a program
whose code is over a quarter of it compiles in each instance instead."""
CHECK_DEADLINE_MS = 60_000
"""Longest the compiler may run on one program (a check runs no program code)."""
DEFAULT_OUTPUT_BYTES = 256 * 1024
"""Characters of stdout/stderr logged per instance (`inferlet_output_bytes`); the rest are
dropped with one notice, so a print loop cannot flood the daemon's log."""

_running = threading.local()
"""`.execution`: the instance whose wasm call runs on this thread; host imports and the
epoch callback act on it. Per thread: a paused step keeps its own on its own thread."""


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


_EpochCallback = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ffi.wasmtime_update_deadline_kind_t),
)
_CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _no_finalizer(data) -> None:  # noqa: ANN001
    """The callback's data is unused (it finds its execution per thread): nothing to free."""


@_EpochCallback
def _on_epoch(context, data, delta, kind) -> int:  # noqa: ANN001
    """A store's epoch deadline passed (on the thread running it): go on, pause, or trap."""
    execution = getattr(_running, "execution", None)
    try:
        if execution is None:
            fault = InstanceFault("sandbox error: a guest ran outside of a step")
        else:
            fault = execution.on_epoch()
    except BaseException as error:  # noqa: BLE001 - never let an exception into wasmtime
        fault = InstanceFault(f"sandbox error: {type(error).__name__}: {error}")
    if fault is None:
        delta[0] = execution.epoch_ticks()
        kind[0] = _CONTINUE
        return 0
    if execution is not None:
        execution.sched.interrupt = execution.sched.interrupt or fault
    return ctypes.cast(ffi.wasmtime_error_new(str(fault).encode()), ctypes.c_void_p).value or 0


def _new_store(
    runtime: Runtime, execution: WasmExecution, wasi: wasmtime.WasiConfig
) -> wasmtime.Store:
    """A store with the executor's limits; its epoch deadline calls back `execution`."""
    store = wasmtime.Store(runtime.engine)
    store.set_wasi(wasi)
    store.set_limits(memory_size=execution.executor.memory_limit)
    ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), _on_epoch, None, _no_finalizer)
    store.set_epoch_deadline(execution.epoch_ticks())
    return store


def _compile_in_sandbox(
    runtime: Runtime, execution: WasmExecution, files: list
) -> tuple[str | None, str]:
    """The program's modules compiled and marshalled by a throwaway instance that runs
    none of its code (so the result is not the program's to forge): (code, "") or
    (None, what went wrong). Called inside a step of `execution` (its limits apply)."""
    store = _new_store(runtime, execution, wasmtime.WasiConfig())
    try:
        with _Active(execution):
            instance = runtime.linker.instantiate(store, runtime.component)
            funcs = {e: instance.get_func(store, runtime.exports[e]) for e in ("start", "outcome")}
            start = _signature(runtime, "start", funcs["start"], store)
            if not start.call(funcs["start"], store, [*files, (COMPILE_ONLY, "")], []):
                return None, "the compiler did not finish"
            outcome = _signature(runtime, "outcome", funcs["outcome"], store)
            result = outcome.call(funcs["outcome"], store)
        return (result.payload, "") if result.tag == "ok" else (None, result.payload)
    except (wasmtime.Trap, wasmtime.WasmtimeError, ValueMismatch) as error:
        return None, str(execution._describe(error))
    finally:
        store.close()


_RESUME_EXPORTS = {c.name: resume_export(c) for c in HOST_CALLS.values() if c.mode == "async"}
"""Async host call -> the export that delivers its result."""


def _export_names() -> list[str]:
    return ["start", "outcome", *sorted(set(_RESUME_EXPORTS.values()))]


def _host_import(name: str, mode: str):
    """The wasmtime host function for one row of the host-call table."""

    def sync_call(*args: Any) -> Any:
        return _running.execution.host_import(name, args, False)

    def async_call(*args: Any) -> int:
        return _running.execution.host_import(name, args, True)

    def command_call(*args: Any) -> None:
        _running.execution.host_import(name, args, False)

    return {"sync": sync_call, "async": async_call, "command": command_call}[mode]


class _GuestKilled(Exception):
    """Raised out of a host import to unwind a killed guest (becomes a trap)."""


class WasmExecution(Execution):
    def __init__(
        self, executor: WasmExecutor, checked: program.Checked, arguments: list[str], host: Any
    ) -> None:
        super().__init__(host, executor.scheduler)
        self.executor = executor
        self.deadline_s = executor.deadline_ms / 1000
        self._checked = checked
        self._files = sorted(checked.files.items())
        self._arguments = list(arguments)
        self._runtime: Runtime | None = None
        self._store: wasmtime.Store | None = None
        self._instance = None
        self._funcs: dict[str, Any] = {}
        self._label = ""
        self._output_left = executor.output_bytes

    def begin(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.start()

    # ------------------------------------------------------------ Execution hooks

    def _enter_start(self) -> Step:
        runtime = self._runtime
        files = self._files
        code = self.executor.compiled(runtime, self._checked, files, self)
        if self.sched.interrupt is not None:  # killed, or out of time, while compiling
            raise self.sched.interrupt
        if code is not None:
            files = [*files, (COMPILED, code)]
        wasi = wasmtime.WasiConfig()  # no preopens, env, args, stdin or network
        wasi.stdout_custom = self._output("stdout")
        wasi.stderr_custom = self._output("stderr")
        store = self._store = _new_store(runtime, self, wasi)
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
        if self.sched.interrupt is not None:  # the epoch callback trapped it, saying why
            return self.sched.interrupt
        if isinstance(error, ValueMismatch):
            return InstanceFault(str(error))
        if not isinstance(error, wasmtime.Trap | wasmtime.WasmtimeError):
            return InstanceFault(f"sandbox error: {type(error).__name__}: {error}")
        text = str(error)
        found = re.search(r"wasm trap: (.+)", text)
        trap = found.group(1).strip() if found else (text.strip().splitlines() or ["?"])[0]
        if "memory" in trap and ("limit" in trap or "grow" in trap):
            return InstanceFault(self._memory_message())
        return InstanceFault(f"trap: {trap}")

    def _memory_message(self) -> str:
        return f"memory limit exceeded ({self.executor.memory_limit // (1024 * 1024)} MiB)"

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
        self._store.set_epoch_deadline(self.epoch_ticks())
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
        self.sched.call_mark = time.monotonic()  # the CPU deadline counts from the last call
        return result

    def epoch_ticks(self) -> int:
        """Ticks until the scheduler must look at this step (end of turn, or CPU deadline)."""
        return self.scheduler.ticks(self, TICK_S, self.deadline_s)

    def on_epoch(self) -> InstanceFault | None:
        """The epoch deadline passed: None to go on (after a pause, maybe), or why it traps."""
        return self.scheduler.pause(self, self.deadline_s)

    def _output(self, stream: str):
        def write(data: bytes) -> None:
            text = data.decode("utf-8", "replace").rstrip("\n")[:OUTPUT_LINE_LIMIT]
            if not text:
                return
            if self._output_left < 0:
                return
            self._output_left -= len(text)
            if self._output_left >= 0:
                log.info(
                    "[{label}] {stream}: {text}", label=self._prefix(), stream=stream, text=text
                )
            else:
                log.info(
                    "[{label}] more output dropped (over {limit} characters, "
                    "inferlet_output_bytes)",
                    label=self._prefix(),
                    limit=self.executor.output_bytes,
                )

        return write


class _CompileJob(WasmExecution):
    """Checks a program for WasmExecutor.check: compiles it in a throwaway instance.

    A step like any other (on a guest thread, paused at the slice, within the memory
    limit), so a big or hostile program costs the reactor nothing; it may compute
    for up to CHECK_DEADLINE_MS, as it runs only the compiler. `finished` fires with
    the marshalled code, or fails with what is wrong with the program.
    """

    def __init__(self, executor: WasmExecutor, checked: program.Checked) -> None:
        super().__init__(executor, checked, [], None)
        self.deadline_s = CHECK_DEADLINE_MS / 1000

    def _enter_start(self) -> Step:
        code, error = _compile_in_sandbox(self._runtime, self, self._files)
        if self.sched.interrupt is not None:
            raise self.sched.interrupt
        return ("done", code) if code is not None else ("failed", error)


class _Active:
    """Marks which instance the host imports belong to during one wasm call.

    Restores the previous one on exit: a host import may (through a kill and
    the runtime's callbacks) start another instance before it returns.
    """

    __slots__ = ("_execution", "_previous")

    def __init__(self, execution: WasmExecution) -> None:
        self._execution = execution

    def __enter__(self) -> None:
        self._previous = getattr(_running, "execution", None)
        _running.execution = self._execution

    def __exit__(self, *exc: Any) -> None:
        _running.execution = self._previous


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
        slice_ms: int = DEFAULT_SLICE_MS,
        cpu_percent: int = DEFAULT_CPU_PERCENT,
        cpu_window_s: int = DEFAULT_CPU_WINDOW_S,
        cpu_policy: str = "throttle",
        max_paused: int = DEFAULT_MAX_PAUSED,
        program_limits: program.Limits = program.DEFAULT_LIMITS,
        reactor: Any = None,
        output_bytes: int = DEFAULT_OUTPUT_BYTES,
    ) -> None:
        """`artifact` pins a compiled runtime file (no build); default: the cached build.

        The scheduling limits (slice, CPU share, paused steps) are GuestScheduler's.
        """
        self.home = home
        self.artifact = artifact
        self.memory_limit = memory_limit
        self.deadline_ms = deadline_ms
        self.output_bytes = output_bytes
        self.limits = program_limits
        self.scheduler = GuestScheduler(
            reactor, slice_ms, cpu_percent, cpu_window_s, cpu_policy, max_paused
        )
        self._runtime: Runtime | None = None
        self._waiters: list[Deferred] = []
        self._compiled: OrderedDict[bytes, str | None] = OrderedDict()
        self._compiled_bytes = 0

    def compiled(
        self,
        runtime: Runtime,
        checked: program.Checked,
        files: list[tuple[str, str]],
        execution: WasmExecution,
    ) -> str | None:
        """The marshalled code of a program's modules, compiled in the sandbox once per
        program (by its check, or its first instance; the recent ones, COMPILED_CACHE_BYTES
        in all): instances load it rather than compile the same sources again, a third of
        their start. None: compile as usual."""
        key = checked.key
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        code, _ = _compile_in_sandbox(runtime, execution, files)  # (the instance says why)
        if execution.sched.interrupt is not None:
            return None  # cut short: says nothing about the program
        self._remember_compiled(checked, code)
        return code

    def _remember_compiled(self, checked: program.Checked, code: str | None) -> None:
        size = len(code or "")
        if checked.key in self._compiled or size > COMPILED_CACHE_BYTES // 4:
            return
        self._compiled[checked.key] = code
        self._compiled_bytes += size
        while self._compiled_bytes > COMPILED_CACHE_BYTES:
            _, dropped = self._compiled.popitem(last=False)
            self._compiled_bytes -= len(dropped or "")

    def check(self, program_bytes: bytes) -> Deferred:
        """Deferred firing with the program checked (program.Checked); PieError if not valid.

        Nothing of it runs on the reactor thread: the archive is unzipped in a thread,
        and the modules are compiled in the sandbox by a _CompileJob, whose code the
        program's instances then load instead of compiling again.
        """
        return Deferred.fromCoroutine(self._check(bytes(program_bytes)))

    async def _check(self, program_bytes: bytes) -> program.Checked:
        checked = await deferToThread(program.prepare, program_bytes, self.limits)
        runtime = await self.ready()
        job = _CompileJob(self, checked)
        job.begin(runtime)
        try:
            code = await job.finished
        except InstanceFault as fault:
            raise PieError(str(fault)) from None
        self._remember_compiled(checked, code)
        return checked

    def run(
        self, program_bytes: bytes | program.Checked, arguments: list[str], host: Any
    ) -> WasmExecution:
        """Run main(args) to its first park now (once the runtime is loaded, if it is not yet).

        Raises PieError if the program is not valid.
        """
        checked = program_bytes
        if not isinstance(checked, program.Checked):
            checked = program.check(program_bytes, self.limits)
        execution = WasmExecution(self, checked, arguments, host)

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
