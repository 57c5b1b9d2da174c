"""The daemon's end of the `l4m` wire: RemoteWorker, the connection to a worker, child workers.

Faults: when the connection to a worker drops, every job in flight and every
later job errbacks with InstanceFault("model worker <name> at <endpoint>
lost: ..."), so the runtime terminates exactly the instances that used it.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Callable

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pie.engine import batch
from pie.interfaces import IModelWorker, InstanceFault, PieError
from pie.remote.wire import (
    HANDSHAKE_TIMEOUT_S,
    MAX_FRAME_BYTES,
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    pack,
    parse_endpoint,
    proof,
    result_from_wire,
    tokenizer_from_wire,
    unpack,
)

log = Logger()


@implementer(IModelWorker)
class RemoteWorker:
    """IModelWorker for a worker across the network; jobs are pipelined, matched by id."""

    def __init__(self, protocol: WorkerClientProtocol, name: str, endpoint: str, welcome: dict):
        self._protocol = protocol
        self.name = name
        self.endpoint = endpoint
        self.remote_name = welcome["worker"]
        self.info = batch.WorkerInfo(**welcome["info"])
        self.tokenizer = tokenizer_from_wire(welcome["tokenizer"])
        self.lost_reason: str | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[object, Deferred]] = {}
        self._lost_observers: list[Callable[[RemoteWorker, str], None]] = []
        self._closed: list[Deferred] = []

    def __repr__(self) -> str:
        return f"<RemoteWorker {self.name} at {self.endpoint}>"

    def execute(self, job: object) -> Deferred:
        if self.lost_reason is not None:
            return fail(InstanceFault(self.lost_reason))
        if self._protocol.state != self._protocol.STATE_OPEN:  # closing: _lost comes next
            return fail(InstanceFault(f"model worker {self.name} at {self.endpoint} lost: closing"))
        job_id = next(self._ids)
        d = Deferred()
        self._pending[job_id] = (job, d)
        self._protocol.sendMessage(
            pack({"type": "job", "id": job_id, "job": batch.to_wire(job)}), isBinary=True
        )
        return d

    def close(self) -> Deferred:
        """Detach: the worker stays up and may be attached again."""
        if self.lost_reason is not None:
            return succeed(None)
        d = Deferred()
        self._closed.append(d)
        self._protocol.sendClose(1000, "detached by the daemon")
        return d

    def on_lost(self, observer: Callable[[RemoteWorker, str], None]) -> None:
        """Call observer(worker, reason) once when the worker is lost or detached."""
        self._lost_observers.append(observer)

    def _answer(self, message: dict) -> None:
        entry = self._pending.pop(message.get("id"), None)
        if entry is None:
            log.warn("{worker}: answer for unknown job {id!r}", worker=self, id=message.get("id"))
            return
        job, d = entry
        if message["type"] == "error":
            d.errback(InstanceFault(f"model worker {self.name}: {message.get('message')}"))
            return
        try:
            result = result_from_wire(job, message.get("result"))
        except Exception as error:
            d.errback(InstanceFault(f"model worker {self.name}: malformed result: {error!r}"))
            return
        d.callback(result)

    def _lost(self, why: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = f"model worker {self.name} at {self.endpoint} lost: {why}"
        for observer in self._lost_observers:
            try:
                observer(self, self.lost_reason)
            except Exception:
                log.failure("lost-worker observer failed")
        pending, self._pending = self._pending, {}
        for _job, d in pending.values():
            d.errback(InstanceFault(self.lost_reason))
        for d in self._closed:
            d.callback(None)


class WorkerClientProtocol(WebSocketClientProtocol):
    """The daemon's side of one worker connection."""

    factory: WorkerClientFactory
    worker: RemoteWorker | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connection = self

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = unpack(payload)
        except Exception as error:
            self._fail(f"sent a bad frame ({error})")
            return
        kind = message["type"]
        if self.worker is not None and kind in ("result", "error"):
            self.worker._answer(message)
        elif self.worker is None and kind == "challenge":
            self._challenge(message)
        elif self.worker is None and kind == "welcome":
            self._welcome(message)
        elif kind == "refused":
            # the worker closes the connection right after; the attach fails when it has
            self.factory.handshake_failed(f"refused the daemon: {message.get('reason')}")
        else:
            self._fail(f"sent an unexpected {kind!r} message")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.worker is not None:
            self.worker._lost(f"connection closed ({reason or code})")
        else:
            self.factory.handshake_failed(
                f"closed the connection during the handshake ({reason or code})"
            )
            self.factory.connection_closed()

    def _challenge(self, message: dict) -> None:
        if message.get("protocol") != PROTOCOL_VERSION:
            self._fail(
                f"speaks protocol {message.get('protocol')!r}, this daemon speaks {PROTOCOL_VERSION}"
            )
            return
        nonce = message.get("nonce")
        if not isinstance(nonce, bytes) or len(nonce) < 16:
            self._fail("sent a bad challenge")
            return
        hello = {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "proof": proof(self.factory.secret, nonce),
        }
        self.sendMessage(pack(hello), isBinary=True)

    def _welcome(self, message: dict) -> None:
        try:
            self.worker = RemoteWorker(self, self.factory.name, self.factory.endpoint, message)
        except Exception as error:
            self._fail(f"sent a bad welcome ({error!r})")
            return
        self.factory.handshake_done(self.worker)

    def _fail(self, why: str) -> None:
        if self.worker is None:
            self.factory.handshake_failed(why)
        else:
            self.worker._lost(why)
        self.dropConnection(abort=True)


class WorkerClientFactory(WebSocketClientFactory):
    """One connection attempt; `ready` fires with the RemoteWorker or, once the
    connection is gone, errbacks with the first reason the handshake failed."""

    protocol = WorkerClientProtocol

    def __init__(self, endpoint: str, secret: bytes, name: str, host: str, port: int) -> None:
        super().__init__(url=f"ws://{host}:{port}/", protocols=[SUBPROTOCOL])
        self.endpoint = endpoint
        self.secret = secret
        self.name = name
        self.ready: Deferred = Deferred()
        self.connection: WorkerClientProtocol | None = None
        self.failure: str | None = None
        self.setProtocolOptions(
            maxMessagePayloadSize=MAX_FRAME_BYTES,
            maxFramePayloadSize=MAX_FRAME_BYTES,
            failByDrop=False,
            openHandshakeTimeout=0,  # our own handshake timer covers the whole exchange
            autoPingInterval=PING_INTERVAL_S,  # a host that vanished without closing TCP
            autoPingTimeout=PING_TIMEOUT_S,  # (power, partition) is lost after this long
        )

    def handshake_done(self, worker: RemoteWorker) -> None:
        if not self.ready.called:
            self.ready.callback(worker)

    def handshake_failed(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        if self.connection is None:
            self.connection_closed()

    def connection_closed(self) -> None:
        if not self.ready.called:
            self.ready.errback(PieError(f"model worker at {self.endpoint} {self.failure}"))


def connect_worker(
    endpoint: str,
    secret: bytes,
    name: str,
    *,
    reactor: object = None,
    clock: object = None,
    timeout: float = HANDSHAKE_TIMEOUT_S,
) -> Deferred:
    """Connect to a `pie worker` and complete the handshake; Deferred[RemoteWorker].

    Errbacks with PieError when the endpoint is malformed, the connection
    fails, the worker refuses, or no `welcome` arrives within `timeout` seconds
    (measured on `clock`, the reactor by default).
    """
    if reactor is None:
        from twisted.internet import reactor
    clock = clock or reactor
    try:
        host, port = parse_endpoint(endpoint)
    except PieError as error:
        return fail(error)
    if not secret:
        return fail(PieError("no worker token configured: the daemon needs the workers' secret"))
    factory = WorkerClientFactory(endpoint, secret, name, host, port)
    tcp_host = host.replace(":", r"\:")
    connecting = clientFromString(reactor, f"tcp:host={tcp_host}:port={port}").connect(factory)

    def on_connect_error(failure: Failure) -> None:
        factory.handshake_failed(f"is unreachable: {failure.getErrorMessage()}")

    connecting.addErrback(on_connect_error)

    def on_timeout() -> None:
        factory.handshake_failed(f"did not complete the handshake within {timeout:g} s")
        if factory.connection is None:
            connecting.cancel()
        else:
            factory.connection.transport.abortConnection()

    timer = clock.callLater(timeout, on_timeout)

    def stop_timer(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    return factory.ready.addBoth(stop_timer)


# --------------------------------------------------------------------------- worker processes


class WorkerProcess(ProcessProtocol):
    """A `pie worker` child process; `url` fires with its ws:// address once it listens.

    `ended` fires with the exit code. For tests, benchmarks and supervisors
    that run workers on this host (`prefix` runs it under e.g. `ip netns exec NS`).
    """

    def __init__(self) -> None:
        self.url: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.output = b""
        self._awaited: list[tuple[str, Deferred]] = []

    def said(self, prefix: str) -> Deferred:
        """Fires with the first output line that starts with `prefix`."""
        d: Deferred = Deferred()
        self._awaited.append((prefix, d))
        self._match_lines()
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = re.search(rb"on (ws://\S+)\n", self.output)
        if match and not self.url.called:
            self.url.callback(match.group(1).decode())
        self._match_lines()

    def _match_lines(self) -> None:
        lines = self.output.decode(errors="replace").splitlines(keepends=True)
        complete = [line.rstrip("\n") for line in lines if line.endswith("\n")]
        for prefix, d in list(self._awaited):
            line = next((line for line in complete if line.startswith(prefix)), None)
            if line is not None:
                self._awaited.remove((prefix, d))
                d.callback(line)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.url.called:
            tail = self.output.decode(errors="replace")[-3000:]
            self.url.errback(PieError(f"pie worker exited before listening:\n{tail}"))
        self.ended.callback(reason.value.exitCode)

    def stop(self, signal: str = "TERM") -> Deferred:
        if not self.ended.called:
            self.transport.signalProcess(signal)
        return self.ended


def spawn_worker(
    reactor: object, args: list[str], *, env: dict | None = None, prefix: tuple[str, ...] = ()
) -> WorkerProcess:
    """Start `pie worker ARGS` with this interpreter (pie importable from its environment)."""
    process = WorkerProcess()
    argv = [*prefix, sys.executable, "-m", "pie.cli", "worker", *args]
    reactor.spawnProcess(process, argv[0], argv, env=env if env is not None else dict(os.environ))
    return process
