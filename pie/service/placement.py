"""Several workers serving one model name: a pool of model services, and the l4m attach.

Inferlets see one model (one name, one service id); behind it a ModelPool
holds one pie.service.service.ModelService per attached worker. An instance's
KV pages live on one worker only (its first create_queue places it on the
worker with the fewest instances, then the most free pages), so every
command of that instance goes to that worker's service; different instances
spread across workers (data parallelism).

When a worker is lost, the pool terminates exactly the instances placed on
it (reason: "model worker <name> at <endpoint> lost: ..."), forgets the
worker, and keeps serving with the others; the same worker name can be
attached again. KV exports are per worker: an instance can import only what
was exported on its own worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from twisted.internet.defer import Deferred, ensureDeferred, fail, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

import pie
from pie.interfaces import IModelService, InstanceFault, PieError
from pie.metrics import NO_MODEL_METRICS, ModelMetrics
from pie.remote.client import RemoteWorker, connect_worker
from pie.remote.wire import WORKER_TOKEN_ENV, WORKER_TOKEN_FILE, worker_token
from pie.service.service import ModelService

log = Logger()


@dataclass
class Member:
    """One worker of a pool and the model service in front of it."""

    name: str
    endpoint: str
    worker: RemoteWorker
    service: ModelService
    instances: set[str]


@implementer(IModelService)
class ModelPool:
    """IModelService over the model services of every worker attached for one model name."""

    def __init__(self, runtime: object, first: Member) -> None:
        self._runtime = runtime
        self.name = first.service.name
        self.service_id = first.service.service_id  # stays the pool's id for the daemon's life
        self.kv_page_size = first.service.kv_page_size
        self.dist_size = first.service.dist_size
        self.tokenizer = first.service.tokenizer
        self._info = first.worker.info
        self.members: dict[str, Member] = {}
        self._placement: dict[str, Member] = {}
        self._metrics: ModelMetrics = NO_MODEL_METRICS
        self.add(first)

    @property
    def metrics(self) -> ModelMetrics:
        """The model's metrics hooks (the runtime sets them), shared by every member's service."""
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: ModelMetrics) -> None:
        self._metrics = metrics
        for member in self.members.values():
            member.service.metrics = metrics

    # ------------------------------------------------------------------ membership

    def check_compatible(self, worker: RemoteWorker) -> None:
        """A worker joins only if inferlets cannot tell it from the others."""
        mine, theirs = self._info, worker.info
        for field in ("kv_page_size", "dist_size", "vocab_size"):
            if getattr(mine, field) != getattr(theirs, field):
                raise PieError(
                    f"worker {worker.name} serves {self.name} with {field}={getattr(theirs, field)}, "
                    f"the attached workers with {getattr(mine, field)}"
                )
        if worker.tokenizer.vocabs() != self.tokenizer.vocabs():
            raise PieError(f"worker {worker.name} serves {self.name} with a different tokenizer")

    def add(self, member: Member) -> None:
        if member.name in self.members:
            raise PieError(f"a model worker named {member.name!r} is already attached")
        self.members[member.name] = member
        member.service.metrics = self._metrics
        member.worker.on_lost(lambda worker, reason: self._lost(member, reason))

    def detach(self, name: str) -> Deferred:
        """Ends the instances on worker `name` and closes its connection (it may attach again)."""
        member = self.members.get(name)
        if member is None:
            return fail(PieError(f"no model worker named {name!r} serves {self.name}"))
        self._lost(member, f"model worker {name} at {member.endpoint} detached")
        return member.worker.close()

    def close(self) -> Deferred:
        """Detach every worker (daemon shutdown)."""
        return gatherResults([self.detach(name) for name in list(self.members)])

    def _lost(self, member: Member, reason: str) -> None:
        if self.members.get(member.name) is not member:
            return
        del self.members[member.name]
        log.warn("{reason}; ending {n} instance(s)", reason=reason, n=len(member.instances))
        for instance_id in sorted(member.instances):
            self._runtime.terminate(instance_id, reason)
            self._placement.pop(instance_id, None)
            member.service.destroy_instance(instance_id)
        member.instances.clear()

    def _place(self, instance_id: str) -> Member:
        member = self._placement.get(instance_id)
        if member is not None:
            return member
        if not self.members:
            raise InstanceFault(f"model {self.name} has no attached workers (all were lost)")
        member = min(
            self.members.values(),
            key=lambda m: (len(m.instances), -m.service.resources.pages.available),
        )
        self._placement[instance_id] = member
        member.instances.add(instance_id)
        return member

    def _member_of(self, instance_id: str) -> Member:
        member = self._placement.get(instance_id)
        if member is None:
            raise InstanceFault(f"instance has no queue on {self.name}")
        return member

    # ------------------------------------------------------------------ IModelService

    def status(self) -> dict:
        live = list(self.members.values())
        workers = [
            {
                "name": m.name,
                "endpoint": m.endpoint,
                "instances": len(m.instances),
                **{
                    k: v
                    for k, v in m.service.status().items()
                    if k not in ("version", "model_name")
                },
            }
            for m in live
        ]

        def total(key: str) -> int:
            return sum(w[key] for w in workers)

        return {
            "version": pie.__version__,
            "model_name": self.name,
            "kv_page_size": self.kv_page_size,
            "num_kv_pages": total("num_kv_pages"),
            "num_embeddings": total("num_embeddings"),
            "num_distributions": total("num_distributions"),
            "free_kv_pages": total("free_kv_pages"),
            "free_embeddings": total("free_embeddings"),
            "pending_commands": total("pending_commands"),
            "device": "remote",
            "workers": workers,
        }

    def create_queue(self, instance_id: str, user: str | None = None) -> int:
        return self._place(instance_id).service.create_queue(instance_id, user)

    def set_priority(self, instance_id: str, queue_id: int, priority: str) -> None:
        self._member_of(instance_id).service.set_priority(instance_id, queue_id, priority)

    def submit(self, instance_id: str, queue_id: int, op: str, *args) -> Deferred:
        try:
            member = self._member_of(instance_id)
        except InstanceFault as error:
            return fail(error)
        return member.service.submit(instance_id, queue_id, op, *args)

    def list_exports(self) -> list[tuple[str, int]]:
        return [export for m in self.members.values() for export in m.service.list_exports()]

    def remove_export(self, name: str) -> bool:
        return any([m.service.remove_export(name) for m in self.members.values()])

    def destroy_instance(self, instance_id: str) -> None:
        member = self._placement.pop(instance_id, None)
        if member is not None:
            member.instances.discard(instance_id)
            member.service.destroy_instance(instance_id)


# --------------------------------------------------------------------------- the l4m attach


def attach_worker(runtime: object, endpoint: str, service_name: str) -> Deferred:
    """The `l4m` service type's attach: Deferred with a success text, or PieError."""
    return ensureDeferred(_attach(runtime, endpoint, service_name))


def _pools(runtime: object) -> list[ModelPool]:
    return [s for s in runtime.model_services() if isinstance(s, ModelPool)]


async def _attach(runtime: object, endpoint: str, service_name: str) -> str:
    if not isinstance(service_name, str) or not service_name.strip():
        raise PieError("service_name must be a non-empty string")
    if any(service_name in pool.members for pool in _pools(runtime)):
        raise PieError(f"a model worker named {service_name!r} is already attached")
    secret = worker_token(runtime.home)
    if not secret:
        raise PieError(
            f"no worker token: set ${WORKER_TOKEN_ENV} or write the workers' token to "
            f"{os.path.join(runtime.home, WORKER_TOKEN_FILE)}"
        )
    worker = await connect_worker(endpoint, secret, service_name, reactor=runtime.reactor)
    try:
        pool = _join(runtime, worker, endpoint, service_name)
    except Exception:
        await worker.close()
        raise
    info = worker.info
    return (
        f"Attached to L4M worker {service_name} at {endpoint}: model {info.model_name}, "
        f"{info.num_kv_pages} KV pages of {info.kv_page_size} tokens on {info.device}; "
        f"{len(pool.members)} worker(s) serve {info.model_name}"
    )


def _pool(runtime: object, model_name: str) -> ModelPool | None:
    return next((p for p in _pools(runtime) if p.name == model_name), None)


def _join(runtime: object, worker: RemoteWorker, endpoint: str, service_name: str) -> ModelPool:
    """Put the worker in its model's pool, making and registering the pool if it is the first."""
    model_name = worker.info.model_name
    member = Member(
        service_name, endpoint, worker, ModelService(worker, reactor=runtime.reactor), set()
    )
    pool = _pool(runtime, model_name)
    if pool is not None:
        pool.check_compatible(worker)
        pool.add(member)
        return pool
    if any(s.name == model_name for s in runtime.model_services()):
        raise PieError(
            f"model {model_name!r} is already served in-process by this daemon; "
            "start the worker with another model name (pie worker --model-name)"
        )
    pool = ModelPool(runtime, member)
    runtime.add_model_service(model_name, pool)
    return pool
