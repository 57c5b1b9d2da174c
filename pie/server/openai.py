"""`--openai ENDPOINT`: the daemon serves the OpenAI API from the bundled inferlet.

The daemon owns the server instance: it launches pie/bundled/openai.py on the
endpoint once the model is loaded, relaunches it if it stops while the daemon
runs (after RESTART_DELAY_S, so a failing launch does not spin), and stops it
with the daemon. With auth on, every request must carry
`Authorization: Bearer <a pie JWT>` (what `pie token` prints); the check runs
here, before any instance starts, and a refusal is OpenAI's 401 error body,
which OpenAI clients raise as an authentication error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from pie.bundled import source
from pie.interfaces import IInstanceOwner
from pie.runtime.http import Refusal
from pie.server.auth import AuthError, validate_token

RESTART_DELAY_S = 1.0


def api_key_gate(secret: str) -> Callable[[Request], Refusal | None]:
    """The request check of an OpenAI endpoint whose keys are pie JWTs signed with `secret`."""

    def gate(request: Request) -> Refusal | None:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return unauthorized("no API key: send Authorization: Bearer <the output of pie token>")
        try:
            validate_token(secret, key.strip())
        except AuthError as e:
            return unauthorized(f"incorrect API key: {e}")
        return None

    return gate


def unauthorized(message: str) -> Refusal:
    error = {"message": message, "type": "invalid_request_error", "param": None}
    body = {"error": {**error, "code": "invalid_api_key"}}
    return 401, {"content-type": "application/json"}, json.dumps(body).encode()


@implementer(IInstanceOwner)
class OpenAIService(Service):
    """Keeps one server instance of the bundled OpenAI inferlet up on `endpoint`."""

    log = Logger()

    def __init__(
        self,
        runtime: Any,
        endpoint: IStreamServerEndpoint,
        reactor: Any,
        auth_secret: str | None,
        ready: Callable[[], Deferred] | None = None,
    ) -> None:
        self.runtime = runtime
        self.endpoint = endpoint
        self.reactor = reactor
        self.gate = api_key_gate(auth_secret) if auth_secret is not None else None
        self.ready = ready
        self.server_id: str | None = None
        self.launches = 0
        self._restart: Any = None
        self._waiters: list[Deferred] = []

    @property
    def port(self) -> int | None:
        """The bound TCP port of the current server instance, if one is up."""
        server = self.runtime.servers.get(self.server_id) if self.server_id else None
        return server.port if server is not None else None

    def whenServing(self) -> Deferred:
        """Fires with the server id once an instance is up (now, or at the next launch)."""
        if self.port is not None:
            return succeed(self.server_id)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        waiting = self.ready() if self.ready is not None else succeed(None)
        # A failed load is logged, and the daemon stopped, by whoever loads.
        waiting.addCallbacks(lambda _: self._launch(), lambda _: None)

    def _launch(self) -> Deferred | None:
        self._restart = None
        if not self.running:
            return None
        d = Deferred.fromCoroutine(self._start_server())
        d.addErrback(self._failed)
        return d

    async def _start_server(self) -> None:
        digest = await self.runtime.add_program(source("openai"))
        server_id = await self.runtime.launch_server(
            digest, 0, [], self, endpoint=self.endpoint, gate=self.gate
        )
        if not self.running:  # stopped while launching
            self.runtime.terminate(server_id, "the daemon is stopping")
            return
        self.server_id, self.launches = server_id, self.launches + 1
        address = self.runtime.servers[server_id].address
        self.log.info("pie openai listening on {address}", address=address)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(server_id)

    def _failed(self, failure: Any) -> None:
        self.log.failure("the OpenAI endpoint could not start; retrying", failure)
        self._schedule()

    def _schedule(self) -> None:
        if self.running and self._restart is None:
            self._restart = self.reactor.callLater(RESTART_DELAY_S, self._launch)

    # IInstanceOwner: the server instance's events
    def instance_message(self, instance_id: str, message: str) -> None:
        pass  # a server instance sends nothing; its requests have no owner

    def instance_terminated(self, instance_id: str, reason: str) -> None:
        if instance_id != self.server_id:
            return
        self.server_id = None
        if self.running:
            self.log.warn("the OpenAI endpoint stopped ({reason}); restarting", reason=reason)
            self._schedule()

    def stopService(self) -> Deferred:
        super().stopService()
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        server = self.runtime.servers.get(self.server_id) if self.server_id else None
        if server is None:
            return succeed(None)
        self.runtime.terminate(self.server_id, "the daemon is stopping")
        return server.closed
