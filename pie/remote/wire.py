"""Model workers in other processes and on other hosts: the `l4m` wire, both ends.

A `pie worker` process owns a model (the same IModelWorker as in-process)
and serves it over a WebSocket; the daemon holds a RemoteWorker, an
IModelWorker whose jobs travel as msgpack maps in binary frames. The jobs are
pie.engine.batch's plain dataclasses (`to_wire`/`from_wire`), so this module
adds only the envelope, the handshake and the fault handling. docs/remote-workers.md
is the reference for the frames.

Handshake (protocol PROTOCOL_VERSION): the worker speaks first with a random
nonce; the daemon proves it knows the shared secret with HMAC-SHA256(secret,
nonce) (the secret never crosses the wire); the worker answers `welcome` with
its WorkerInfo (model, page size, dist size, capacity) and its tokenizer.
A worker serves one daemon at a time: everything else is refused.

Faults: when the connection to a worker drops, every job in flight and every
later job errbacks with InstanceFault("model worker <name> at <endpoint>
lost: ..."), so the runtime terminates exactly the instances that used it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import itertools
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

import msgpack
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from tokenizers import Tokenizer as HFTokenizer
from torch import device as torch_device
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pie.interfaces import IModelWorker, InstanceFault, PieError
from pie.engine import batch
from pie.engine.tokenizer import Tokenizer, _byte_level_bytes

log = Logger()

PROTOCOL_VERSION = 1
SUBPROTOCOL = "pie-l4m.v1"
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a prefill of thousands of tokens with masks fits easily
HELLO_TIMEOUT_S = 10.0  # the worker drops a peer that has not authenticated by then
HANDSHAKE_TIMEOUT_S = 30.0  # the daemon gives up on a worker that has not said welcome
PING_INTERVAL_S = 10.0  # the daemon pings an idle worker this often ...
PING_TIMEOUT_S = 30.0  # ... and drops it (lost) when a pong takes longer

WORKER_TOKEN_ENV = "PIE_WORKER_TOKEN"
WORKER_TOKEN_FILE = "worker_token"

CLOSE_REFUSED = 4001  # bad token, wrong protocol, or attached to another daemon
CLOSE_BAD_FRAME = 4003  # text frame, bad msgpack, or a message out of place


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes) -> dict:
    message = msgpack.unpackb(payload, raw=False)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("not a msgpack map with a 'type'")
    return message


def proof(secret: bytes, nonce: bytes) -> bytes:
    """What the daemon sends to show it holds the secret, without sending the secret."""
    return hmac.new(secret, b"pie-l4m-hello:" + nonce, hashlib.sha256).digest()


def worker_token(home: str, *, create: bool = False) -> bytes:
    """The secret shared by a daemon and its workers: $PIE_WORKER_TOKEN, else HOME/worker_token.

    `create` makes the file (mode 0600, 32 random bytes in hex) when it is
    missing, as `pie worker` does; copy it to the daemon's host (or set the
    variable on both sides) to let that daemon attach the worker.
    """
    token = os.environ.get(WORKER_TOKEN_ENV, "")
    if token:
        return token.encode()
    path = os.path.join(home, WORKER_TOKEN_FILE)
    if create and not os.path.exists(path):
        os.makedirs(home, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip().encode()
    except OSError:
        return b""


_ENDPOINT = re.compile(r"^(?:(?:ws|tcp)://)?(?P<host>\[[0-9a-fA-F:]+\]|[^:/\s]+):(?P<port>\d+)/?$")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of 'ws://host:port', 'tcp://host:port' (Pie's form) or 'host:port'."""
    match = _ENDPOINT.match(endpoint.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise PieError(f"bad worker endpoint {endpoint!r}: expected ws://HOST:PORT")
    return match["host"].strip("[]"), int(match["port"])


# --------------------------------------------------------------------------- tokenizer and results


def tokenizer_to_wire(tokenizer: Tokenizer) -> dict:
    """The served model's tokenizer as msgpack-ready data: the `tokenizers` pipeline
    (tokenizer.json text) plus what pie.engine.tokenizer.Tokenizer adds around it."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    regular = [(text, i) for text, i in vocab.items() if i not in tokenizer.special_ids]
    byte_level = all(tokenizer.token_bytes([i]) == _byte_level_bytes(text) for text, i in regular)
    return {
        "backend": tokenizer.backend.to_str(),
        "byte_level": byte_level,
        "special_ids": sorted(tokenizer.special_ids),
        "chat_template": tokenizer.chat_template,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "eos_token_ids": list(tokenizer.eos_token_ids),
    }


def tokenizer_from_wire(data: dict) -> Tokenizer:
    """The daemon's ITokenizer, rebuilt from a worker's handshake."""
    return Tokenizer(
        HFTokenizer.from_str(data["backend"]),
        byte_level=data["byte_level"],
        special_ids=set(data["special_ids"]),
        chat_template=data["chat_template"],
        bos_token=data["bos_token"],
        eos_token=data["eos_token"],
        eos_token_ids=data["eos_token_ids"],
    )


def result_from_wire(job: object, result: object) -> object:
    """Restore the shapes msgpack flattens (a Distribution is a tuple of two lists)."""
    if isinstance(job, batch.Forward):
        return [
            outputs if item.sampling is not None else [tuple(dist) for dist in outputs]
            for item, outputs in zip(job.items, result, strict=True)
        ]
    if isinstance(job, batch.GetDistributions):
        return [tuple(dist) for dist in result]
    return result


# --------------------------------------------------------------------------- the worker's end


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


# --------------------------------------------------------------------------- the daemon's end


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
    argv = [*prefix, sys.executable, "-m", "pie.remote.wire", *args]
    reactor.spawnProcess(process, argv[0], argv, env=env if env is not None else dict(os.environ))
    return process


# --------------------------------------------------------------------------- `pie worker`


def _worker_options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pie worker",
        description="Load a model and serve it to one pie daemon (attach_remote_service, type l4m).",
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="a model path, or a name under HOME/models"
    )
    parser.add_argument(
        "--listen", default="tcp:9100:interface=127.0.0.1", help="Twisted server endpoint"
    )
    parser.add_argument("--home", default=None, help="pie home ($PIE_HOME, ~/.cache/pie)")
    parser.add_argument(
        "--token-file",
        default=None,
        help="the shared secret (default: $PIE_WORKER_TOKEN, else HOME/worker_token, created if missing)",
    )
    parser.add_argument(
        "--model-name", default=None, help="the name inferlets see (default: from the model)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--num-embeds", type=int, default=4096)
    parser.add_argument("--dist-size", type=int, default=64)
    parser.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel ranks (processes) in this worker"
    )
    parser.add_argument(
        "--attach",
        default=None,
        metavar="DAEMON_URL",
        help="once listening, ask this daemon (ws://host:port) to attach the worker; "
        "authenticates with an admin token from $PIE_TOKEN",
    )
    parser.add_argument(
        "--advertise",
        default=None,
        help="the endpoint the daemon should dial (default: the address listened on)",
    )
    parser.add_argument(
        "--service-name", default=None, help="the worker's name in the daemon (with --attach)"
    )
    parser.add_argument("--tp-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tp-init", default="", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.home = options.home or os.environ.get("PIE_HOME") or os.path.expanduser("~/.cache/pie")
    return options


def _engine(options: argparse.Namespace, path: str) -> object:
    """The Engine this process runs: the whole model, or this rank's shard of it."""
    from pie.engine import tp
    from pie.engine.engine import Engine, create_engine
    from pie.engine.loaders import load_model, resolve_device, resolve_dtype

    device = resolve_device(options.device)
    if device.type == "cuda" and options.tp > 1:
        device = torch_device("cuda", options.tp_rank)
    dtype = resolve_dtype(options.dtype, device)
    loaded = load_model(path, dtype=dtype)
    sizes = dict(
        page_size=options.page_size,
        num_pages=options.num_pages,
        num_embeds=options.num_embeds,
        dist_size=options.dist_size,
    )
    if options.tp == 1:
        return create_engine(
            loaded, device=str(device), dtype=dtype, name=options.model_name, **sizes
        )
    tp.init_group(options.tp_rank, options.tp, options.tp_init, device)
    model = tp.sharded_model(loaded.config, loaded.weights, device=device, dtype=dtype)
    return Engine(model, loaded.tokenizer, name=options.model_name or loaded.name, **sizes)


def _start_followers(argv: list[str], options: argparse.Namespace) -> list[subprocess.Popen]:
    """Ranks 1..tp-1 as child processes running this same command; they meet rank 0 through
    a file (torch's FileStore), so there is no port to pick or race for."""
    options.tp_dir = tempfile.mkdtemp(prefix="pie-tp-")
    options.tp_init = f"file://{os.path.join(options.tp_dir, 'rendezvous')}"
    command = [sys.executable, "-m", "pie.remote.wire", *argv, "--tp-init", options.tp_init]
    return [subprocess.Popen([*command, "--tp-rank", str(rank)]) for rank in range(1, options.tp)]


async def _ask_to_attach(reactor: object, daemon_url: str, endpoint: str, name: str) -> str:
    """Pie's direction of attach: the worker, as a client of the daemon, asks to be attached."""
    from pie.client.tx import connect

    if endpoint.split("://")[-1].startswith(("0.0.0.0:", "[::]:", ":::")):
        raise PieError("listening on every interface: say which address to dial with --advertise")
    client = await connect(daemon_url, reactor=reactor)
    try:
        if os.environ.get("PIE_TOKEN"):
            await client.authenticate(os.environ["PIE_TOKEN"])
        return await client.attach_remote_service(endpoint, "l4m", name)
    finally:
        client.close()


def worker_main(argv: list[str]) -> int:
    """`pie worker ...`: load the model, listen, serve one daemon until SIGTERM/SIGINT."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from pie.engine import tp
    from pie.service.registry import resolve_model
    from pie.engine.worker import Worker, build_on_own_thread

    options = _worker_options(argv)
    if options.tp < 1:
        raise SystemExit("pie worker: --tp must be at least 1")
    try:
        path = resolve_model(options.model, options.home)
        if options.tp_rank > 0:  # a follower rank: no network, just rank 0's jobs
            tp.die_with_parent()
            tp.follow(_engine(options, path))
            return 0
        if options.token_file:
            with open(options.token_file, encoding="utf-8") as f:
                secret = f.read().strip().encode()
        else:
            secret = worker_token(options.home, create=True)
            if not os.environ.get(WORKER_TOKEN_ENV):
                where = os.path.join(options.home, WORKER_TOKEN_FILE)
                print(f"pie worker: token in {where} (the daemon needs the same file)", flush=True)
        followers = _start_followers(argv, options) if options.tp > 1 else []
        if options.tp == 1:  # the worker thread must be the only one that ran torch (worker.py)
            engine = build_on_own_thread(lambda: _engine(options, path))
        else:
            engine = _engine(options, path)
    except (PieError, OSError) as error:
        print(f"pie worker: {error}", file=sys.stderr)
        return 2
    leader = tp.TPEngine(engine) if options.tp > 1 else None
    worker = Worker(leader or engine)
    factory = WorkerServerFactory(worker, secret, socket.gethostname())

    def listening(port: object) -> None:
        address = port.getHost()
        print(
            f"pie worker: serving {worker.info.model_name} (tp={options.tp}, {worker.info.device}) "
            f"on ws://{address.host}:{address.port}",
            flush=True,
        )
        if options.attach:
            endpoint = options.advertise or f"ws://{address.host}:{address.port}"
            name = options.service_name or f"{socket.gethostname()}:{address.port}"
            d = ensureDeferred(_ask_to_attach(reactor, options.attach, endpoint, name))
            d.addCallbacks(
                lambda text: print(f"pie worker: attached: {text}", flush=True),
                lambda f: print(f"pie worker: attach failed: {f.getErrorMessage()}", flush=True),
            )

    def failed(failure: Failure) -> None:
        print(
            f"pie worker: cannot listen on {options.listen}: {failure.getErrorMessage()}",
            file=sys.stderr,
        )
        reactor.stop()

    serverFromString(reactor, options.listen).listen(factory).addCallbacks(listening, failed)

    def shutdown() -> Deferred:
        d = worker.close()
        if leader is not None:
            d.addCallback(lambda _: leader.close())
        return d

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()
    for follower in followers:
        follower.wait()
    if followers:
        shutil.rmtree(options.tp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":  # the follower ranks of a tensor-parallel worker
    sys.exit(worker_main(sys.argv[1:]))
