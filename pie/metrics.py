"""Prometheus metrics of one daemon: the hooks its parts call, and the /metrics page.

Every part takes a hooks object and calls it at a few points: the client
protocol (`request`, per message and its outcome), the server instances
(`http_request`, once the response is done), and each model's scheduler
(`ModelMetrics`: queues, forward batches, outputs). The base classes here do
nothing, so with metrics off (the default) each hook costs one no-op call.
`PrometheusMetrics` records into its own CollectorRegistry, not the global
one, so several daemons can live in one process (the tests run several).

Gauges of state the daemon already keeps (instances running, commands
pending, KV pages used and free) are not tracked on every change: they are
read from the runtime when /metrics is scraped, on the reactor thread, and
handed to the registry as one snapshot; the text is then made on a pool
thread, so a scrape never holds the reactor for more than that read.
docs/architecture.md ("Metrics") lists every metric.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pie.engine.batch import Forward, ForwardItem

BATCH_ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


def _new_tokens(item: ForwardItem) -> int:
    return len(item.tokens) or len(item.input_embeds)


class ModelMetrics:
    """What one model's scheduler reports (the no-op base: metrics off)."""

    def queue_added(self, instance: str, now: float) -> None:
        """A queue of `instance` was created: its time to first token counts from the first."""

    def instance_dropped(self, instance: str) -> None:
        """The instance ended on this model."""

    def forward_sent(self, job: Forward) -> None:
        """A forward batch went to the worker."""

    def forward_done(self, seconds: float) -> None:
        """A forward batch came back (answered or failed) `seconds` after it was sent."""

    def item_answered(self, instance: str, item: ForwardItem, now: float) -> None:
        """One item of a forward batch was answered."""


class Metrics:
    """The daemon's metrics hooks (the no-op base: metrics off)."""

    def model(self, name: str) -> ModelMetrics:
        """The hooks for the model service `name` (the runtime asks when it adds one)."""
        return NO_MODEL_METRICS

    def request(self, endpoint: str, status: str) -> None:
        """A client-protocol message of type `endpoint` was answered (`ok` or `error`)."""

    def http_request(self, request: Request) -> None:
        """A server instance took an HTTP request (counted once it is answered)."""


NO_MODEL_METRICS = ModelMetrics()
NO_METRICS = Metrics()


class _Families:
    """The registry's counters and histograms, labelled by model where they are per model."""

    def __init__(self, registry: CollectorRegistry) -> None:
        model = ["model"]
        self.requests = Counter(
            "pie_requests",
            "Client-protocol messages by type, and server-instance HTTP requests (endpoint "
            "http), by outcome: ok/error, or the HTTP status code (disconnected: the client left).",
            ["endpoint", "status"],
            registry=registry,
        )
        self.prefilled = Counter(
            "pie_tokens_prefilled",
            "Prompt tokens forwarded into the KV cache (all new tokens of forward items except "
            "single-token decode steps).",
            model,
            registry=registry,
        )
        self.generated = Counter(
            "pie_tokens_generated",
            "Output tokens: next-token distributions (or engine-sampled tokens) computed.",
            model,
            registry=registry,
        )
        self.batch_items = Histogram(
            "pie_forward_batch_items",
            "Items (one per queue's forward) in each forward batch sent to the worker.",
            model,
            buckets=BATCH_ITEM_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "pie_forward_batch_tokens",
            "New tokens in each forward batch sent to the worker.",
            model,
            buckets=BATCH_TOKEN_BUCKETS,
            registry=registry,
        )
        self.forward_seconds = Histogram(
            "pie_forward_duration_seconds",
            "Time from sending a forward batch to the worker to its answer.",
            model,
            buckets=FORWARD_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "pie_time_to_first_token_seconds",
            "Per instance and model: time from its first queue to its first output token.",
            model,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "pie_time_per_output_token_seconds",
            "Per instance and model: time between output tokens after the first (per token).",
            model,
            buckets=TPOT_BUCKETS,
            registry=registry,
        )


class _PrometheusModelMetrics(ModelMetrics):
    """One model's hooks: its labelled children, and each instance's last output time."""

    def __init__(self, families: _Families, name: str) -> None:
        self._prefilled = families.prefilled.labels(name)
        self._generated = families.generated.labels(name)
        self._batch_items = families.batch_items.labels(name)
        self._batch_tokens = families.batch_tokens.labels(name)
        self._forward_seconds = families.forward_seconds.labels(name)
        self._ttft = families.ttft.labels(name)
        self._tpot = families.tpot.labels(name)
        # instance -> [time of its first queue, time of its last output or None]
        self._timing: dict[str, list[float | None]] = {}

    def queue_added(self, instance: str, now: float) -> None:
        self._timing.setdefault(instance, [now, None])

    def instance_dropped(self, instance: str) -> None:
        self._timing.pop(instance, None)

    def forward_sent(self, job: Forward) -> None:
        self._batch_items.observe(len(job.items))
        self._batch_tokens.observe(sum(_new_tokens(item) for item in job.items))

    def forward_done(self, seconds: float) -> None:
        self._forward_seconds.observe(seconds)

    def item_answered(self, instance: str, item: ForwardItem, now: float) -> None:
        new = _new_tokens(item)
        outputs = len(item.output_indices) + len(item.output_embeds)
        if new > 1 or not outputs:
            self._prefilled.inc(new)
        if not outputs:
            return
        self._generated.inc(outputs)
        timing = self._timing.get(instance)
        if timing is None:
            return
        first, last = timing
        if last is None:
            self._ttft.observe(now - first)
        else:
            self._tpot.observe((now - last) / outputs)
        timing[1] = now


class _Snapshot:
    """A collector yielding the gauges last read from the runtime (replaced whole, atomically)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


class PrometheusMetrics(Metrics):
    """Metrics recorded into a registry of their own (`registry`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._families = _Families(self.registry)
        self._models: dict[str, _PrometheusModelMetrics] = {}
        self._gauges = _Snapshot()
        self.registry.register(self._gauges)

    def model(self, name: str) -> ModelMetrics:
        if name not in self._models:
            self._models[name] = _PrometheusModelMetrics(self._families, name)
        return self._models[name]

    def request(self, endpoint: str, status: str) -> None:
        self._families.requests.labels(endpoint, status).inc()

    def http_request(self, request: Request) -> None:
        request.notifyFinish().addCallbacks(
            lambda _: self.request("http", str(request.code)),
            lambda _: self.request("http", "disconnected"),
        )

    def refresh(self, runtime: Any) -> None:
        """Read the gauges from the runtime (on the reactor thread, before a scrape)."""
        running = GaugeMetricFamily(
            "pie_instances_running", "Inferlet instances running (server requests included)."
        )
        running.add_metric([], len(runtime.instances.running))
        servers = GaugeMetricFamily(
            "pie_server_instances", "Server instances listening for HTTP requests."
        )
        servers.add_metric([], len(runtime.servers))
        pending = GaugeMetricFamily(
            "pie_scheduler_pending_commands",
            "Model commands queued or staged in a batch, not yet sent to the worker.",
            labels=["model"],
        )
        used = GaugeMetricFamily(
            "pie_kv_pages_used", "KV-cache pages mapped by instances or exports.", labels=["model"]
        )
        free = GaugeMetricFamily("pie_kv_pages_free", "KV-cache pages free.", labels=["model"])
        for service in list(runtime.model_services()):
            status = service.status()
            if not isinstance(status, dict) or "free_kv_pages" not in status:
                continue  # (a service whose status is not at hand)
            name = [service.name]
            pending.add_metric(name, status.get("pending_commands", 0))
            free.add_metric(name, status["free_kv_pages"])
            used.add_metric(name, status["num_kv_pages"] - status["free_kv_pages"])
        self._gauges.families = [running, servers, pending, used, free]


class MetricsPage(Resource):
    """GET /metrics: the registry in the format the scraper accepts (text or OpenMetrics)."""

    isLeaf = True

    def __init__(self, metrics: PrometheusMetrics, runtime: Any, reactor: Any) -> None:
        super().__init__()
        self._metrics = metrics
        self._runtime = runtime
        self._reactor = reactor

    def render_GET(self, request: Request):
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"not found: metrics are at /metrics\n"
        self._metrics.refresh(self._runtime)
        encoder, content_type = choose_encoder(request.getHeader("accept") or "")
        made = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), encoder, self._metrics.registry
        )

        def send(text: bytes) -> None:
            if not request.finished and request.channel is not None:
                request.setHeader(b"content-type", content_type.encode("ascii"))
                request.write(text)
                request.finish()

        def failed(failure: Failure) -> None:
            request.processingFailed(failure)  # a 500, and the failure logged

        made.addCallbacks(send, failed)
        return NOT_DONE_YET


class MetricsService(Service):
    """Serves MetricsPage on an endpoint; `whenListening()` gives the bound port."""

    def __init__(self, endpoint: Any, metrics: PrometheusMetrics, runtime: Any, reactor: Any):
        self.endpoint = endpoint
        self.site = Site(MetricsPage(metrics, runtime, reactor))
        self.site.displayTracebacks = False
        self._listening: Deferred | None = None

    def privilegedStartService(self) -> None:
        """Bind before twistd drops privileges; a port that cannot be bound stops the start."""
        super().privilegedStartService()
        self._listening = self.endpoint.listen(self.site)
        failures: list[Failure] = []
        self._listening.addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    def startService(self) -> None:
        if self._listening is None:
            self.privilegedStartService()
        super().startService()

    def whenListening(self) -> Deferred:
        """Fires with the listening port."""
        waiter: Deferred = Deferred()
        self._listening.addCallback(lambda port: (waiter.callback(port), port)[1])
        return waiter

    def stopService(self) -> Deferred:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        return listening.addCallback(lambda port: port.stopListening())
