"""The daemon's own model: loaded in a thread at start, then served to the runtime.

Loading weights takes seconds, and twistd builds the service tree before it
forks, so nothing heavy may happen in makeService: the worker thread and the
weights come to life in startService, off the reactor thread, and `ready`
fires once the model is attached to the runtime. The listener waits for
`ready`, so no client ever sees a daemon without its model.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from pie.service.registry import resolve_model
from pie.service.service import ModelService

FAILED_LOADS: list[str] = []
"""Why each model load of this process failed. A failed load stops the daemon; `pie serve`
then exits with status 1 and this reason (twistd itself always exits 0 after a stop)."""


class LocalModelService(Service):
    """Loads one model into an in-process worker and adds it to the runtime."""

    log = Logger()

    def __init__(self, runtime: Any, settings: dict[str, Any], reactor: Any) -> None:
        self.runtime = runtime
        self.settings = settings
        self.reactor = reactor
        self.worker = None
        self.model_service: ModelService | None = None
        self._outcome: Failure | None = None
        self._loaded = False
        self._waiters: list[Deferred] = []

    def startService(self) -> None:
        super().startService()
        ensureDeferred(self._load()).addBoth(self._settle)

    def whenReady(self) -> Deferred:
        """Fires once the model serves, or errbacks with the load failure."""
        if self._outcome is not None:
            return fail(self._outcome)
        if self._loaded:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _settle(self, result: object) -> None:
        if isinstance(result, Failure):
            self.log.failure("the model could not be loaded; stopping", result)
            self._outcome = result
            FAILED_LOADS.append(result.getErrorMessage())
            if self.reactor.running:
                self.reactor.stop()
        self._loaded = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if self._outcome is not None:
                waiter.errback(self._outcome)
            else:
                waiter.callback(None)

    async def _load(self) -> None:
        from pie.engine.worker import load_worker

        s = self.settings
        path = resolve_model(s["model"], s["home"])
        self.log.info(
            "loading model {path} on {device} ({dtype})",
            path=path,
            device=s["device"],
            dtype=s["dtype"],
        )
        pool = self.reactor.getThreadPool()
        self.worker = await deferToThreadPool(
            self.reactor,
            pool,
            lambda: load_worker(
                path,
                device=s["device"],
                dtype=s["dtype"],
                page_size=s["page_size"],
                num_pages=s["num_pages"],
                dist_size=s["dist_size"],
                reactor=self.reactor,
            ),
        )
        service = ModelService(
            self.worker,
            reactor=self.reactor,
            state_dir=os.path.join(s["home"], "kv-exports"),
            policy=s["batching"].replace(":", " "),
            max_batch_tokens=s["max_batch_tokens"] or None,
        )
        self.runtime.add_model_service(service.name, service)
        self.model_service = service
        self.log.info("serving model {name}: {status}", name=service.name, status=service.status())

    def stopService(self):
        super().stopService()
        if self.worker is not None:
            return self.worker.close()
        return None
