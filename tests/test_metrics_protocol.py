"""pie_requests_total as the client protocol and the server instances count it; a failed scrape.

A live WebSocket server (the runtime double behind it) and a real Runtime
serving HTTP on loopback, each with a PrometheusMetrics of its own: every
request must be counted once, under its message type (or `invalid`) and its
outcome, and an HTTP request under its status code or `disconnected`.
"""

from __future__ import annotations

import json

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

import pie.metrics
from pie.metrics import MetricsService, PrometheusMetrics
from pie.runtime.http import HTTP_REQUEST_ARGUMENT
from tests.pieserver import LiveServer, token
from tests.protocol_helpers import PROGRAM, upload
from tests.runtime_doubles import FakeModelService, RecordingOwner, make_runtime


def counts(metrics: PrometheusMetrics) -> dict[tuple[str, str], float]:
    """(endpoint, status) -> pie_requests_total."""
    [family] = [f for f in metrics.registry.collect() if f.name == "pie_requests"]
    return {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in family.samples
        if s.name == "pie_requests_total"
    }


class ProtocolRequestTests(unittest.TestCase):
    async def test_each_request_is_counted_with_its_outcome(self):
        metrics = PrometheusMetrics()
        server = await LiveServer(self, auth=True, metrics=metrics).start()
        client = await server.connect()
        query = {"type": "query", "corr_id": 1, "subject": "program_exists", "record": "0" * 64}
        self.assertFalse((await client.request(query))["successful"])  # not authenticated yet
        bad = {"type": "authenticate", "corr_id": 2, "token": "nonsense"}
        self.assertFalse((await client.request(bad))["successful"])
        good = {"type": "authenticate", "corr_id": 3, "token": token()}
        self.assertTrue((await client.request(good))["successful"])
        self.assertTrue((await upload(client, PROGRAM))["successful"])
        client.send_text("hello")
        self.assertEqual((await client.next())["type"], "server_event")
        client.send({"type": "no_such_type", "corr_id": 4})
        self.assertFalse((await client.next())["successful"])
        client.send({"type": "terminate_instance", "instance_id": "not-mine"})
        self.assertEqual((await client.next())["type"], "server_event")
        self.assertEqual(
            counts(metrics),
            {
                ("query", "error"): 1,
                ("authenticate", "error"): 1,
                ("authenticate", "ok"): 1,
                ("upload_program", "ok"): 1,
                ("invalid", "error"): 2,
                ("terminate_instance", "error"): 1,
            },
        )


PARKED: Deferred = Deferred()


async def handler(host, args):
    """A server program: /park waits for a message, anything else answers 200."""
    assert args[0] == HTTP_REQUEST_ARGUMENT
    if json.loads(args[1])["path"] == "/park":
        PARKED.callback(None)
        await host.call("receive", ())
    return json.dumps({"status": 200, "headers": {}, "body": "ok"})


class HttpRequestTests(unittest.TestCase):
    async def test_status_codes_and_disconnects(self):
        global PARKED
        metrics = PrometheusMetrics()
        runtime = make_runtime(self, services={"fake": FakeModelService()}, metrics=metrics)
        digest = await runtime.add_program(runtime.executor.program(handler))
        server_id = await runtime.launch_server(digest, 0, [], RecordingOwner())
        port = runtime.servers[server_id].port
        response = await treq.get(f"http://127.0.0.1:{port}/", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
        PARKED = Deferred()
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(Protocol)
        )
        client.transport.write(b"GET /park HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await PARKED
        [instance] = runtime.servers[server_id].in_flight
        client.transport.loseConnection()
        await instance.when_ended()
        self.assertEqual(counts(metrics), {("http", "200"): 1, ("http", "disconnected"): 1})


class MetricsPageTests(unittest.TestCase):
    async def test_a_failed_scrape_is_a_500(self):
        """The text is made on a pool thread; if that fails the scraper gets a 500, logged."""
        metrics = PrometheusMetrics()
        runtime = make_runtime(self, metrics=metrics)

        def broken(registry):
            raise RuntimeError("encoder broke")

        self.patch(pie.metrics, "choose_encoder", lambda accept: (broken, "text/plain"))
        service = MetricsService(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), metrics, runtime, reactor
        )
        service.startService()
        self.addCleanup(service.stopService)
        port = (await service.whenListening()).getHost().port
        response = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
        self.assertEqual(response.code, 500)
        await response.content()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
