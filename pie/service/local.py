"""The daemon's own model: an engine on a thread in this process, served to the runtime.

LocalWorker is the IModelWorker over pie.engine.worker's EngineThread: it turns
each job into a Deferred and has the thread deliver outcomes with
`reactor.callFromThread`, so the engine never sees the reactor.

Loading weights takes seconds, and twistd builds the service tree before it
forks, so nothing heavy may happen in makeService: LocalModelService brings the
engine to life in startService, off the reactor thread, and `whenReady` fires
once the model is attached to the runtime. The listener waits for it, so no
client ever sees a daemon without its model.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pie.config import kv_page_cap
from pie.interfaces import IModelWorker, PieError
from pie.service.registry import resolve_model
from pie.service.service import ModelService
from pie.service.servicetypes import model_loaders

log = Logger()


@implementer(IModelWorker)
class LocalWorker:
    """IModelWorker around an engine running on its own thread (pie.engine.worker)."""

    def __init__(self, engine: Any, reactor: Any = None) -> None:
        from pie.engine.worker import EngineThread

        if reactor is None:
            from twisted.internet import reactor
        self.engine = engine
        self.info = engine.info
        self.tokenizer = engine.tokenizer
        self._thread = EngineThread(engine, reactor.callFromThread)
        self._stopped: Deferred | None = None

    def execute(self, job: object) -> Deferred:
        if self._stopped is not None:
            return fail(PieError("the model worker is closed"))
        d: Deferred = Deferred()
        self._thread.submit(job, lambda result, error: _settle(d, job, result, error))
        return d

    def close(self) -> Deferred:
        """Finish the jobs already queued, then stop the thread."""
        if self._stopped is None:
            stopped: Deferred = Deferred()
            self._stopped = stopped
            self._thread.stop(lambda: stopped.callback(None))
        return self._stopped


def _settle(d: Deferred, job: object, result: object, error: BaseException | None) -> None:
    if error is None:
        d.callback(result)
    elif isinstance(error, PieError):
        d.errback(Failure(error))
    else:  # a bug or a device error: logged with its traceback, the job fails alone
        log.failure(
            "model worker failed on {job}",
            Failure(error, type(error), error.__traceback__),
            job=type(job).__name__,
        )
        d.errback(Failure(PieError(f"model worker failed on {type(job).__name__}: {error}")))


COMPUTE_KEYS = ("dtype", "weight_kernel", "head", "dense_dtype", "decode_step", "threads")


def load_worker(path: str, *, reactor: Any = None, **options: Any) -> LocalWorker:
    """Load the model at `path` (any installed loader plugin) and serve it on a thread.

    Blocks while the weights load; options are pie.engine.worker.build_engine's.
    """
    from pie.engine.worker import build_engine

    loaders = list(model_loaders().values())
    return LocalWorker(build_engine(path, loaders=loaders, **options), reactor=reactor)


def start_worker(loaded: Any, *, reactor: Any = None, **options: Any) -> LocalWorker:
    """A LocalWorker for a model already in memory (e.g. a tiny random model in a test)."""
    from pie.engine.engine import create_engine

    return LocalWorker(create_engine(loaded, **options), reactor=reactor)


def kv_policy(settings: dict[str, Any]) -> Any:
    """The pie.engine.memory.KvPolicy of the daemon's settings (imported on the loading thread)."""
    from pie.engine.memory import KvPolicy

    return KvPolicy(
        headroom_bytes=settings["kv_headroom_bytes"],
        cuda_fraction=settings["kv_memory_fraction"],
        max_pages=settings["max_kv_pages"],
    )


class LocalModelService(Service):
    """Loads one model into a LocalWorker and adds its ModelService to the runtime.

    `failure` is the load's Failure when it failed; the daemon then stops, and
    `pie serve` reports it (twistd itself always exits 0 after a stop).
    """

    def __init__(self, runtime: Any, settings: dict[str, Any], reactor: Any) -> None:
        self.runtime = runtime
        self.settings = settings
        self.reactor = reactor
        self.worker: LocalWorker | None = None
        self.model_service: ModelService | None = None
        self.failure: Failure | None = None
        self._loaded = False
        self._waiters: list[Deferred] = []

    def startService(self) -> None:
        super().startService()
        ensureDeferred(self._load()).addBoth(self._settle)

    def whenReady(self) -> Deferred:
        """Fires once the model serves, or errbacks with the load failure."""
        if self.failure is not None:
            return fail(self.failure)
        if self._loaded:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _settle(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("the model could not be loaded; stopping", result)
            self.failure = result
            if self.reactor.running:
                self.reactor.stop()
        self._loaded = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if self.failure is not None:
                waiter.errback(self.failure)
            else:
                waiter.callback(None)

    async def _load(self) -> None:
        s = self.settings
        path = resolve_model(s["model"], s["home"])
        if s["cpu_kernels"] not in ("auto", "fp32", "off"):
            raise PieError(f"cpu_kernels must be auto, fp32 or off, not {s['cpu_kernels']!r}")
        if s["cpu_kernels"] != "auto":  # read by pie.engine.cpu_kernels (and child workers)
            os.environ["PIE_CPU_KERNELS"] = s["cpu_kernels"]
        log.info(
            "loading model {path} on {device} ({dtype})",
            path=path,
            device=s["device"],
            dtype=s["dtype"],
        )
        self.worker = await deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            lambda: load_worker(
                path,
                device=s["device"],
                dtype=s["dtype"],
                page_size=s["page_size"],
                num_pages=s["num_pages"] or None,
                kv_policy=kv_policy(s),
                dist_size=s["dist_size"],
                reactor=self.reactor,
            ),
        )
        log.info("KV pool: {how}", how=self.worker.info.kv_sizing)
        service = ModelService(
            self.worker,
            reactor=self.reactor,
            state_dir=os.path.join(s["home"], "kv-exports"),
            policy=s["batching"].replace(":", " "),
            max_batch_tokens=s["max_batch_tokens"] or None,
            instance_pages=kv_page_cap(s, "kv_instance_pages", self.worker.info.num_kv_pages),
            user_pages=kv_page_cap(s, "kv_user_pages", self.worker.info.num_kv_pages),
            export_pages=kv_page_cap(s, "kv_user_export_pages", self.worker.info.num_kv_pages),
        )
        self.runtime.add_model_service(service.name, service)
        self.model_service = service
        log.info("serving model {name}: {status}", name=service.name, status=service.status())
        log.info(
            "model {name} compute path: {dtype} activations, {weight_kernel} weight kernel, "
            "{head} LM head, many-row GEMMs in {dense_dtype}, {decode_step} decode step, "
            "{threads} torch threads",
            name=service.name,
            **(dict.fromkeys(COMPUTE_KEYS, "?") | self.worker.info.compute),
        )

    async def _stop(self) -> None:
        if self.model_service is not None:
            await self.model_service.close()
        if self.worker is not None:
            await self.worker.close()

    def stopService(self) -> Deferred:
        """After the runtime has ended the instances: close the export store, then the worker."""
        super().stopService()
        return ensureDeferred(self._stop())
