"""The WebSocket listener as a Twisted service, with a shutdown that closes sessions.

StreamServerEndpointService only stops listening; on SIGTERM the daemon should
also close each client session properly (close code 1001), which ends the
instances those sessions own, before the reactor goes away.
"""

from __future__ import annotations

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

    def __init__(self, endpoint: IStreamServerEndpoint, factory: PieServerFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        """Bind before privileges are dropped; a bind failure stops twistd with the error."""
        super().privilegedStartService()
        self._listening = self.endpoint.listen(self.factory)
        failures: list[Failure] = []
        self._listening.addCallbacks(self._bound, failures.append)
        if failures:
            failures[0].raiseException()

    def startService(self) -> None:
        if self._listening is None:
            self.privilegedStartService()
        super().startService()

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
