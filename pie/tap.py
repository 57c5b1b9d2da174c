"""`twistd pie`: the daemon's options and its service tree.

twisted/plugins/pie_plugin.py names this module by its dotted name only
(ServiceMaker imports it when twistd runs the `pie` tap), so plugin scans
import neither it nor torch. makeService runs before twistd forks, so it
builds objects but starts no threads: those start in the services'
startService.

Children start in the order added and stop in the reverse: the model, the
runtime, the memory trimmer (unless `memory_trim_interval_s` is 0), the metrics listener (with --metrics), the client listener and, with
--openai, the OpenAI endpoint start in that order (the listener and the endpoint
wait for the model), and shutdown goes endpoint -> listener -> metrics -> trimmer -> runtime
(ends the instances) -> model (closes the
export store, then the worker).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage

from pie import config as pieconfig

_log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve pie: clients upload inferlets and run them next to the model over a "
        "WebSocket (msgpack frames). Settings may also come from a TOML file (--config); "
        "flags given here win. See docs/configuration.md."
    )
    optFlags = [["no-auth", None, "Disable authentication (local use only)."]]
    optParameters = [["config", "c", None, "TOML file of settings."]] + [
        [s.flag, None, None, f"{s.help} [default: {s.default}]", s.kind]
        for s in pieconfig.SETTINGS
        if s.kind is not bool
    ]

    def postOptions(self) -> None:
        cli = {s.key: self[s.flag] for s in pieconfig.SETTINGS if s.kind is not bool}
        cli["auth"] = False if self["no-auth"] else None
        file_values = pieconfig.load_config_file(self["config"]) if self["config"] else {}
        self.settings = pieconfig.resolve(cli, file_values)


class SequentialMultiService(MultiService):
    """Stops its children one after the other, last started first, within a timeout.

    MultiService stops them all at once; pie must first close the client
    sessions (ending their instances) and only then stop the runtime and the
    model workers under them. If that takes longer than `timeout_s`, the stop
    is reported done anyway (and logged), so that SIGTERM always ends the daemon.
    """

    def __init__(self, timeout_s: float | None = None, reactor: Any = None) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self._reactor = reactor

    def stopService(self) -> Deferred:
        Service.stopService(self)
        stopping = Deferred.fromCoroutine(self._stop_each())
        if self.timeout_s is None:
            return stopping
        done: Deferred = Deferred()

        def timed_out() -> None:
            _log.error(
                "the daemon's parts did not stop within {timeout} s; exiting anyway",
                timeout=self.timeout_s,
            )
            done.callback(None)

        timer = self._reactor.callLater(self.timeout_s, timed_out)

        def stopped(_: Any) -> None:
            if timer.active():
                timer.cancel()
                done.callback(None)

        stopping.addBoth(stopped)
        return done

    async def _stop_each(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure("stopping {service} failed", service=child)


def executor_limits(settings: dict[str, Any], reactor: Any) -> dict[str, Any]:
    """The sandbox's limits from the settings (the dev executor has none)."""
    if settings["executor"] != "wasm":
        return {}
    return {
        "memory_limit": settings["inferlet_memory_limit"],
        "deadline_ms": settings["inferlet_deadline_ms"],
        "slice_ms": settings["inferlet_slice_ms"],
        "cpu_percent": settings["inferlet_cpu_percent"],
        "cpu_window_s": settings["inferlet_cpu_window_s"],
        "cpu_policy": settings["inferlet_cpu_policy"],
        "max_paused": settings["inferlet_max_paused"],
        "output_bytes": settings["inferlet_output_bytes"],
        "reactor": reactor,
    }


def memory_trimmer(interval_s: int, reactor: Any, trim: Any = None) -> Service:
    """A service that gives glibc's freed heap back to the OS every `interval_s` seconds.

    Why: every thread's malloc arena keeps what it freed (glibc trims only the top of a
    heap, past a threshold that grows to 64 MiB per arena as big blocks come and go), so
    a burst of clients, uploads and instances leaves the daemon hundreds of MB above its
    idle size for good (1,000 clients on SmolLM2: 1866 MiB, 1564 after a trim; see
    docs/limits.md, "Memory"). The pages returned are free ones, so nothing in use moves.
    `trim` (default pie.engine.memory.release_freed_memory) runs on the reactor's thread
    pool: it takes 5-70 ms, too long for the reactor.
    """
    from twisted.application.internet import TimerService
    from twisted.internet.threads import deferToThreadPool

    if trim is None:
        from pie.engine.memory import release_freed_memory as trim

    service = TimerService(
        interval_s, lambda: deferToThreadPool(reactor, reactor.getThreadPool(), trim)
    )
    service.clock = reactor
    service.setName("memory-trim")
    return service


def makeService(config: Options, reactor: Any = None, runtime: Any = None) -> MultiService:
    """Compose the daemon: runtime, the local model, and the client listener.

    With no `runtime` given, the real one is built: the configured executor
    (the wasm sandbox by default) and the model loaded by LocalModelService,
    whose readiness gates the listener so clients never meet a model-less daemon.
    """
    from twisted.internet.endpoints import serverFromString

    from pie.metrics import NO_METRICS, MetricsService, PrometheusMetrics
    from pie.server.connections import connection_caps, listen_endpoint, raise_fd_limit
    from pie.server.protocol import PieServerFactory
    from pie.server.service import ClientListenerService

    if reactor is None:
        from twisted.internet import reactor
    settings = config.settings
    fd_limit = raise_fd_limit()  # first: the connection caps are sized from it
    top = SequentialMultiService(settings["shutdown_timeout_s"], reactor)
    metrics = PrometheusMetrics() if settings["metrics"] else NO_METRICS
    model = None
    if runtime is None:
        from pie.runtime.executors import make_executor
        from pie.runtime.executors.program import Limits
        from pie.runtime.http import HttpLimits
        from pie.runtime.outbound import HttpPolicy
        from pie.runtime.runtime import Runtime
        from pie.service.local import LocalModelService
        from pie.service.servicetypes import attach_remote_service

        runtime = Runtime(
            settings["home"],
            model_services={},
            executor=make_executor(
                settings["executor"],
                settings["home"],
                program_limits=Limits(
                    settings["max_program_source"], settings["max_program_files"]
                ),
                **executor_limits(settings, reactor),
            ),
            reactor=reactor,
            max_program_size=settings["max_program_size"],
            max_chat_chars=settings["max_chat_chars"],
            attacher=attach_remote_service,
            http_policy=HttpPolicy.from_settings(settings),
            http_limits=HttpLimits.from_settings(settings, fd_limit),
            inbox_bytes=settings["inbox_bytes"],
            subscription_bytes=settings["subscription_bytes"],
            store_value_bytes=settings["kv_store_value_bytes"],
            store_user_bytes=settings["kv_store_user_bytes"],
            metrics=metrics,
        )
        _log.info(
            "server instance connections: at most {total}, {per_address} per address",
            total=runtime.http_limits.max_connections,
            per_address=runtime.http_limits.max_connections_per_address,
        )
        if settings["model"] != "none":
            model = LocalModelService(runtime, settings, reactor)
    if model is not None:
        model.setServiceParent(top)
    if IService.providedBy(runtime):
        runtime.setServiceParent(top)
    if settings["memory_trim_interval_s"]:
        memory_trimmer(settings["memory_trim_interval_s"], reactor).setServiceParent(top)
    if isinstance(metrics, PrometheusMetrics):
        exporter = MetricsService(
            serverFromString(reactor, settings["metrics"]), metrics, runtime, reactor
        )
        exporter.setName("metrics")
        exporter.setServiceParent(top)
    max_connections, max_per_address = connection_caps(settings, fd_limit)
    _log.info(
        "client connections: at most {total}, {per_address} per address",
        total=max_connections,
        per_address=max_per_address,
    )
    factory = PieServerFactory(
        runtime,
        auth_secret=pieconfig.auth_secret(settings),
        max_program_size=settings["max_program_size"],
        max_message_size=settings["max_message_size"],
        max_outbound=settings["max_outbound"],
        reactor=reactor,
        max_instances_per_connection=settings["max_instances_per_connection"],
        max_instances_per_user=settings["max_instances_per_user"],
        upload_bytes_in_flight=settings["upload_bytes_in_flight"],
        upload_idle_timeout_s=settings["upload_idle_timeout_s"],
        metrics=metrics,
        auth_failures_per_minute=settings["auth_failures_per_minute"],
        max_connections=max_connections,
        max_connections_per_address=max_per_address,
    )
    listener = ClientListenerService(
        listen_endpoint(reactor, settings["port"], settings["listen_backlog"]),
        factory,
        model.whenReady if model is not None else None,
    )
    listener.setName("clients")
    listener.setServiceParent(top)
    if settings["openai"]:
        from pie.server.openai import OpenAIService

        openai = OpenAIService(
            runtime,
            serverFromString(reactor, settings["openai"]),
            reactor,
            pieconfig.auth_secret(settings),
            model.whenReady if model is not None else None,
        )
        openai.setName("openai")
        openai.setServiceParent(top)
    return top
