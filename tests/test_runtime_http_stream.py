"""Streamed responses of server instances (issue 12 point 3): an SDK server inferlet on a real
loopback port, the dev executor, and the real model service on a fake worker (its page pool)."""

from __future__ import annotations

import os
import textwrap

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from twisted.web.client import Agent, ResponseDone, ResponseFailed, readBody

from pie.runtime.executors.dev import DevExecutor
from pie.service.service import ModelService
from tests.rawhttp import connect, until
from tests.runtime_doubles import CharTokenizer, RecordingOwner, make_runtime
from tests.service_doubles import FakeWorker

PAGES = 8
BIG_CHUNK = 256 * 1024
BIG_COUNT = 64  # 16 MiB: far more than the sockets' buffers hold

STREAMER = textwrap.dedent(
    f"""
    from pie.inferlet import gather, get_auto_model, receive
    from pie.inferlet.server import http_main

    async def handle(request):
        if request.path == "/stream":
            queue = get_auto_model().create_queue()
            queue.command("allocate_kv_pages", [0, 1])
            await queue.synchronize()
            resp = await request.start_response(
                200, {{"content-type": "text/event-stream", "x-stream": "yes"}}
            )
            await resp.write("data: chunk-1\\n\\n")
            await receive()                      # the test's signal
            await resp.write(b"data: chunk-2\\n\\n")
            await resp.finish()
            return None
        if request.path == "/big":
            resp = await request.start_response(200)
            for _ in range({BIG_COUNT}):
                await resp.write(b"x" * {BIG_CHUNK})
            return None                          # finished for it
        if request.path == "/big-twice":         # two tasks write at once
            resp = await request.start_response(200)

            async def writer(byte):
                for _ in range({BIG_COUNT} // 2):
                    await resp.write(byte * {BIG_CHUNK})

            await gather(writer(b"x"), writer(b"y"))
            return None
        if request.path == "/fail":
            resp = await request.start_response(200)
            await resp.write("partial")
            raise RuntimeError("handler failed mid-stream")
        return "plain answer"

    main = http_main(handle)
    """
).encode()


class _Chunks(Protocol):
    """A response body as it arrives: each dataReceived into `chunks`; `done` at the end."""

    def __init__(self) -> None:
        self.chunks: DeferredQueue = DeferredQueue()
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.put(data)

    def connectionLost(self, reason) -> None:
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class StreamTests(unittest.TestCase):
    def setUp(self):
        worker = FakeWorker(num_pages=PAGES, page_size=4)
        worker.tokenizer = CharTokenizer()
        self.service = ModelService(worker)
        self.runtime = make_runtime(
            self,
            home=os.path.abspath(self.mktemp()),
            executor=DevExecutor(),
            services={"fake": self.service},
        )

    async def serve(self) -> int:
        digest = await self.runtime.add_program(STREAMER)
        self.server_id = await self.runtime.launch_server(digest, 0, [], RecordingOwner())
        return self.runtime.servers[self.server_id].port

    def free_pages(self) -> int:
        return self.service.status()["free_kv_pages"]

    def only_request(self):
        [instance] = self.runtime.servers[self.server_id].in_flight
        return instance

    async def test_chunks_arrive_while_the_handler_still_runs(self):
        port = await self.serve()
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/stream".encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(response.headers.getRawHeaders(b"x-stream"), [b"yes"])
        body = _Chunks()
        response.deliverBody(body)
        self.assertEqual(await body.chunks.get(), b"data: chunk-1\n\n")
        instance = self.only_request()  # still parked in receive(), holding its pages
        self.assertFalse(instance.ended)
        self.assertEqual(self.free_pages(), PAGES - 2)
        self.runtime.signal(instance.id, "go on")
        self.assertEqual(await body.chunks.get(), b"data: chunk-2\n\n")
        await body.done
        await instance.when_ended()
        self.assertEqual(self.free_pages(), PAGES)

    async def test_client_disconnect_mid_stream_ends_the_instance_and_frees_its_pages(self):
        port = await self.serve()
        self.assertEqual(self.free_pages(), PAGES)
        client = await connect(port)
        client.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await client.seen(b"chunk-1")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        instance = self.only_request()
        self.assertEqual(self.free_pages(), PAGES - 2)
        client.transport.abortConnection()
        reason, _ = await instance.when_ended()
        self.assertEqual(reason, "HTTP client disconnected")
        self.assertEqual(self.free_pages(), PAGES)
        self.assertEqual(self.runtime.servers[self.server_id].in_flight, set())

    async def slow_read(self, path: bytes, writers: int) -> bytes:
        """GET path without reading until `writers` guest tasks park in write(); then read all."""
        port = await self.serve()
        client = await connect(port)
        client.transport.pauseProducing()  # read nothing: the buffers fill up
        client.send(b"GET " + path + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
        await until(lambda: self.runtime.servers[self.server_id].in_flight, "the request")
        instance = self.only_request()
        exchange = self.runtime.servers[self.server_id].exchanges[instance.id]
        await until(lambda: len(exchange._drained) == writers, "the writers to wait")
        self.assertFalse(instance.ended)  # parked in write(), not done
        client.transport.resumeProducing()
        received = await client.response()
        self.assertTrue(received.endswith(b"\r\n0\r\n\r\n"))  # the last chunk: finished for it
        self.assertTrue(instance.ended)
        return received.partition(b"\r\n\r\n")[2]

    async def test_a_slow_reader_parks_the_writer(self):
        body = await self.slow_read(b"/big", writers=1)
        self.assertEqual(body.count(b"x"), BIG_COUNT * BIG_CHUNK)

    async def test_every_parked_writer_resumes(self):
        body = await self.slow_read(b"/big-twice", writers=2)
        self.assertEqual((body.count(b"x"), body.count(b"y")), (BIG_COUNT * BIG_CHUNK // 2,) * 2)

    async def test_a_failure_after_the_start_cuts_the_body_short(self):
        port = await self.serve()
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/fail".encode())
        self.assertEqual(response.code, 200)
        body = _Chunks()
        response.deliverBody(body)
        self.assertEqual(await body.chunks.get(), b"partial")
        with self.assertRaises(ResponseFailed):  # no last chunk: the client knows it is cut short
            await body.done

    async def test_a_plain_return_still_answers_once(self):
        port = await self.serve()
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/".encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(await readBody(response), b"plain answer")
