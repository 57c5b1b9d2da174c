"""The l4m wire over real loopback sockets: handshake, auth, jobs, faults (issue 6, points 2 and 4)."""

from __future__ import annotations

import gc

import msgpack
import pytest
import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from pie.engine import batch
from pie.interfaces import InstanceFault, PieError
from pie.remote import client, server, wire
from tests.model_fixtures import model_path
from tests.remote_helpers import SECRET, FakeWorker, listen_worker


class RawClient(WebSocketClientProtocol):
    """Speaks the wire by hand: answers the challenge with factory.reply(nonce)."""

    def onOpen(self):
        self.factory.messages = []

    def onMessage(self, payload, isBinary):
        message = msgpack.unpackb(payload, raw=False)
        self.factory.messages.append(message)
        if message["type"] == "challenge":
            for frame in self.factory.reply(message["nonce"]):
                self.sendMessage(msgpack.packb(frame, use_bin_type=True), isBinary=True)

    def onClose(self, wasClean, code, reason):
        self.factory.closed.callback((code, reason))


async def raw_exchange(url: str, reply) -> tuple[list[dict], int]:
    """Connect by hand, answer the challenge with reply(nonce); (messages, close code)."""
    factory = WebSocketClientFactory(url, protocols=[wire.SUBPROTOCOL])
    factory.protocol = RawClient
    factory.reply = reply
    factory.closed = Deferred()
    port = int(url.rsplit(":", 1)[1])
    await clientFromString(reactor, f"tcp:host=127.0.0.1:port={port}").connect(factory)
    code, _reason = await factory.closed
    return factory.messages, code


class WireTests(unittest.TestCase):
    async def asyncSetUp(self):
        self.fake = FakeWorker()
        self.server, port, self.url = await listen_worker(self.fake)
        self.addCleanup(port.stopListening)

    async def attach(self, name: str = "w1", secret: bytes = SECRET) -> client.RemoteWorker:
        worker = await client.connect_worker(self.url, secret, name)
        self.addCleanup(worker.close)
        return worker

    def setUp(self):
        return Deferred.fromCoroutine(self.asyncSetUp())

    async def test_handshake_reports_the_model_and_ships_the_tokenizer(self):
        """welcome carries WorkerInfo (model, page size, dist size, capacity) and the tokenizer."""
        worker = await self.attach()
        self.assertEqual(worker.info, self.fake.info)
        self.assertEqual(worker.remote_name, "w-test")
        self.assertEqual(worker.tokenizer.tokenize("c a b<end>"), [2, 0, 1, 8])
        self.assertEqual(worker.tokenizer.detokenize([2, 0, 8]), "ca<end>")
        self.assertEqual(worker.tokenizer.vocabs(), self.fake.tokenizer.vocabs())
        self.assertEqual(worker.tokenizer.chat_template, "{{ messages }}")
        self.assertEqual(worker.tokenizer.eos_token_ids, [8])

    async def test_results_equal_the_in_process_worker(self):
        """Forward (dists and sampled), GetDistributions and Query answer exactly as in-process."""
        worker = await self.attach()
        jobs = [
            batch.Forward(
                [
                    batch.ForwardItem(
                        pages=[0],
                        last_page_len=3,
                        positions=[0, 1, 2],
                        tokens=[1, 2, 3],
                        output_indices=[1, 2],
                    ),
                    batch.ForwardItem(
                        pages=[1],
                        last_page_len=1,
                        positions=[0],
                        tokens=[5],
                        output_indices=[0],
                        sampling=batch.Sampling(temperature=0.5, seed=7),
                    ),
                ]
            ),
            batch.GetDistributions(slots=[4, 9]),
            batch.Query("ping"),
            batch.CopyKv(src=0, dst=1, src_offset=0, dst_offset=0, size=3),
        ]
        direct = FakeWorker()
        for job in jobs:
            expected = await direct.execute(job)
            self.assertEqual(await worker.execute(job), expected)
        self.assertEqual(self.fake.executed, jobs)

    async def test_jobs_are_pipelined_and_run_in_submission_order(self):
        """Many jobs sent without waiting run in order and each answer finds its caller."""
        worker = await self.attach()
        results = [worker.execute(batch.Query(str(i))) for i in range(50)]
        for i, d in enumerate(results):
            self.assertEqual(await d, f"echo {i}")
        self.assertEqual([job.text for job in self.fake.executed], [str(i) for i in range(50)])

    async def test_worker_errors_become_instance_faults(self):
        """A job the worker rejects errbacks with InstanceFault carrying the worker's message."""
        worker = await self.attach()
        with self.assertRaises(InstanceFault) as caught:
            await worker.execute(batch.Query("fail"))
        self.assertEqual(str(caught.exception), "model worker w1: page 99 is not allocated")
        with self.assertRaises(InstanceFault) as caught:
            await worker.execute(batch.Query("crash"))
        self.assertIn("ZeroDivisionError: division by zero", str(caught.exception))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(await worker.execute(batch.Query("ping")), "pong")

    async def test_wrong_token_is_refused(self):
        """A daemon without the worker's secret is refused before any job runs."""
        with self.assertRaises(PieError) as caught:
            await client.connect_worker(self.url, b"x" * 32, "w1")
        self.assertEqual(
            str(caught.exception),
            f"model worker at {self.url} refused the daemon: bad worker token",
        )

    async def test_second_daemon_is_refused_until_the_first_detaches(self):
        """Only the daemon that attached may use the worker; after a detach it can be re-attached."""
        first = await client.connect_worker(self.url, SECRET, "w1")
        with self.assertRaises(PieError) as caught:
            await client.connect_worker(self.url, SECRET, "w1-again")
        self.assertIn(
            "refused the daemon: already attached to the daemon at tcp4:127.0.0.1:",
            str(caught.exception),
        )
        await first.close()
        with self.assertRaises(InstanceFault):
            await first.execute(batch.Query("ping"))
        second = await self.attach("w1-again")
        self.assertEqual(await second.execute(batch.Query("ping")), "pong")

    async def test_job_before_hello_is_refused(self):
        """A peer that skips the hello gets `refused` and a close; nothing reaches the worker."""
        job = {"type": "job", "id": 1, "job": batch.to_wire(batch.Query("ping"))}
        messages, code = await raw_exchange(self.url, lambda nonce: [job])
        self.assertEqual([m["type"] for m in messages], ["challenge", "refused"])
        self.assertEqual(messages[1]["reason"], "'job' before a successful hello")
        self.assertEqual(code, wire.CLOSE_REFUSED)
        self.assertEqual(self.fake.executed, [])

    async def test_protocol_version_mismatch_is_refused(self):
        """A hello for another protocol version is refused with both versions named."""

        def hello(nonce):
            return [{"type": "hello", "protocol": 99, "proof": wire.proof(SECRET, nonce)}]

        messages, code = await raw_exchange(self.url, hello)
        self.assertEqual(
            messages[-1]["reason"], "protocol version mismatch: worker speaks 1, daemon sent 99"
        )

    async def test_replayed_proof_is_refused(self):
        """A proof made for another nonce (a replay) does not authenticate."""
        stale = wire.proof(SECRET, b"\0" * 32)
        messages, _ = await raw_exchange(
            self.url, lambda nonce: [{"type": "hello", "protocol": 1, "proof": stale}]
        )
        self.assertEqual(messages[-1]["reason"], "bad worker token")

    async def test_bad_frames_from_a_stranger_do_not_disturb_the_daemon(self):
        """A stranger's garbage is closed with 4003 while the attached daemon keeps working."""
        worker = await self.attach()
        messages, code = await raw_exchange(self.url, lambda nonce: [["not", "a", "map"]])
        self.assertEqual(code, wire.CLOSE_BAD_FRAME)
        self.assertEqual(await worker.execute(batch.Query("ping")), "pong")

    async def test_lost_worker_fails_pending_and_future_jobs(self):
        """When the connection drops, pending and later jobs errback with InstanceFault naming it."""
        worker = await self.attach()
        lost = []
        worker.on_lost(lambda w, reason: lost.append((w, reason)))
        parked = worker.execute(batch.Query("park"))
        await worker.execute(batch.Query("ping"))  # the park job has reached the worker
        self.server.daemon.transport.abortConnection()
        with self.assertRaises(InstanceFault) as caught:
            await parked
        self.assertTrue(str(caught.exception).startswith(f"model worker w1 at {self.url} lost: "))
        with self.assertRaises(InstanceFault):
            await worker.execute(batch.Query("ping"))
        self.assertEqual(lost, [(worker, worker.lost_reason)])
        self.fake.parked.pop().callback("late")  # the worker's late answer goes nowhere ...
        gc.collect()  # ... and leaves no unhandled error behind (trial would report it)


class SilentHostTests(unittest.TestCase):
    async def test_worker_that_stops_answering_pings_is_lost(self):
        """A worker whose host vanished without closing TCP (no pongs) is lost after the ping
        timeout; autobahn's ping timers run on txaio's loop, here a Clock."""
        clock = Clock()
        self.patch(txaio.config, "loop", clock)
        server, port, url = await listen_worker(FakeWorker())
        self.addCleanup(port.stopListening)
        worker = await client.connect_worker(url, SECRET, "w1")
        lost = Deferred()
        worker.on_lost(lambda w, reason: lost.callback(reason))
        parked = worker.execute(batch.Query("park"))
        daemon = server.daemon
        daemon.transport.pauseProducing()  # the worker reads nothing more: no pongs
        clock.advance(wire.PING_INTERVAL_S)
        self.assertNoResult(lost)
        clock.advance(wire.PING_TIMEOUT_S + 1)
        reason = await lost
        self.assertTrue(reason.startswith(f"model worker w1 at {url} lost: "), reason)
        with self.assertRaises(InstanceFault):
            await parked
        daemon.transport.abortConnection()  # paused, it would not notice the close


class ConnectFailureTests(unittest.TestCase):
    async def test_silent_worker_times_out(self):
        """A peer that accepts the connection but never answers fails after the timeout, clearly."""
        accepted = Deferred()

        class Silent(Protocol):
            def connectionMade(self):
                accepted.callback(self)

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Silent)
        )
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}"
        clock = Clock()
        d = client.connect_worker(url, SECRET, "w1", clock=clock, timeout=5)
        silent = await accepted
        self.addCleanup(silent.transport.loseConnection)
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        failure = self.failureResultOf(d, PieError)
        self.assertEqual(
            str(failure.value), f"model worker at {url} did not complete the handshake within 5 s"
        )

    async def test_unreachable_worker(self):
        """A closed port fails the attach with 'unreachable'."""
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        number = port.getHost().port
        await port.stopListening()
        with self.assertRaises(PieError) as caught:
            await client.connect_worker(f"ws://127.0.0.1:{number}", SECRET, "w1")
        self.assertIn("is unreachable", str(caught.exception))

    def test_bad_endpoint(self):
        """Malformed endpoints fail at once; Pie's tcp:// form and bare host:port are accepted."""
        self.failureResultOf(client.connect_worker("ipc:///tmp/x", SECRET, "w"), PieError)
        self.assertEqual(wire.parse_endpoint("tcp://10.1.2.3:9100"), ("10.1.2.3", 9100))
        self.assertEqual(wire.parse_endpoint("localhost:80"), ("localhost", 80))
        self.assertRaises(PieError, wire.parse_endpoint, "ws://host:70000")

    def test_worker_needs_a_secret(self):
        """A worker cannot be started without a token."""
        self.assertRaises(PieError, server.WorkerServerFactory, FakeWorker(), b"", "w")


class TokenizerWireTests(unittest.TestCase):
    def test_bos_from_the_post_processor_survives_the_handshake(self):
        """A folder whose tokenizer.json prepends <bos> (as Gemma's and Llama's do) asks for it;
        one without a post-processor does not; the daemon's copy says the same."""
        import tempfile

        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import processors

        from pie.engine.tokenizer import Tokenizer
        from tests.model_fixtures import write_byte_tokenizer

        with tempfile.TemporaryDirectory() as folder:
            write_byte_tokenizer(folder)
            plain = Tokenizer.from_folder(folder)
            path = f"{folder}/tokenizer.json"
            backend = HFTokenizer.from_file(path)
            bos = backend.token_to_id("<|im_start|>")
            backend.post_processor = processors.TemplateProcessing(
                single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
            )
            backend.save(path)
            wanting = Tokenizer.from_folder(folder)
        self.assertIsNone(plain.bos_token_id)
        self.assertEqual(wanting.bos_token_id, bos)
        self.assertEqual(wanting.tokenize("the"), plain.tokenize("the"))  # never added by tokenize
        shipped = wire.tokenizer_from_wire(
            wire.unpack(wire.pack(dict(wire.tokenizer_to_wire(wanting), type="t")))
        )
        self.assertEqual(shipped.bos_token_id, bos)

    @pytest.mark.slow  # loads the real model
    def test_smollm2_tokenizer_survives_the_handshake(self):
        """The default model's tokenizer, shipped through msgpack, encodes and decodes identically."""
        path = model_path()
        if path is None:
            raise unittest.SkipTest(
                "SmolLM2 GGUF not in $PIE_HOME/models (pie model add smollm2-135m-instruct)"
            )
        from gguf import GGUFReader

        from pie.engine.loaders.gguf_loader import read_metadata
        from pie.engine.tokenizer import Tokenizer

        original = Tokenizer.from_gguf_metadata(read_metadata(GGUFReader(path)))
        shipped = wire.tokenizer_from_wire(
            wire.unpack(wire.pack(dict(wire.tokenizer_to_wire(original), type="t")))
        )
        text = "<|im_start|>user\nPrix: 1234,56 € — naïve café 😀<|im_end|>\n"
        self.assertEqual(shipped.tokenize(text), original.tokenize(text))
        ids = original.tokenize(text)
        self.assertEqual(shipped.detokenize(ids), original.detokenize(ids))
        self.assertEqual(shipped.vocabs(), original.vocabs())
        self.assertEqual(shipped.eos_token_ids, original.eos_token_ids)
        self.assertEqual(shipped.chat_template, original.chat_template)
        self.assertTrue(wire.tokenizer_to_wire(original)["byte_level"])
