"""The inferlet runtime: programs, instances, messaging, the store, server instances.

`Runtime` is the IRuntime the protocol layer talks to, and a Twisted service:
on start it rescans the program directory and opens the key-value store; on
stop it ends every instance and server ("engine shutting down") and closes
the store. Everything under PIE_HOME:

    $PIE_HOME/programs/<blake3 hex>     uploaded programs (content-addressed)
    $PIE_HOME/kvstore.sqlite3           the inferlets' key-value store

Instances run in an IInferletExecutor (the wasm sandbox or dev mode) against
a host binding from pie.runtime.hostapi; their model commands go to the
IModelService of the model they use.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable

from twisted.application import service
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from pie.interfaces import IInferletExecutor, IInstanceOwner, IModelService, IRuntime, PieError
from pie.metrics import NO_METRICS, Metrics
from pie.namespaces import instance_user
from pie.runtime.chat_template import DEFAULT_MAX_CHARS
from pie.runtime.hostapi import HostApi
from pie.runtime.http import Gate, HttpLimits, ServerInstance
from pie.runtime.instances import Instance, Instances
from pie.runtime.kvstore import DEFAULT_USER_BYTES, DEFAULT_VALUE_BYTES, KeyValueStore
from pie.runtime.messaging import (
    DEFAULT_INBOX_BYTES,
    DEFAULT_SUBSCRIPTION_BYTES,
    Inboxes,
    PubSub,
)
from pie.runtime.outbound import HttpPolicy, OutboundHttp
from pie.runtime.programs import (
    DEFAULT_MAX_PROGRAM_BYTES,
    ProgramStore,
    is_program_hash,
    program_hash,
)

SHUTDOWN_REASON = "engine shutting down"
PREPARED_SOURCE_BYTES = 64 * 2**20
"""Checked programs (their sources) kept for launches; older ones are loaded and checked again."""


@implementer(IRuntime)
class Runtime(service.Service):
    name = "runtime"

    def __init__(
        self,
        home: str,
        model_services: dict[str, IModelService],
        executor: IInferletExecutor,
        reactor=None,
        max_program_size: int = DEFAULT_MAX_PROGRAM_BYTES,
        max_chat_chars: int = DEFAULT_MAX_CHARS,
        attacher: Callable[..., Deferred] | None = None,
        http_policy: HttpPolicy | None = None,
        http_limits: HttpLimits | None = None,
        inbox_bytes: int = DEFAULT_INBOX_BYTES,
        subscription_bytes: int = DEFAULT_SUBSCRIPTION_BYTES,
        store_value_bytes: int = DEFAULT_VALUE_BYTES,
        store_user_bytes: int = DEFAULT_USER_BYTES,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        """attacher(runtime, endpoint, service_type, service_name) -> Deferred of the success
        text: how `attach_remote_service` finds a service type (the daemon passes
        pie.service.servicetypes.attach_remote_service). http_policy: what the inferlets'
        `fetch` may reach (default: nothing). http_limits: what each server instance
        accepts (pie.runtime.http.HttpLimits). inbox_bytes / subscription_bytes: unread
        messages one instance's inbox / one subscription may hold (pie.runtime.messaging).
        store_value_bytes / store_user_bytes: the key-value store's quotas (pie.runtime.kvstore).
        metrics: the daemon's hooks (pie.metrics), handed to each model service added."""
        if reactor is None:
            from twisted.internet import reactor
        self.home = home
        self.reactor = reactor
        self.executor = executor
        self.attacher = attacher
        self.metrics = metrics
        self._services: dict[str, IModelService] = {}
        self.programs = ProgramStore(os.path.join(home, "programs"), reactor, max_program_size)
        self.kvstore = KeyValueStore(
            os.path.join(home, "kvstore.sqlite3"), reactor, store_value_bytes, store_user_bytes
        )
        self.inboxes = Inboxes(max_bytes=inbox_bytes)
        self.pubsub = PubSub(max_bytes=subscription_bytes)
        self.instances = Instances(
            reactor, [self.inboxes.drop_instance, self.pubsub.drop_instance], self.model_services
        )
        self.http = OutboundHttp(reactor, http_policy)
        self.hostapi = HostApi(self, max_chat_chars=max_chat_chars)
        self.servers: dict[str, ServerInstance] = {}
        self.http_limits = http_limits or HttpLimits()
        self.http_connections = self.http_limits.connection_counter()  # all servers together
        self._prepared: OrderedDict[str, object] = OrderedDict()  # hash -> executor.check()
        for name, model_service in model_services.items():
            self.add_model_service(name, model_service)

    # ------------------------------------------------------------------ service

    def startService(self) -> None:
        os.makedirs(self.home, exist_ok=True)
        self.programs.scan()
        self.kvstore.start()
        super().startService()

    def stopService(self):
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        for server_id in list(self.servers):
            await self._stop_server(server_id, SHUTDOWN_REASON)
        for instance in list(self.instances.running.values()):
            self.instances.end(instance, SHUTDOWN_REASON)
        await self.kvstore.stop()

    # ------------------------------------------------------------------ models

    def model_services(self) -> Iterable[IModelService]:
        return self._services.values()

    def add_model_service(self, name: str, model_service: IModelService) -> None:
        """Serve one more model (attach_remote_service plugins call this)."""
        if name in self._services:
            raise PieError(f"a model service named {name!r} is already attached")
        model_service.instance_terminator = self.terminate
        model_service.metrics = self.metrics.model(name)
        self._services[name] = model_service

    def model_status(self) -> list[dict]:
        return [model_service.status() for model_service in self._services.values()]

    def kv_exports(self) -> list[dict]:
        """Every KV export on every model: {"model", "name", "pages"} (the admin's `kv_exports`)."""
        return [
            {"model": model, "name": name, "pages": pages}
            for model, service in self._services.items()
            for name, pages in service.list_exports()
        ]

    def remove_kv_export(self, model: str, name: str) -> bool:
        """Drop one export whoever owns it; False if the model or the export does not exist."""
        service = self._services.get(model)
        return service is not None and service.remove_export(name)

    def attach_remote_service(self, endpoint: str, service_type: str, service_name: str):
        """Attach a model worker through the attacher the daemon was built with."""
        if self.attacher is None:
            return fail(PieError("this daemon attaches no remote services"))
        return self.attacher(self, endpoint, service_type, service_name)

    # ------------------------------------------------------------------ programs

    def program_exists(self, program_hash: str) -> bool:
        return is_program_hash(program_hash) and self.programs.exists(program_hash)

    def add_program(self, data: bytes):
        return ensureDeferred(self._add_program(data))

    async def _add_program(self, data: bytes) -> str:
        self.programs.validate_size(data)
        data = bytes(data)
        pool = self.reactor.getThreadPool()
        digest = await deferToThreadPool(self.reactor, pool, program_hash, data)
        prepared = self._prepared.get(digest) or await self._check(data)
        self._remember(digest, prepared)
        return await self.programs.add(data, digest)

    async def _check(self, program: bytes) -> object:
        """What the executor makes of the program (off the reactor thread: executors
        check in a thread or in the sandbox); PieError if it cannot run it."""
        try:
            return await maybeDeferred(self.executor.check, program)
        except PieError:
            raise
        except Exception as e:
            raise PieError(f"the program cannot be loaded: {type(e).__name__}: {e}") from None

    def _remember(self, digest: str, prepared: object) -> None:
        """Keep what the executor made of a program, for its launches (bounded by size)."""
        self._prepared[digest] = prepared
        self._prepared.move_to_end(digest)
        total = sum(getattr(p, "size", 0) for p in self._prepared.values())
        while total > PREPARED_SOURCE_BYTES and len(self._prepared) > 1:
            _, dropped = self._prepared.popitem(last=False)
            total -= getattr(dropped, "size", 0)

    async def _runnable(self, digest: str) -> object:
        """The program checked by the executor: checked at upload, else loaded and checked
        now (a program found on disk, or one the cache let go)."""
        if not is_program_hash(digest):
            raise PieError(f"invalid program hash {digest!r}: expected 64 lowercase hex digits")
        prepared = self._prepared.get(digest)
        if prepared is None:
            program = await self.programs.load(digest)
            prepared = await self._check(program)
            self._remember(digest, prepared)
        else:
            self._prepared.move_to_end(digest)
        return prepared

    # ------------------------------------------------------------------ instances

    def launch(self, program_hash: str, arguments: list[str], owner: IInstanceOwner):
        try:
            arguments = _checked_arguments(arguments)
        except PieError as e:
            return fail(e)
        return ensureDeferred(self._launch(program_hash, arguments, owner))

    async def _launch(self, digest: str, arguments: list[str], owner: IInstanceOwner) -> str:
        program = await self._runnable(digest)
        return self.start_instance(digest, program, arguments, owner).id

    def start_instance(
        self,
        digest: str,
        program: object,
        arguments: list[str],
        owner: IInstanceOwner | None,
        server_id: str | None = None,
    ) -> Instance:
        """Register an instance (owner first) and run it on the next reactor turn.

        The launch answer (the id) therefore reaches the client before any event
        of the instance, and no event can be lost.
        """
        instance = Instance(digest, arguments, owner, server_id)
        self.instances.register(instance)
        self.inboxes.open(instance.id)
        host = self.hostapi.bind(instance)
        self.reactor.callLater(0, self.instances.start, instance, self.executor, program, host)
        return instance

    def signal(self, instance_id: str, message: str) -> None:
        if not isinstance(instance_id, str) or not isinstance(message, str):
            raise PieError("signal takes an instance id and a message, both strings")
        self.inboxes.push(instance_id, message)

    def terminate(self, instance_id: str, reason: str) -> None:
        if not isinstance(instance_id, str):
            return
        instance = self.instances.running.get(instance_id)
        if instance is not None:
            self.instances.end(instance, reason)
        elif instance_id in self.servers:
            self._stop_server(instance_id, reason)

    # ------------------------------------------------------------------ server instances

    def launch_server(
        self,
        program_hash: str,
        port: int,
        arguments: list[str],
        owner: IInstanceOwner,
        endpoint: IStreamServerEndpoint | None = None,
        gate: Gate | None = None,
    ):
        """A server instance on 127.0.0.1:port, or on `endpoint` with `gate` (pie.runtime.http:
        what the daemon's own servers use); Deferred firing with its id."""
        try:
            arguments = _checked_arguments(arguments)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise PieError(f"port must be an integer 0..65535, not {port!r}")
        except PieError as e:
            return fail(e)
        return ensureDeferred(
            self._launch_server(program_hash, port, arguments, owner, endpoint, gate)
        )

    async def _launch_server(
        self, digest: str, port: int, arguments: list[str], owner, endpoint, gate
    ) -> str:
        program = await self._runnable(digest)
        server = ServerInstance(
            self, digest, program, arguments, owner, port, self.http_limits, endpoint, gate
        )
        await server.listen()
        self.servers[server.id] = server
        return server.id

    def _stop_server(self, server_id: str, reason: str) -> Deferred:
        """Deferred fired when the server's port is closed."""
        server = self.servers.pop(server_id, None)
        return succeed(None) if server is None else server.stop(reason)

    # ------------------------------------------------------------------ debug queries

    def debug_query(self, query: str, asker: Instance | None = None) -> str:
        """Pie's runtime debug queries (spec §3.6), answered for the asking instance's user.

        A user sees only the instances of its own user (the owning connection's
        token subject); an admin (role Admin, or any asker without auth or
        without a connection) sees all, and alone may list programs and the
        program directory.
        """
        admin, user = _asker(asker)
        # as in Pie, the per-request instances of HTTP servers are not counted or listed
        running = {
            i: inst
            for i, inst in self.instances.running.items()
            if inst.server_id is None and (admin or _asker(inst)[1] == user)
        }
        if query in ("list_in_memory_programs", "get_cache_dir") and not admin:
            return f"{query} requires a token with role Admin"
        if query == "ping":
            return "pong"
        if query == "get_instance_count":
            return str(len(running))
        if query == "get_server_instance_count":
            return str(len(self.servers))
        if query == "list_running_instances":
            return "\n".join(
                f"Instance ID: {i.id}, Program Hash: {i.program_hash}" for i in running.values()
            )
        if query == "list_in_memory_programs":
            return "\n".join(self.programs.hashes())
        if query == "get_cache_dir":
            return self.programs.directory
        return f"Unknown query: {query}"


def _asker(instance: Instance | None) -> tuple[bool, str | None]:
    """(is admin, user) of an instance, from its owner (a client connection, see pie.server)."""
    user = instance_user(instance)
    if user is None:  # no connection behind it: the daemon's own, or a test's
        return True, None
    return bool(getattr(instance.owner, "is_admin", False)), user


def _checked_arguments(arguments: list[str]) -> list[str]:
    if not isinstance(arguments, list | tuple) or not all(isinstance(a, str) for a in arguments):
        raise PieError("arguments must be a list of strings")
    return list(arguments)
