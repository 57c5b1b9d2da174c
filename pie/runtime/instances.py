"""Instance lifecycle: the running table and each instance's single ending.

An instance is registered (with its owner) before its program runs, and it
ends exactly once, whichever comes first: its program returns or raises, a
command of it fails (InstanceFault), a bad host call, or someone terminates it
(user, closed socket, server stop). Ending removes it from the running table,
stops its execution, drops its messages and subscriptions, frees what it holds
in every model service, and tells its owner `instance_terminated(reason)` —
in that order, so the owner's event is the last thing it hears.

Reasons follow Pie: "instance normally finished"; "Runtime error: <message>"
when the program fails (an exception, a trap, a limit); the fault text when a
model command of it fails (InstanceFault); the kill reason given to
terminate().
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pie.interfaces import IInstanceOwner, IModelService, PieError

NORMAL_FINISH = "instance normally finished"


class Instance:
    """One running program: who owns it, what it was given, what it holds."""

    def __init__(
        self,
        program_hash: str,
        arguments: list[str],
        owner: IInstanceOwner | None,
        server_id: str | None = None,
    ) -> None:
        self.id = str(uuid.uuid4())
        self.program_hash = program_hash
        self.arguments = list(arguments)
        self.owner = owner
        self.server_id = server_id  # set for the per-request instances of a server
        self.return_value: str | None = None
        self.queues: dict[int, IModelService] = {}  # queue id -> the service that made it
        self.grammars: dict[int, tuple[int, object]] = {}  # matcher id -> (service id, Matcher)
        self.execution = None  # IExecution once started
        self.fault: str | None = None  # a failure that will end it (set before the end runs)
        self.ended = False
        self.reason: str | None = None
        self._watchers: list[Deferred] = []
        self._timers: set[Deferred] = set()  # pending sleeps and fetches, cancelled at the end

    def add_timer(self, timer: Deferred) -> Deferred:
        """Track a sleep or a fetch so that ending the instance cancels it (the delayed
        call, the connection)."""
        self._timers.add(timer)

        def done(result):
            self._timers.discard(timer)
            return result

        return timer.addBoth(done)

    def cancel_timers(self) -> None:
        for timer in list(self._timers):
            timer.cancel()

    def when_ended(self) -> Deferred:
        """A Deferred firing with (reason, return value) once the instance has ended."""
        if self.ended:
            return succeed((self.reason, self.return_value))
        d: Deferred = Deferred()
        self._watchers.append(d)
        return d

    def announce_end(self) -> None:
        watchers, self._watchers = self._watchers, []
        for d in watchers:
            d.callback((self.reason, self.return_value))

    def __repr__(self) -> str:
        return f"<Instance {self.id} of {self.program_hash[:12]}>"


def failure_reason(failure: Failure) -> str:
    """The termination reason for an execution that failed by itself.

    Whatever the executor reports — a guest exception (with its traceback), a
    trap, a deadline, a memory limit — is a runtime error, as Pie's
    "Runtime error: <text>". Faults the runtime itself decided (a failed model
    command, a broken host call, a kill) never come through here: they are
    recorded on the instance first and used verbatim.
    """
    error = failure.value
    text = str(error) if isinstance(error, PieError) else f"{type(error).__name__}: {error}"
    return text if text.startswith("Runtime error") else f"Runtime error: {text}"


class Instances:
    """The running table and the ending of instances."""

    log = Logger()

    def __init__(
        self,
        reactor,
        cleanups: Iterable[Callable[[str], None]],
        model_services: Callable[[], Iterable[IModelService]],
    ) -> None:
        self._reactor = reactor
        self._cleanups = list(cleanups)  # e.g. drop the inbox and the subscriptions
        self._model_services = model_services
        self.running: dict[str, Instance] = {}

    def register(self, instance: Instance) -> None:
        self.running[instance.id] = instance

    def start(self, instance: Instance, executor, program: bytes, host) -> None:
        """Run the program (called on a later reactor turn than the launch reply)."""
        if instance.ended:
            return
        try:
            execution = executor.run(program, instance.arguments, host)
        except Exception:
            self.end(instance, failure_reason(Failure()))
            return
        instance.execution = execution
        if instance.ended:  # terminated while the executor was starting it
            execution.finished.addErrback(lambda _: None)
            self._guard("kill", execution.kill, instance.reason)
            return
        execution.finished.addCallbacks(
            self._finished, self._failed, callbackArgs=(instance,), errbackArgs=(instance,)
        )

    def fault(self, instance: Instance, reason: str) -> None:
        """End the instance soon with `reason`; it wins over whatever the program does meanwhile.

        The end runs on a later reactor turn because a fault is usually noticed
        inside one of the instance's own host calls, where killing it would
        pull the ground from under the executor's feet.
        """
        if instance.ended or instance.fault is not None:
            return
        instance.fault = reason
        self._reactor.callLater(0, self.end, instance, reason)

    def end(self, instance: Instance, reason: str) -> None:
        if instance.ended:
            return
        instance.ended = True
        instance.reason = reason
        self.running.pop(instance.id, None)
        execution = instance.execution
        if execution is not None and not execution.finished.called:
            self._guard("kill", execution.kill, reason)
        instance.cancel_timers()
        for cleanup in self._cleanups:
            self._guard("cleanup", cleanup, instance.id)
        for service in list(self._model_services()):
            self._guard("destroy_instance", service.destroy_instance, instance.id)
        if instance.owner is not None:
            self._guard(
                "instance_terminated", instance.owner.instance_terminated, instance.id, reason
            )
        instance.announce_end()

    # ------------------------------------------------------------------ execution outcome

    def _finished(self, value, instance: Instance) -> None:
        if instance.ended:
            return
        if instance.fault is not None:
            self.end(instance, instance.fault)
            return
        if value is not None and not isinstance(value, str):
            self.end(instance, f"Runtime error: main returned {type(value).__name__}, not a string")
            return
        if value is not None:
            instance.return_value = value
        if instance.return_value is not None and instance.owner is not None:
            self._guard(
                "instance_message",
                instance.owner.instance_message,
                instance.id,
                instance.return_value,
            )
        self.end(instance, NORMAL_FINISH)

    def _failed(self, failure: Failure, instance: Instance) -> None:
        if instance.ended:
            return
        if instance.fault is not None:
            self.end(instance, instance.fault)
            return
        if not failure.check(PieError):
            self.log.failure("instance {id} failed", failure, id=instance.id)
        self.end(instance, failure_reason(failure))

    def _guard(self, what: str, function, *args) -> None:
        """Call a collaborator; its error is logged and never stops the ending."""
        try:
            function(*args)
        except Exception:
            self.log.failure("{what} failed while ending an instance", what=what)
