"""The WebSocket listener as a Twisted service, with a shutdown that closes sessions.

StreamServerEndpointService only stops listening; on SIGTERM the daemon should
also close each client session properly (close code 1000: autobahn lets an
application send only 1000 or 3000-4999), which ends the
instances those sessions own, before the reactor goes away.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from pie.server.protocol import PieServerFactory


class ClientListenerService(Service):
    """Listens on an endpoint for pie clients; `whenListening()` gives the bound port."""

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: PieServerFactory,
        ready: Callable[[], Deferred] | None = None,
    ) -> None:
        """`ready`, if given, returns a Deferred to wait for before listening (the model load)."""
        self.endpoint = endpoint
        self.factory = factory
        self.ready = ready
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def _listen(self) -> None:
        """Bind (before privileges are dropped when nothing gates it); a bind failure raises."""
        self._listening = self.endpoint.listen(self.factory)
        failures: list[Failure] = []
        self._listening.addCallbacks(self._bound, failures.append)
        if failures:
            failures[0].raiseException()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.ready is None:
            self._listen()

    def startService(self) -> None:
        super().startService()
        if self.ready is not None and self._listening is None:
            # A failed load is logged, and the daemon stopped, by whoever loads.
            self.ready().addCallbacks(lambda _: self._listen(), lambda _: None)
        elif self._listening is None:
            self._listen()

    def _bound(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        self.log.info("pie listening on {address}", address=address)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)

    def whenListening(self) -> Deferred[IListeningPort]:
        if self.port is not None:
            return succeed(self.port)
        waiter: Deferred[IListeningPort] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stopping = [self.factory.close_all()]
        if self.port is not None:
            stopping.append(self.port.stopListening())
            self.port = None
        self._listening = None
        return gatherResults([d for d in stopping if d is not None], consumeErrors=True)
