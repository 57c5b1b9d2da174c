"""One WebSocket session per client: Pie 0.1.1's protocol with its bugs fixed.

Requests of one session are handled strictly in order (as the seed's
per-session task does), so a `signal_instance` sent right after a
`launch_instance` finds the instance owned. Each session is the
`IInstanceOwner` of what it launched: the runtime delivers that instance's
events here, and a disconnect terminates it.

What differs from the seed (spec §10): unauthenticated requests are refused and
have no effect; every bad frame gets an answer; unknown query subjects get a
failure; uploads are validated; the owner is registered before the instance
starts and early events are held back until the launch response is out; each
instance yields exactly one `terminated`; a slow reader cannot make the daemon
buffer without bound.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from pie.interfaces import IBackpressure, IInstanceOwner, IRuntime, PieError
from pie.metrics import NO_METRICS, Metrics
from pie.server import messages
from pie.server.auth import (
    DEFAULT_AUTH_FAILURES_PER_MINUTE,
    AuthError,
    Claims,
    FailureLimiter,
    validate_token,
)
from pie.server.connections import AUTO_MAX_CONNECTIONS, ConnectionCounter
from pie.server.messages import BadMessage
from pie.server.uploads import (
    DEFAULT_MAX_PROGRAM_SIZE,
    DEFAULT_UPLOAD_BYTES_IN_FLIGHT,
    DEFAULT_UPLOAD_IDLE_TIMEOUT_S,
    Upload,
    UploadAssembler,
    UploadBudget,
    UploadError,
    check_program_hash,
)

REASON_USER_TERMINATED = "user terminated the program"
REASON_CONNECTION_CLOSED = "socket terminated"
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024  # a 256 KiB chunk plus msgpack overhead fits easily
DEFAULT_MAX_OUTBOUND = 16 * 1024 * 1024
OUTBOUND_HIGH_WATER_DIVISOR = 4  # an awaited send() waits past max_outbound / 4 queued
INBOX_HIGH_WATER = 64  # stop reading a client with this many requests waiting
ADMIN_QUERIES = ("kv_exports", "kv_unexport")  # need role Admin where auth is on
DEFAULT_MAX_INSTANCES_PER_CONNECTION = 256
DEFAULT_MAX_INSTANCES_PER_USER = 1024
ANONYMOUS = "anonymous"  # the one user of a daemon without auth
CLOSE_SHUTDOWN = 1000  # autobahn only lets applications send 1000 or 3000-4999
INVALID = "invalid"  # the metrics endpoint of a frame that is no client message


@implementer(IPushProducer)
class _OutboundGate:
    """Registered with the transport so that a full send buffer pauses the session."""

    def __init__(self, session: PieServerProtocol) -> None:
        self._session = session

    def pauseProducing(self) -> None:
        self._session.setWritePaused(True)

    def resumeProducing(self) -> None:
        self._session.setWritePaused(False)

    def stopProducing(self) -> None:
        pass  # the connection is going away; onClose does the cleanup


@implementer(IInstanceOwner, IBackpressure)
class PieServerProtocol(WebSocketServerProtocol):
    _admitted = False  # set in connectionMade: within the listener's connection caps
    # txaio's logger honours txaio's level (info): autobahn logs every frame at debug through it.
    log = txaio.make_logger()
    factory: PieServerFactory

    # ------------------------------------------------------------------ connection life

    def connectionMade(self) -> None:
        """Admit the connection under the listener's caps, or answer 503 and close it.

        The refusal is plain HTTP before any WebSocket handshake, so every client
        library shows its status and text; nothing of the session is set up.
        """
        self._address = peer_host(self.transport)
        refusal = self.factory.connections.admit(self._address)
        self._admitted = refusal is None
        if refusal is None:
            super().connectionMade()
            return
        self.log.info("refused a connection: {refusal}", refusal=refusal)
        body = refusal.encode()
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if not self._admitted:
            return  # refused in connectionMade: autobahn never started
        self.factory.connections.release(self._address)
        super().connectionLost(reason)

    def onConnect(self, request: Any) -> None:
        self.authenticated = not self.factory.auth_enabled
        self.claims: Claims | None = None
        self.uploads = UploadAssembler(self.factory.max_program_size, self.factory.upload_budget)
        self._upload_timer: IDelayedCall | None = None
        self.owned: set[str] = set()
        self._early: dict[str, list[tuple[str, str]]] = {}
        self._pending_launches = 0
        self._inbox: deque[tuple[bytes, bool]] = deque()
        self._busy = False
        self._closed = False
        self._dropping = False
        self._write_paused = False
        self._reading_paused = False
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._endpoint = INVALID  # the type of the message being handled (metrics)
        self._drain_waiters: list[Deferred[None]] = []
        self.closed: Deferred[None] = Deferred()

    def onOpen(self) -> None:
        self.registerProducer(_OutboundGate(self), True)
        self.factory.sessions.add(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not hasattr(self, "closed") or self._closed:
            return  # the handshake never completed, or already cleaned up
        self._closed = True
        self.factory.sessions.discard(self)
        self._inbox.clear()
        self._backlog.clear()
        self._arm_upload_timer(False)
        self._backlog_bytes = 0
        self._wake_senders()
        self.uploads.abandon()
        for instance_id in sorted(self.owned):
            self._terminate(instance_id, REASON_CONNECTION_CLOSED)
        self.owned.clear()
        self._early.clear()
        self.closed.callback(None)

    # ------------------------------------------------------------------ inbound, in order

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._inbox.append((payload, isBinary))
        self._update_reading()
        self._drain()

    def _drain(self) -> None:
        while self._inbox and not self._busy and not self._closed:
            payload, is_binary = self._inbox.popleft()
            d = maybeDeferred(self._handle_frame, payload, is_binary)
            d.addErrback(self._internal_error, None)
            if not d.called:
                self._busy = True
                d.addBoth(self._resume_draining)
        self._update_reading()

    def _resume_draining(self, _: object) -> None:
        self._busy = False
        self._drain()

    def _handle_frame(self, payload: bytes, is_binary: bool) -> Deferred | None:
        self._endpoint = INVALID
        if not is_binary:
            self._refuse(None, "text frames are not supported: send msgpack maps in binary frames")
            return None
        try:
            kind, fields = messages.decode_client_message(payload)
        except BadMessage as e:
            self._refuse(e.corr_id, f"bad message: {e}")
            return None
        self._endpoint = kind
        if not self.authenticated and kind != "authenticate":
            self._refuse(fields.get("corr_id"), f"Not authenticated ({kind} refused)")
            return None
        handler: Callable[..., Deferred | None] = getattr(self, f"_on_{kind}")
        return handler(**fields)

    # ------------------------------------------------------------------ requests

    def _on_authenticate(self, corr_id: int, token: str) -> None:
        if self.authenticated:
            self._respond(corr_id, True, "Already authenticated")
            return
        address = peer_host(self.transport)
        refusal = self.factory.auth_failures.refusal(address)
        if refusal is not None:
            self._respond(corr_id, False, refusal)
            return
        try:
            claims = validate_token(self.factory.auth_secret, token)
        except AuthError as e:
            self.factory.auth_failures.failed(address)
            self._respond(corr_id, False, f"Invalid token: {e}")
            return
        self.authenticated, self.claims = True, claims
        self._respond(corr_id, True, claims.subject)

    def _on_query(self, corr_id: int, subject: str, record: str) -> Deferred | None:
        runtime = self.factory.runtime
        if subject == "program_exists":
            return self._request(
                corr_id,
                lambda: maybeDeferred(
                    runtime.program_exists, check_program_hash(record)
                ).addCallback(lambda exists: "true" if exists else "false"),
            )
        if subject == "model_status":
            return self._request(
                corr_id, lambda: maybeDeferred(runtime.model_status).addCallback(json.dumps)
            )
        if subject in ADMIN_QUERIES:
            if self.factory.auth_enabled and not (self.claims and self.claims.is_admin):
                self._respond(corr_id, False, f"query {subject} requires a token with role Admin")
                return None
            return self._request(
                corr_id, lambda: maybeDeferred(_admin_query, runtime, subject, record)
            )
        self._respond(
            corr_id,
            False,
            f"Unknown query subject: {subject!r} (known: program_exists, model_status, "
            f"{', '.join(ADMIN_QUERIES)})",
        )
        return None

    def _on_upload_program(
        self,
        corr_id: int,
        program_hash: str,
        chunk_index: int,
        total_chunks: int,
        chunk_data: bytes,
    ) -> Deferred | None:
        if self.uploads.is_leftover(corr_id, program_hash, chunk_index):
            return None  # a later chunk of an upload already refused once
        superseded = self.uploads.current if chunk_index == 0 else None
        try:
            program = self.uploads.add_chunk(
                corr_id, program_hash, chunk_index, total_chunks, chunk_data
            )
        except UploadError as e:
            self._arm_upload_timer(False)
            self._respond(corr_id, False, str(e))
            self._abandoned(corr_id, [e.dropped, superseded], f"upload abandoned: {e}")
            return None
        self._abandoned(
            corr_id, [superseded], "upload abandoned: a new upload started on this connection"
        )
        self._arm_upload_timer(program is None)
        if program is None:
            return None
        return self._request(corr_id, lambda: self.factory.runtime.add_program(program))

    def _arm_upload_timer(self, waiting: bool) -> None:
        """(Re)start the idle timer of the upload in flight, or stop it when none waits.

        A client that starts an upload and stops sending would otherwise keep its partial
        program (up to max_program_size, counted in upload_bytes_in_flight) for as long
        as its connection lives.
        """
        if self._upload_timer is not None and self._upload_timer.active():
            self._upload_timer.cancel()
        self._upload_timer = None
        if waiting:
            self._upload_timer = self.factory.reactor.callLater(
                self.factory.upload_idle_timeout_s, self._upload_idle
            )

    def _upload_idle(self) -> None:
        self._upload_timer = None
        upload = self.uploads.abandon()
        if upload is not None and not self._closed:
            self._respond(
                upload.corr_id,
                False,
                f"upload abandoned: no chunk for {self.factory.upload_idle_timeout_s:g} s "
                "(upload_idle_timeout_s)",
            )

    def _abandoned(self, corr_id: int, uploads: list[Upload | None], reason: str) -> None:
        """Answer the other corr_ids whose uploads were dropped, once each."""
        for corr in {u.corr_id for u in uploads if u is not None} - {corr_id}:
            self._respond(corr, False, reason)

    def _on_launch_instance(
        self, corr_id: int, program_hash: str, arguments: list[str]
    ) -> Deferred:
        return self._launch(
            corr_id,
            lambda h: self.factory.runtime.launch(h, arguments, self),
            program_hash,
        )

    def _on_launch_server_instance(
        self, corr_id: int, port: int, program_hash: str, arguments: list[str]
    ) -> Deferred:
        if port > 65535:
            self._respond(corr_id, False, f"port {port} is not in 0..65535")
            return succeed(None)
        return self._launch(
            corr_id,
            lambda h: self.factory.runtime.launch_server(h, port, arguments, self),
            program_hash,
        )

    def _on_attach_remote_service(
        self, corr_id: int, endpoint: str, service_type: str, service_name: str
    ) -> Deferred | None:
        if self.factory.auth_enabled and not (self.claims and self.claims.is_admin):
            self._respond(corr_id, False, "attach_remote_service requires a token with role Admin")
            return None
        return self._request(
            corr_id,
            lambda: self.factory.runtime.attach_remote_service(
                endpoint, service_type, service_name
            ),
        )

    # ------------------------------------------------------------------ fire-and-forget

    def _on_signal_instance(self, instance_id: str, message: str) -> None:
        instance_id = self._owned_id(instance_id, "signal_instance")
        if instance_id is not None:
            self._fire_and_forget(
                "signal_instance", lambda: self.factory.runtime.signal(instance_id, message)
            )

    def _on_terminate_instance(self, instance_id: str) -> None:
        instance_id = self._owned_id(instance_id, "terminate_instance")
        if instance_id is not None:
            self._fire_and_forget(
                "terminate_instance", lambda: self._terminate(instance_id, REASON_USER_TERMINATED)
            )

    def _owned_id(self, instance_id: str, kind: str) -> str | None:
        """The canonical id if this session owns it; otherwise tell the client and return None."""
        try:
            canonical = str(uuid.UUID(instance_id))
        except ValueError:
            canonical = instance_id
        if canonical in self.owned:
            return canonical
        self._refuse(
            None, f"{kind}: no running instance {instance_id[:80]!r} owned by this connection"
        )
        return None

    def _fire_and_forget(self, kind: str, action: Callable[[], object]) -> None:
        try:
            action()
        except PieError as e:
            self._refuse(None, f"{kind} failed: {e}")
        else:
            self.factory.metrics.request(kind, "ok")

    def _terminate(self, instance_id: str, reason: str) -> None:
        try:
            self.factory.runtime.terminate(instance_id, reason)
        except Exception:
            self.log.failure("runtime.terminate({id}) failed", id=instance_id)

    # ------------------------------------------------------------------ launches and events

    def _launch(self, corr_id: int, start: Callable[[str], object], program_hash: str) -> Deferred:
        try:
            program_hash = check_program_hash(program_hash)
        except UploadError as e:
            self._respond(corr_id, False, str(e))
            return succeed(None)
        refusal = self._instance_quota()
        if refusal is not None:
            self._respond(corr_id, False, refusal)
            return succeed(None)
        self._pending_launches += 1
        d = maybeDeferred(start, program_hash)

        def launched(instance_id: str) -> None:
            self._pending_launches -= 1
            if self._closed:  # the client left while it was starting
                self._terminate(instance_id, REASON_CONNECTION_CLOSED)
                return
            self._respond(corr_id, True, instance_id)
            self.owned.add(instance_id)
            for event, message in self._early.pop(instance_id, []):
                self._event(instance_id, event, message)
            self._drop_unclaimed_events()

        def failed(failure: Failure) -> None:
            self._pending_launches -= 1
            self._drop_unclaimed_events()
            self._answer_failure(corr_id, failure)

        d.addCallbacks(launched, failed)
        return d

    @property
    def user(self) -> str:
        """Whom quotas count this connection for: the token's subject, or the anonymous user."""
        return self.claims.subject if self.claims is not None else ANONYMOUS

    @property
    def is_admin(self) -> bool:
        """An admin sees every user's instances in debug_query: role Admin, or auth is off."""
        return not self.factory.auth_enabled or bool(self.claims and self.claims.is_admin)

    def running(self) -> int:
        """Instances this connection owns or is launching."""
        return len(self.owned) + self._pending_launches

    def _instance_quota(self) -> str | None:
        """Why one more launch is refused (the connection's or the user's quota), or None."""
        factory = self.factory
        if self.running() >= factory.max_instances_per_connection:
            return (
                f"instance quota reached: this connection runs {self.running()} instances "
                f"(max_instances_per_connection = {factory.max_instances_per_connection})"
            )
        mine = sum(s.running() for s in factory.sessions if s.user == self.user)
        if mine >= factory.max_instances_per_user:
            return (
                f"instance quota reached: user {self.user!r} runs {mine} instances "
                f"(max_instances_per_user = {factory.max_instances_per_user})"
            )
        return None

    def instance_message(self, instance_id: str, message: str) -> bool:
        """Queue the message; True when the backlog is past its high-water mark (IBackpressure)."""
        self._event(instance_id, "message", message)
        return self._backed_up()

    def _backed_up(self) -> bool:
        return self._writable() and self._backlog_bytes >= self.factory.outbound_high_water

    def when_drained(self) -> Deferred[None]:
        """Fires once the backlog is at or under half the high-water mark, or the session ends."""
        if not self._backed_up():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def _wake_senders(self) -> None:
        if self._drain_waiters and (
            not self._writable() or self._backlog_bytes <= self.factory.outbound_high_water // 2
        ):
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def instance_terminated(self, instance_id: str, reason: str) -> None:
        self._event(instance_id, "terminated", reason)

    def _event(self, instance_id: str, event: str, message: str) -> None:
        if self._closed:
            return
        if instance_id in self.owned:
            if event == "terminated":
                self.owned.discard(instance_id)
            self._send(messages.instance_event(instance_id, event, message))
        elif self._pending_launches:
            # The runtime knows its owner before launch() answers; hold the
            # events so the client sees the instance id first.
            held = self._early.setdefault(instance_id, [])
            if not (held and held[-1][0] == "terminated"):
                held.append((event, message))
        else:
            self.log.debug("dropping {event} of {id}: not owned", event=event, id=instance_id)

    def _drop_unclaimed_events(self) -> None:
        if not self._pending_launches and self._early:
            self.log.warn("dropping events of unclaimed instances {ids}", ids=sorted(self._early))
            self._early.clear()

    # ------------------------------------------------------------------ answering

    def _request(self, corr_id: int, action: Callable[[], object]) -> Deferred:
        d = maybeDeferred(action)
        d.addCallbacks(
            lambda result: self._respond(corr_id, True, str(result)),
            lambda failure: self._answer_failure(corr_id, failure),
        )
        return d

    def _answer_failure(self, corr_id: int | None, failure: Failure) -> None:
        if failure.check(PieError):
            self._refuse(corr_id, str(failure.value))
        else:
            self._internal_error(failure, corr_id)

    def _internal_error(self, failure: Failure, corr_id: int | None) -> None:
        self.log.failure("internal error while handling a request", failure)
        self._refuse(
            corr_id, f"internal server error ({failure.type.__name__}); see the daemon log"
        )

    def _refuse(self, corr_id: int | None, reason: str) -> None:
        if corr_id is None:
            self.factory.metrics.request(self._endpoint, "error")
            self._send(messages.server_event(reason))
        else:
            self._respond(corr_id, False, reason)

    def _respond(self, corr_id: int, successful: bool, result: str) -> None:
        """Answer a request; counted for the message being handled (they are handled in order,
        each answered before the next is taken)."""
        self.factory.metrics.request(self._endpoint, "ok" if successful else "error")
        self._send(messages.response(corr_id, successful, result))

    # ------------------------------------------------------------------ outbound, bounded

    def _writable(self) -> bool:
        """False once the connection is closing: autobahn refuses (and raises on) any send.

        A client's close frame puts the session in STATE_CLOSING well before onClose;
        instances still sending in that window would each raise Disconnected.
        """
        return not (self._closed or self._dropping) and self.state == self.STATE_OPEN

    def _send(self, message: dict[str, Any]) -> None:
        if not self._writable():
            return
        payload = messages.encode(message)
        if len(payload) > self.factory.max_message_size:
            payload = messages.encode(
                _too_big(message, len(payload), self.factory.max_message_size)
            )
        if self._write_paused or self._backlog:
            self._backlog.append(payload)
            self._backlog_bytes += len(payload)
            if self._backlog_bytes > self.factory.max_outbound:
                self._give_up_on_slow_reader()
            return
        self.sendMessage(payload, isBinary=True)

    def setWritePaused(self, paused: bool) -> None:
        """Called by the transport (through the gate) as its send buffer fills and drains."""
        self._write_paused = paused
        while self._backlog and not self._write_paused and self._writable():
            payload = self._backlog.popleft()
            self._backlog_bytes -= len(payload)
            self.sendMessage(payload, isBinary=True)
        self._wake_senders()
        self._update_reading()

    def _update_reading(self) -> None:
        """Stop reading a client that does not read its replies or floods requests."""
        should_pause = not self._closed and (
            self._write_paused or len(self._inbox) >= INBOX_HIGH_WATER
        )
        if should_pause != self._reading_paused and self.transport is not None:
            self._reading_paused = should_pause
            if should_pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _give_up_on_slow_reader(self) -> None:
        limit = self.factory.max_outbound
        self.log.warn(
            "closing {peer}: over {limit} bytes of unread replies", peer=self.peer, limit=limit
        )
        self._dropping = True
        self._backlog.clear()
        self._backlog_bytes = 0
        self._wake_senders()
        self.dropConnection(abort=True)  # a close frame would wait behind what it does not read


def peer_host(transport: Any) -> str:
    """The client's address for the per-address limits: its IP, or "local" on a UNIX socket."""
    return str(getattr(transport.getPeer(), "host", None) or "local")


def _admin_query(runtime: IRuntime, subject: str, record: str) -> str:
    """kv_exports: JSON list of every export; kv_unexport: drop one, record {"model", "name"}."""
    if subject == "kv_exports":
        return json.dumps(runtime.kv_exports())
    try:
        target = json.loads(record)
        model, name = target["model"], target["name"]
    except (ValueError, TypeError, KeyError):
        raise PieError('kv_unexport: the record must be JSON {"model": ..., "name": ...}') from None
    if not runtime.remove_kv_export(str(model), str(name)):
        raise PieError(f"kv_unexport: model {model!r} has no export named {name!r}")
    return "removed"


def _too_big(message: dict[str, Any], size: int, limit: int) -> dict[str, Any]:
    """What to send instead of a message the client could not accept (over its size limit)."""
    what = message["type"]
    if what == "response":
        return messages.response(
            message["corr_id"],
            False,
            f"result of {size} bytes exceeds the message size limit {limit}",
        )
    if what == "instance_event":
        return messages.server_event(
            f"instance {message['instance_id']}: {message['event']} of {size} bytes dropped, "
            f"over the message size limit {limit}"
        )
    return messages.server_event(f"server event of {size} bytes dropped (limit {limit})")


class PieServerFactory(WebSocketServerFactory):
    """Shared state of all sessions: the runtime, the auth secret, the limits."""

    protocol = PieServerProtocol

    def __init__(
        self,
        runtime: IRuntime,
        auth_secret: str | None,
        max_program_size: int = DEFAULT_MAX_PROGRAM_SIZE,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_outbound: int = DEFAULT_MAX_OUTBOUND,
        reactor: Any = None,
        max_instances_per_connection: int = DEFAULT_MAX_INSTANCES_PER_CONNECTION,
        max_instances_per_user: int = DEFAULT_MAX_INSTANCES_PER_USER,
        upload_bytes_in_flight: int = DEFAULT_UPLOAD_BYTES_IN_FLIGHT,
        upload_idle_timeout_s: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S,
        metrics: Metrics = NO_METRICS,
        auth_failures_per_minute: int = DEFAULT_AUTH_FAILURES_PER_MINUTE,
        clock: Any = None,
        max_connections: int = AUTO_MAX_CONNECTIONS,
        max_connections_per_address: int = AUTO_MAX_CONNECTIONS // 2,
    ) -> None:
        """auth_secret None disables authentication (every session starts authenticated);
        metrics: the daemon's hooks (pie.metrics), told of every request and its outcome.

        `clock` (default: the reactor) times the authentication failure window.
        """
        super().__init__(reactor=reactor)
        if clock is None:
            clock = reactor
            if clock is None:
                from twisted.internet import reactor as clock
        self.auth_failures = FailureLimiter(auth_failures_per_minute, clock)
        self.connections = ConnectionCounter(max_connections, max_connections_per_address)
        self.runtime = runtime
        self.auth_secret = auth_secret
        self.max_program_size = max_program_size
        self.max_message_size = max_message_size
        self.max_outbound = max_outbound
        self.outbound_high_water = max(1, max_outbound // OUTBOUND_HIGH_WATER_DIVISOR)
        self.max_instances_per_connection = max_instances_per_connection
        self.max_instances_per_user = max_instances_per_user
        self.upload_budget = UploadBudget(upload_bytes_in_flight)
        self.upload_idle_timeout_s = upload_idle_timeout_s
        self.metrics = metrics
        self.sessions: set[PieServerProtocol] = set()
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            failByDrop=False,  # send a close frame with 1009 instead of a bare TCP reset
            webStatus=False,  # a plain HTTP GET gets an error, not autobahn's status page
            openHandshakeTimeout=10,
            closeHandshakeTimeout=2,
            autoPingInterval=30,
            autoPingTimeout=20,
            allowNullOrigin=True,
        )

    @property
    def auth_enabled(self) -> bool:
        return self.auth_secret is not None

    def close_all(self, reason: str = "server shutting down") -> Deferred:
        """Close every session (their instances end); fires when all are gone."""
        waiting = [session.closed for session in self.sessions]
        for session in list(self.sessions):
            session.sendClose(CLOSE_SHUTDOWN, reason)
        return DeferredList(waiting, consumeErrors=True)
