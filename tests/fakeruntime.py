"""A runtime test double: instances that the test drives by hand.

It implements IRuntime the way the server relies on it (owner registered
before launch answers, exactly one termination, unknown ids ignored by
terminate), and lets a test make an instance send, finish or fail at will.
Programs live in memory, or in a real pie.runtime.programs.ProgramStore when
a directory is given (for restart tests).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from pie.interfaces import IInstanceOwner, IRuntime, PieError
from pie.server.uploads import hash_program


@dataclass
class FakeInstance:
    runtime: FakeRuntime
    instance_id: str
    program_hash: str
    arguments: list[str]
    owner: IInstanceOwner
    server_port: int | None = None
    inbox: list[str] = field(default_factory=list)
    ended: str | None = None

    def send(self, message: str) -> None:
        self.owner.instance_message(self.instance_id, message)

    def finish(self, reason: str = "instance normally finished") -> None:
        self.runtime.terminate(self.instance_id, reason)


@implementer(IRuntime)
class FakeRuntime:
    def __init__(self, store=None) -> None:
        self.store = store
        self.programs: dict[str, bytes] = {}
        self.instances: dict[str, FakeInstance] = {}
        self.all_instances: list[FakeInstance] = []
        self.hold_launches = False
        self.held: list[tuple[Deferred, str]] = []
        self.on_start: Callable[[FakeInstance], None] | None = None
        self.attached: list[tuple[str, str, str]] = []
        self.status = [{"model_name": "fake", "kv_page_size": 16}]
        self.exports = ["pinned"]  # the KV exports the admin queries see, on model "m"
        self._launch_waiters: list[Deferred] = []
        self._signal_waiters: list[Deferred] = []

    # -- IRuntime
    def program_exists(self, program_hash: str) -> bool:
        if self.store is not None:
            return self.store.exists(program_hash)
        return program_hash in self.programs

    def add_program(self, data: bytes):
        if data.startswith(b"invalid"):
            return fail(PieError("program does not compile: invalid syntax"))
        if self.store is not None:
            self.store.validate_size(data)
            return self.store.add(data)
        digest = hash_program(data)
        self.programs[digest] = data
        return succeed(digest)

    def launch(self, program_hash: str, arguments: list[str], owner: IInstanceOwner):
        return self._start(program_hash, arguments, owner, None)

    def launch_server(self, program_hash, port, arguments, owner):
        return self._start(program_hash, arguments, owner, port)

    def signal(self, instance_id: str, message: str) -> None:
        if message == "overflow":
            raise PieError("inbox full")
        self.instances[instance_id].inbox.append(message)
        waiters, self._signal_waiters = self._signal_waiters, []
        for waiter in waiters:
            waiter.callback(message)

    def terminate(self, instance_id: str, reason: str) -> None:
        instance = self.instances.pop(instance_id, None)
        if instance is not None:
            instance.ended = reason
            instance.owner.instance_terminated(instance_id, reason)

    def model_status(self) -> list[dict]:
        return self.status

    def kv_exports(self) -> list[dict]:
        return [{"model": "m", "name": name, "pages": 2} for name in self.exports]

    def remove_kv_export(self, model: str, name: str) -> bool:
        if model != "m" or name not in self.exports:
            return False
        self.exports.remove(name)
        return True

    def attach_remote_service(self, endpoint: str, service_type: str, service_name: str):
        if service_type != "l4m":
            return fail(PieError(f"Unknown service type: {service_type}"))
        self.attached.append((endpoint, service_type, service_name))
        return succeed(f"attached {service_name}")

    # -- for tests
    def next_launch(self) -> Deferred:
        """Fires with the next FakeInstance started."""
        d: Deferred = Deferred()
        self._launch_waiters.append(d)
        return d

    def next_signal(self) -> Deferred:
        """Fires with the next message signalled to any instance."""
        d: Deferred = Deferred()
        self._signal_waiters.append(d)
        return d

    def _start(self, program_hash, arguments, owner, port):
        if not self.program_exists(program_hash):
            return fail(PieError(f"No such program with hash={program_hash}"))
        instance = FakeInstance(self, str(uuid.uuid4()), program_hash, list(arguments), owner, port)
        # The owner is known from here on: events may flow before launch answers.
        self.instances[instance.instance_id] = instance
        self.all_instances.append(instance)
        if self.on_start is not None:
            self.on_start(instance)
        if self.hold_launches:
            answer: Deferred = Deferred()
            self.held.append((answer, instance.instance_id))
        else:
            answer = succeed(instance.instance_id)
        waiters, self._launch_waiters = self._launch_waiters, []
        for waiter in waiters:
            waiter.callback(instance)
        return answer

    def release_launches(self) -> None:
        """Answer the launches held back by hold_launches."""
        held, self.held = self.held, []
        for answer, instance_id in held:
            answer.callback(instance_id)
