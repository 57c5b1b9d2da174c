"""The worker's end of the `l4m` wire: challenge a daemon, then run its jobs in order."""

from __future__ import annotations

import dataclasses
import hmac
import os

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pie.engine import batch
from pie.interfaces import PieError
from pie.remote.wire import (
    CLOSE_BAD_FRAME,
    CLOSE_REFUSED,
    HELLO_TIMEOUT_S,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    pack,
    proof,
    tokenizer_to_wire,
    unpack,
)

log = Logger()


class WorkerServerProtocol(WebSocketServerProtocol):
    """One peer of a `pie worker`: challenge, verify, then execute its jobs in order."""

    factory: WorkerServerFactory

    def onOpen(self) -> None:
        self.nonce = os.urandom(32)
        self.authenticated = False
        self.helloTimer = self.factory.clock.callLater(
            HELLO_TIMEOUT_S, self._refuse, "no hello within the handshake timeout"
        )
        self._send({"type": "challenge", "protocol": PROTOCOL_VERSION, "nonce": self.nonce})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            if not isBinary:
                raise ValueError("text frame (binary msgpack frames only)")
            message = unpack(payload)
        except Exception as error:
            self._drop(CLOSE_BAD_FRAME, f"bad frame: {error}")
            return
        if not self.authenticated:
            self._hello(message)
        elif message["type"] == "job":
            self._job(message)
        else:
            self._drop(CLOSE_BAD_FRAME, f"unexpected message type {message['type']!r}")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        timer = getattr(self, "helloTimer", None)
        if timer is not None and timer.active():
            timer.cancel()
        if self.factory.daemon is self:
            self.factory.daemon = None
            log.info("daemon {peer} detached ({reason})", peer=self.peer, reason=reason or code)

    def _hello(self, message: dict) -> None:
        if message["type"] != "hello":
            self._refuse(f"{message['type']!r} before a successful hello")
        elif message.get("protocol") != PROTOCOL_VERSION:
            self._refuse(
                f"protocol version mismatch: worker speaks {PROTOCOL_VERSION}, "
                f"daemon sent {message.get('protocol')!r}"
            )
        elif not isinstance(message.get("proof"), bytes) or not hmac.compare_digest(
            message["proof"], proof(self.factory.secret, self.nonce)
        ):
            self._refuse("bad worker token")
        elif self.factory.daemon is not None:
            self._refuse(f"already attached to the daemon at {self.factory.daemon.peer}")
        else:
            self.helloTimer.cancel()
            self.authenticated = True
            self.factory.daemon = self
            log.info("attached by daemon {peer}", peer=self.peer)
            self._send(self.factory.welcome())

    def _job(self, message: dict) -> None:
        job_id = message.get("id")
        try:
            job = batch.from_wire(message["job"])
        except Exception as error:
            self._send({"type": "error", "id": job_id, "message": f"malformed job: {error!r}"})
            return
        d = maybeDeferred(self.factory.worker.execute, job)
        d.addCallbacks(self._result, self._error, callbackArgs=(job_id,), errbackArgs=(job_id,))

    def _result(self, result: object, job_id: int) -> None:
        try:
            frame = pack({"type": "result", "id": job_id, "result": result})
        except Exception as error:
            self._error(Failure(error), job_id)
            return
        self._send_frame(frame)

    def _error(self, failure: Failure, job_id: int) -> None:
        error = failure.value
        text = str(error) if isinstance(error, PieError) else f"{type(error).__name__}: {error}"
        if not isinstance(error, PieError):
            log.failure("job {id} failed", failure, id=job_id)
        self._send({"type": "error", "id": job_id, "message": text})

    def _refuse(self, reason: str) -> None:
        log.warn("refusing {peer}: {reason}", peer=self.peer, reason=reason)
        self._send({"type": "refused", "reason": reason})
        self.sendClose(CLOSE_REFUSED, reason[:120])

    def _drop(self, code: int, reason: str) -> None:
        log.warn("closing {peer}: {reason}", peer=self.peer, reason=reason)
        self.sendClose(code, reason[:120])

    def _send(self, message: dict) -> None:
        self._send_frame(pack(message))

    def _send_frame(self, frame: bytes) -> None:
        if self.state == self.STATE_OPEN:  # a late answer for a daemon that left goes nowhere
            self.sendMessage(frame, isBinary=True)


class WorkerServerFactory(WebSocketServerFactory):
    """Serves one IModelWorker to the one daemon that proves it holds `secret`."""

    protocol = WorkerServerProtocol

    def __init__(self, worker: object, secret: bytes, name: str, clock: object = None) -> None:
        super().__init__(protocols=[SUBPROTOCOL])
        from twisted.internet import reactor

        if not secret:
            raise PieError("a worker needs a token (the secret shared with the daemon)")
        self.worker = worker
        self.secret = secret
        self.name = name
        self.clock = clock or reactor
        self.daemon: WorkerServerProtocol | None = None
        self.setProtocolOptions(
            maxMessagePayloadSize=MAX_FRAME_BYTES,
            maxFramePayloadSize=MAX_FRAME_BYTES,
            failByDrop=False,
            perMessageCompressionAccept=lambda offers: None,
        )

    def welcome(self) -> dict:
        return {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "worker": self.name,
            "info": dataclasses.asdict(self.worker.info),
            "tokenizer": tokenizer_to_wire(self.worker.tokenizer),
        }
