"""Doubles for the runtime's tests: a script executor, a model service, an owner.

The script executor runs "programs" that are Python coroutines taking
(host, args) and driving `host.call(name, args)` exactly as the real
executors do; the program bytes are a registered name. The model service
double keeps what each instance allocated so a test can see it freed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Coroutine

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from pie.interfaces import (
    IExecution,
    IInferletExecutor,
    IInstanceOwner,
    IModelService,
    InstanceFault,
    ITokenizer,
    PieError,
)
from pie.runtime.runtime import Runtime
from pie.service.servicetypes import attach_remote_service

Script = Callable[[object, list[str]], Coroutine]


@implementer(IExecution)
class ScriptExecution:
    def __init__(self, coro: Coroutine) -> None:
        self.finished: Deferred = Deferred()
        self.killed: str | None = None
        self._task = ensureDeferred(coro)
        self._task.addBoth(self._done)

    def _done(self, result) -> None:
        if self.finished.called:
            return
        if isinstance(result, Failure):
            self.finished.errback(result)
        else:
            self.finished.callback(result)

    def kill(self, reason: str) -> None:
        self.killed = reason
        if not self.finished.called:
            self.finished.errback(InstanceFault(reason))
        self._task.cancel()


@implementer(IInferletExecutor)
class ScriptExecutor:
    name = "script"

    def __init__(self) -> None:
        self.scripts: dict[bytes, Script] = {}
        self.executions: list[ScriptExecution] = []
        self.checks = 0

    def program(self, script: Script) -> bytes:
        """Register a script; its program bytes (upload these)."""
        source = f"script {script.__qualname__} {len(self.scripts)}".encode()
        self.scripts[source] = script
        return source

    def check(self, program: bytes) -> bytes:
        self.checks += 1
        if program not in self.scripts:
            raise PieError("SyntaxError: invalid syntax (main.py, line 1)")
        return program

    def run(self, program: bytes, arguments: list[str], host) -> ScriptExecution:
        execution = ScriptExecution(self.scripts[program](host, list(arguments)))
        self.executions.append(execution)
        return execution


@implementer(ITokenizer)
class CharTokenizer:
    """One token per character (its code point); enough to test the plumbing."""

    chat_template = "{{ messages }}"
    eos_token_ids = [0]
    bos_token = "<s>"
    bos_token_id = 60  # "<": any id, to see it reach model_info
    eos_token = "</s>"

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def vocabs(self) -> tuple[list[int], list[bytes]]:
        return list(range(128)), [bytes([i]) for i in range(128)]

    def token_table(self) -> tuple[list[bytes | None], frozenset[int]]:
        return [self.eos_token.encode()] + [bytes([i]) for i in range(1, 128)], frozenset({0})


_queue_ids = itertools.count(1)


@implementer(IModelService)
class FakeModelService:
    kv_page_size = 16
    dist_size = 2

    def __init__(self, name: str = "fake-model", service_id: int = 0) -> None:
        self.name = name
        self.service_id = service_id
        self.tokenizer = CharTokenizer()
        self.submitted: list[tuple[str, int, str, tuple]] = []
        self.pages: dict[str, set[int]] = {}
        self.priorities: dict[int, str] = {}
        self.destroyed: list[str] = []
        self.failing: dict[str, str] = {}  # op -> InstanceFault text
        self.held: dict[str, Deferred] = {}  # op -> Deferred the test fires

    def status(self) -> dict:
        return {"model_name": self.name, "kv_page_size": self.kv_page_size}

    def create_queue(self, instance_id: str, user: str | None = None) -> int:
        return next(_queue_ids)

    def set_priority(self, instance_id: str, queue_id: int, priority: str) -> None:
        self.priorities[queue_id] = priority

    def submit(self, instance_id: str, queue_id: int, op: str, *args):
        self.submitted.append((instance_id, queue_id, op, args))
        if op in self.failing:
            return fail(InstanceFault(self.failing[op]))
        if op in self.held:
            return self.held[op]
        if op == "allocate_kv_pages":
            self.pages.setdefault(instance_id, set()).update(args[0])
        elif op == "forward_text":
            return succeed([([1, 2], [0.75, 0.25]) for _ in args[-1]])
        elif op == "generate":  # token 1 until a stop token or max_tokens
            max_tokens, stop_tokens = args[-3], args[-2]
            return succeed([1] if 1 in stop_tokens else [1] * max_tokens)
        elif op == "synchronize":
            return succeed(True)
        elif op == "queue_debug_query":
            return succeed("pong" if args[0] == "ping" else "?")
        return succeed(None)

    def list_exports(self) -> list[tuple[str, int]]:
        return [("prefix", 3)]

    def remove_export(self, name: str) -> bool:
        return name == "prefix"

    def destroy_instance(self, instance_id: str) -> None:
        self.destroyed.append(instance_id)
        self.pages.pop(instance_id, None)


@implementer(IInstanceOwner)
class RecordingOwner:
    """Keeps every event; `ended(id)` fires with the termination reason."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self._waiters: dict[str, list[Deferred]] = {}
        self._reasons: dict[str, str] = {}
        self._listeners: dict[tuple[str, str], list[Deferred]] = {}

    def instance_message(self, instance_id: str, message: str) -> None:
        self.events.append(("message", instance_id, message))
        for d in self._listeners.pop((instance_id, message), []):
            reactor.callLater(0, d.callback, None)  # after the sender's step, not inside it

    def heard(self, instance_id: str, message: str) -> Deferred:
        """Fires once the instance has sent this message and its current step is over."""
        if message in self.messages(instance_id):
            return succeed(None)
        d: Deferred = Deferred()
        self._listeners.setdefault((instance_id, message), []).append(d)
        return d

    def instance_terminated(self, instance_id: str, reason: str) -> None:
        self.events.append(("terminated", instance_id, reason))
        self._reasons[instance_id] = reason
        for d in self._waiters.pop(instance_id, []):
            d.callback(reason)

    def ended(self, instance_id: str) -> Deferred:
        if instance_id in self._reasons:
            return succeed(self._reasons[instance_id])
        d: Deferred = Deferred()
        self._waiters.setdefault(instance_id, []).append(d)
        return d

    def messages(self, instance_id: str) -> list[str]:
        return [m for kind, i, m in self.events if kind == "message" and i == instance_id]

    def terminations(self, instance_id: str) -> list[str]:
        return [m for kind, i, m in self.events if kind == "terminated" and i == instance_id]


def make_runtime(
    testcase, home: str | None = None, executor=None, services=None, **kwargs
) -> Runtime:
    """A started Runtime in a fresh (or the given) PIE_HOME, stopped at cleanup."""
    home = home or os.path.abspath(testcase.mktemp())
    runtime = Runtime(
        home,
        services if services is not None else {"fake": FakeModelService()},
        executor if executor is not None else ScriptExecutor(),
        **{"attacher": attach_remote_service, **kwargs},
    )
    runtime.startService()
    testcase.addCleanup(lambda: runtime.stopService() if runtime.running else None)
    return runtime


async def launched(runtime: Runtime, script: Script, arguments=(), owner=None):
    """Upload and launch a script; (instance id, owner)."""
    owner = owner or RecordingOwner()
    digest = await runtime.add_program(runtime.executor.program(script))
    instance_id = await runtime.launch(digest, list(arguments), owner)
    return instance_id, owner
