"""Real `pie worker` processes attached to a real Runtime (issue 6, points 2, 3, 4, 5).

Each test starts worker processes over a tiny random model (tests/model_fixtures.write_tiny_model),
attaches them with attach_remote_service (service type l4m) and runs inferlets through the
dev executor, so the whole path is real: SDK -> host table -> ModelPool -> ModelService ->
RemoteWorker -> WebSocket -> worker process -> Engine.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from twisted.internet.defer import ensureDeferred, gatherResults

from pie.engine import batch
from pie.engine.loaders import load_model
from pie.interfaces import PieError
from pie.remote import client
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.instances import NORMAL_FINISH
from pie.service.local import start_worker
from pie.service.service import ModelService
from tests.fixtures.tp_rank import engine_for, jobs
from tests.pieserver import LiveServer, token
from tests.remote_case import PROMPT, RemoteWorkerCase
from tests.runtime_doubles import make_runtime

pytestmark = pytest.mark.slow


class AttachUseDetachTests(RemoteWorkerCase):
    async def test_same_tokens_as_in_process_then_detach_and_reattach(self):
        """An inferlet on a remote worker emits the tokens it emits in-process; detach ends its
        instances only; the same worker attaches again; names and tokens are checked."""
        process, url = await self.worker()
        text = await self.runtime.attach_remote_service(url, "l4m", "w1")
        self.assertTrue(text.startswith(f"Attached to L4M worker w1 at {url}: model tiny"), text)
        (status,) = self.runtime.model_status()
        self.assertEqual((status["model_name"], status["num_kv_pages"]), ("tiny", 64))
        self.assertEqual([w["name"] for w in status["workers"]], ["w1"])

        remote_id = await self.launch(PROMPT, "12")
        self.assertEqual(await self.owner.ended(remote_id), NORMAL_FINISH)

        local_worker = start_worker(
            load_model(self.model), device="cpu", dtype="float32", num_pages=64
        )
        self.addCleanup(local_worker.close)
        local = make_runtime(
            self, executor=DevExecutor(), services={"tiny": ModelService(local_worker)}
        )
        local_id = await self.launch(PROMPT, "12", runtime=local)
        self.assertEqual(await self.owner.ended(local_id), NORMAL_FINISH)
        (remote_tokens,) = self.owner.messages(remote_id)
        self.assertEqual(remote_tokens, self.owner.messages(local_id)[0])
        self.assertEqual(len(remote_tokens.split(",")), 12)

        with self.assertRaises(PieError) as caught:
            await self.runtime.attach_remote_service(url, "l4m", "w1")
        self.assertIn("a model worker named 'w1' is already attached", str(caught.exception))

        holder = await self.launch(PROMPT, "3", "hold")
        await self.owner.heard(holder, "ready")
        await self.pool().detach("w1")
        self.assertEqual(await self.owner.ended(holder), f"model worker w1 at {url} detached")
        self.assertEqual(self.runtime.model_status()[0]["workers"], [])

        await self.runtime.attach_remote_service(url, "l4m", "w1")
        again = await self.launch(PROMPT, "12")
        self.assertEqual(await self.owner.ended(again), NORMAL_FINISH)
        self.assertEqual(self.owner.messages(again), [remote_tokens])

    async def test_worker_with_another_token_refuses_the_daemon(self):
        """A worker whose secret differs from the daemon's refuses the attach."""
        other = os.path.join(os.path.dirname(self.home), "other-token")
        with open(other, "w") as f:
            f.write("u" * 64)
        _process, url = await self.worker(token_file=other)
        with self.assertRaises(PieError) as caught:
            await self.runtime.attach_remote_service(url, "l4m", "w1")
        self.assertEqual(
            str(caught.exception), f"model worker at {url} refused the daemon: bad worker token"
        )
        self.assertEqual(self.runtime.model_status(), [])


class FaultTests(RemoteWorkerCase):
    async def test_killed_worker_ends_only_its_instances_and_can_be_replaced(self):
        """Two workers share four instances; SIGKILL on one ends exactly its two instances with a
        reason naming it, the others finish normally, and a new worker attaches under its name."""
        (p1, url1), (p2, url2) = await gatherResults(
            [ensureDeferred(self.worker()) for _ in range(2)]
        )
        await self.runtime.attach_remote_service(url1, "l4m", "w1")
        await self.runtime.attach_remote_service(url2, "l4m", "w2")
        holders = [await self.launch(PROMPT, "3", "hold") for _ in range(4)]
        await gatherResults([self.owner.heard(h, "ready") for h in holders])
        pool = self.pool()
        on_w1 = set(pool.members["w1"].instances)
        on_w2 = set(pool.members["w2"].instances)
        self.assertEqual((len(on_w1), len(on_w2)), (2, 2))

        await p1.stop("KILL")
        for instance_id in on_w1:
            reason = await self.owner.ended(instance_id)
            self.assertTrue(reason.startswith(f"model worker w1 at {url1} lost: "), reason)
        for instance_id in on_w2:
            self.runtime.signal(instance_id, "go")
            self.assertEqual(await self.owner.ended(instance_id), NORMAL_FINISH)
            self.assertEqual(len(self.owner.messages(instance_id)), 3)
        self.assertEqual([w["name"] for w in self.runtime.model_status()[0]["workers"]], ["w2"])

        _p3, url3 = await self.worker()
        await self.runtime.attach_remote_service(url3, "l4m", "w1")
        fresh = [await self.launch(PROMPT, "4") for _ in range(2)]
        for instance_id in fresh:
            self.assertEqual(await self.owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(sorted(len(m.instances) for m in pool.members.values()), [0, 0])


class TensorParallelWorkerTests(RemoteWorkerCase):
    async def test_tp2_worker_process_answers_like_tp1(self):
        """`pie worker --tp 2` (two gloo ranks) answers the wire's jobs like one in-process engine."""
        process, url = await self.worker(
            "--tp",
            "2",
            "--page-size",
            "4",
            "--num-embeds",
            "8",
            "--dist-size",
            "8",
            "--num-pages",
            "8",
        )
        worker = await client.connect_worker(url, b"t" * 64, "tp2")
        self.assertEqual(worker.info.model_name, "tiny")
        loaded = load_model(self.model)
        from pie.engine.llama import LlamaModel

        single = engine_for(LlamaModel(loaded.config, loaded.weights), loaded.tokenizer, 8)
        for job in jobs():
            got, want = await worker.execute(job), single.run(job)
            for got_item, want_item in zip(got, want, strict=True):
                for (got_ids, got_p), (want_ids, want_p) in zip(got_item, want_item, strict=True):
                    self.assertEqual(got_ids, want_ids)
                    torch.testing.assert_close(
                        torch.tensor(got_p), torch.tensor(want_p), rtol=1e-4, atol=1e-6
                    )
        self.assertEqual(await worker.execute(batch.Query("ping")), "pong")
        await worker.close()
        self.assertEqual(await process.stop(), 0)


class ProtocolAttachTests(RemoteWorkerCase):
    async def test_admin_attaches_over_the_client_protocol(self):
        """Through the real server: an admin's attach_remote_service answers success, model_status
        lists the worker, an unknown service type fails clearly."""
        _process, url = await self.worker()
        server = await LiveServer(self, runtime=self.runtime, auth=True).start()
        client = await server.connect()

        async def call(message: dict) -> dict:
            client.send(message)
            return await client.messages.get()

        answer = await call({"type": "authenticate", "corr_id": 1, "token": token(role="Admin")})
        self.assertTrue(answer["successful"], answer)
        attach = {"type": "attach_remote_service", "corr_id": 2, "endpoint": url}
        answer = await call(dict(attach, service_type="l4m", service_name="w1"))
        self.assertEqual((answer["corr_id"], answer["successful"]), (2, True), answer)
        self.assertIn("Attached to L4M worker w1", answer["result"])
        answer = await call(
            {"type": "query", "corr_id": 3, "subject": "model_status", "record": ""}
        )
        (status,) = json.loads(answer["result"])
        self.assertEqual((status["model_name"], status["workers"][0]["endpoint"]), ("tiny", url))
        answer = await call(dict(attach, corr_id=4, service_type="grpc", service_name="w2"))
        self.assertEqual(answer["successful"], False)
        self.assertIn("Unknown service type: 'grpc'", answer["result"])

    async def test_worker_asks_the_daemon_to_attach_it(self):
        """`pie worker --attach DAEMON` (Pie's direction): the worker, with an admin token in
        $PIE_TOKEN, asks the daemon to attach it; a user token is refused."""
        server = await LiveServer(self, runtime=self.runtime, auth=True).start()
        daemon = f"ws://127.0.0.1:{server.port_number}"
        process, url = await self.worker(
            "--attach", daemon, "--service-name", "w7", env={"PIE_TOKEN": token(role="Admin")}
        )
        line = await process.said("pie worker: attached: ")
        self.assertIn(f"Attached to L4M worker w7 at {url}", line)
        self.assertEqual(self.runtime.model_status()[0]["workers"][0]["name"], "w7")

        refused, _url = await self.worker(
            "--attach", daemon, "--service-name", "w8", env={"PIE_TOKEN": token(role="User")}
        )
        line = await refused.said("pie worker: attach failed: ")
        self.assertIn("Admin", line)
        self.assertEqual(len(self.runtime.model_status()[0]["workers"]), 1)
