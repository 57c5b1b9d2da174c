"""`pie worker`: a process that loads a model and serves it to one pie daemon (type `l4m`).

Built like `twistd pie`: `Options` parses the command line and `makeService`
composes a WorkerService, which loads the engine, listens on an endpoint
string and, with --attach, asks a daemon to attach it. `pie worker ARGS` runs
it in the foreground; `twistd -n pie-worker ARGS` runs the same service.
With --tp N the ranks 1..N-1 are child processes (pie.remote.tp_launch).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.python.failure import Failure

from pie import config as pieconfig
from pie.interfaces import PieError
from pie.remote import tp_launch
from pie.remote.server import WorkerServerFactory
from pie.remote.wire import WORKER_TOKEN_ENV, WORKER_TOKEN_FILE, read_token_file, worker_token
from pie.service.registry import resolve_model


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Load a model and serve it to one pie daemon (attach_remote_service, type l4m)."
    optParameters = [
        ["model", None, "smollm2-135m-instruct", "a model path, or a name under HOME/models"],
        ["listen", None, "tcp:9100:interface=127.0.0.1", "Twisted server endpoint"],
        ["home", None, None, "pie home ($PIE_HOME, ~/.cache/pie)"],
        [
            "token-file",
            None,
            None,
            "the shared secret (default: $PIE_WORKER_TOKEN, "
            "else HOME/worker_token, created if missing)",
        ],
        ["model-name", None, None, "the name inferlets see (default: from the model)"],
        ["device", None, "auto", None],
        ["dtype", None, "auto", None],
        ["page-size", None, 16, None, int],
        ["num-pages", None, None, "KV pages (default: sized from memory, as the daemon's)", int],
        ["kv-headroom-bytes", None, 2 << 30, "CPU: memory left free after the KV pool", int],
        ["kv-memory-fraction", None, 0.8, "CUDA: share of free memory the KV pool takes", float],
        ["max-kv-pages", None, 0, "most KV pages when sized from memory (0: 1024 on CPU)", int],
        ["num-embeds", None, 4096, None, int],
        ["dist-size", None, 64, None, int],
        ["tp", None, 1, "tensor-parallel ranks (processes) in this worker", int],
        [
            "attach",
            None,
            None,
            "once listening, ask this daemon (ws://host:port) to attach the "
            "worker; authenticates with an admin token from $PIE_TOKEN",
        ],
        [
            "advertise",
            None,
            None,
            "the endpoint the daemon should dial (default: the address listened on)",
        ],
        ["service-name", None, None, "the worker's name in the daemon (with --attach)"],
        ["tp-rank", None, 0, "(internal) this process's tensor-parallel rank", int],
        ["tp-init", None, "", "(internal) the rendezvous of the ranks"],
    ]

    def postOptions(self) -> None:
        if self["tp"] < 1:
            raise usage.UsageError("--tp must be at least 1")
        self["home"] = self["home"] or pieconfig.default_home()


def read_secret(options: Options) -> bytes:
    """The worker's shared secret: --token-file, else $PIE_WORKER_TOKEN or HOME/worker_token."""
    if options["token-file"]:
        return read_token_file(options["token-file"])
    secret = worker_token(options["home"], create=True)
    if not os.environ.get(WORKER_TOKEN_ENV):
        where = os.path.join(options["home"], WORKER_TOKEN_FILE)
        print(f"pie worker: token in {where} (the daemon needs the same file)", flush=True)
    return secret


class WorkerService(Service):
    """Serves one engine (or the leader of a tensor-parallel group) on `listen`."""

    def __init__(self, options: Options, argv: list[str], reactor: Any) -> None:
        self.options = options
        self.argv = argv
        self.reactor = reactor
        self.worker = None
        self.leader = None
        self.followers: list = []

    def startService(self) -> None:
        """Load (blocking: the worker has nothing else to do yet), then listen."""
        super().startService()
        o = self.options
        secret = read_secret(o)  # before torch and the model: a bad token file fails at once
        from pie.engine.worker import build_on_own_thread
        from pie.service.local import LocalWorker

        path = resolve_model(o["model"], o["home"])
        if o["tp"] > 1:
            self.followers = tp_launch.start_followers(self.argv, o)
            engine = tp_launch.rank_engine(o, path)
            self.leader = tp_launch.leader(engine)
        else:  # the engine thread must be the only one that ran torch (pie.engine.worker)
            engine = build_on_own_thread(lambda: tp_launch.rank_engine(o, path))
        self.worker = LocalWorker(self.leader or engine, reactor=self.reactor)
        factory = WorkerServerFactory(self.worker, secret, socket.gethostname())
        listening = serverFromString(self.reactor, o["listen"]).listen(factory)
        listening.addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, port: Any) -> None:
        address = port.getHost()
        info = self.worker.info
        print(
            f"pie worker: serving {info.model_name} (tp={self.options['tp']}, {info.device}) "
            f"on ws://{address.host}:{address.port}",
            flush=True,
        )
        print(f"pie worker: KV pool: {info.kv_sizing}", flush=True)
        if self.options["attach"]:
            endpoint = self.options["advertise"] or f"ws://{address.host}:{address.port}"
            name = self.options["service-name"] or f"{socket.gethostname()}:{address.port}"
            d = ensureDeferred(_ask_to_attach(self.reactor, self.options["attach"], endpoint, name))
            d.addCallbacks(
                lambda text: print(f"pie worker: attached: {text}", flush=True),
                lambda f: print(f"pie worker: attach failed: {f.getErrorMessage()}", flush=True),
            )

    def _cannot_listen(self, failure: Failure) -> None:
        print(
            f"pie worker: cannot listen on {self.options['listen']}: {failure.getErrorMessage()}",
            file=sys.stderr,
        )
        self.reactor.stop()

    async def _stop(self) -> None:
        if self.worker is not None:
            await self.worker.close()
        if self.leader is not None:
            await self.leader.close()
        for follower in self.followers:
            follower.wait()
        if self.followers:
            shutil.rmtree(self.options["tp-dir"], ignore_errors=True)

    def stopService(self) -> Deferred:
        super().stopService()
        return ensureDeferred(self._stop())


async def _ask_to_attach(reactor: Any, daemon_url: str, endpoint: str, name: str) -> str:
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


def makeService(options: Options, reactor: Any = None) -> WorkerService:
    if reactor is None:
        from twisted.internet import reactor
    return WorkerService(options, list(getattr(options, "argv", [])), reactor)


def run(argv: list[str]) -> int:
    """`pie worker ARGV`: serve in the foreground until SIGTERM/SIGINT."""
    from twisted.internet import reactor

    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        print(f"{options}\npie worker: {error}", file=sys.stderr)
        return 2
    if options["tp-rank"] > 0:  # a follower rank: no network, just rank 0's jobs
        return tp_launch.follow(options)
    options.argv = argv
    service = makeService(options, reactor)
    try:
        service.startService()
    except (PieError, OSError) as error:
        print(f"pie worker: {error}", file=sys.stderr)
        return 2
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0
