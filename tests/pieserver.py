"""Test harness: a real pie server on a loopback port with a runtime double."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ProcessProtocol

from pie.server.auth import issue_token
from pie.server.protocol import PieServerFactory
from tests import rawclient
from tests.fakeruntime import FakeRuntime

SECRET = "test-secret-that-is-long-enough-for-hs256-and-even-for-hs512-keys!"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LiveServer:
    """Listens on 127.0.0.1:<free port>; everything is torn down by the test's cleanup."""

    def __init__(self, testcase: Any, runtime: Any = None, auth: bool = False, **limits: Any):
        self.testcase = testcase
        self.runtime = runtime if runtime is not None else FakeRuntime()
        # `clock=` gives the factory a task.Clock for its timers (the sockets stay real)
        clock = limits.pop("clock", reactor)
        self.factory = PieServerFactory(
            self.runtime, auth_secret=SECRET if auth else None, reactor=clock, **limits
        )
        self.clients: list[rawclient.RawClient] = []
        self.port: Any = None

    async def start(self) -> LiveServer:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(self.factory)
        self.testcase.addCleanup(self.stop)
        return self

    @property
    def port_number(self) -> int:
        return self.port.getHost().port

    async def connect(self) -> rawclient.RawClient:
        client = await rawclient.connect(self.port_number)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            if client.transport.connected:
                client.transport.loseConnection()
        await gatherResults([c.closed for c in self.clients])
        await gatherResults([s.closed for s in list(self.factory.sessions)])
        await self.port.stopListening()


def token(role: str = "User", subject: str = "tester", **kw: Any) -> str:
    return issue_token(SECRET, subject=subject, role=role, **kw)


class ChildProcess(ProcessProtocol):
    """A child Python process: its output, its first line, its exit status."""

    def __init__(self) -> None:
        self.output = b""
        self.first_line: Deferred[bytes] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self._watches: list[tuple[re.Pattern, Deferred]] = []

    def when_output(self, pattern: bytes) -> Deferred:
        """Fires with the first match of the regex `pattern` in the output (so far or later)."""
        watch: Deferred = Deferred()
        self._watches.append((re.compile(pattern), watch))
        self._match()
        return watch

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        if fd == 1 and not self.first_line.called and b"\n" in self.output:
            self.first_line.callback(self.output.split(b"\n")[0])
        self._match()

    def _match(self) -> None:
        for pattern, watch in list(self._watches):
            found = pattern.search(self.output)
            if found:
                self._watches.remove((pattern, watch))
                watch.callback(found)

    def processEnded(self, reason: Any) -> None:
        for _, watch in self._watches:
            watch.errback(RuntimeError(f"the child ended: {self.output.decode()[-3000:]}"))
        self._watches.clear()
        self.ended.callback(
            reason.value.exitCode
            if reason.value.exitCode is not None
            else f"signal {reason.value.signal}"
        )


def spawn_module(module: str, *args: str) -> tuple[ChildProcess, Any]:
    """Run `python -m module args` from the repository root; returns (protocol, process)."""
    child = ChildProcess()
    process = reactor.spawnProcess(
        child,
        sys.executable,
        [sys.executable, "-m", module, *args],
        env=dict(os.environ, PYTHONPATH=ROOT),
        path=ROOT,
    )
    return child, process
