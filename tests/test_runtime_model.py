"""Runtime + the real model service (on a fake worker) + the dev executor: resources and faults end to end."""

from __future__ import annotations

import os
import textwrap

from twisted.trial import unittest

from pie.runtime.executors.dev import DevExecutor
from pie.runtime.instances import NORMAL_FINISH
from pie.service.service import CONTENTION_REASON, ModelService
from tests.runtime_doubles import CharTokenizer, RecordingOwner, make_runtime
from tests.service_doubles import FakeWorker

FORWARD = textwrap.dedent(
    """
    from pie.inferlet import get_auto_model, receive, send

    async def main(args):
        queue = get_auto_model().create_queue()
        queue.command("allocate_kv_pages", [0, 1])
        dists = await queue.forward_text(3, [0], [5, 6, 7], [0, 1, 2], [], [2])
        send(f"{len(dists)} {len(dists[0].ids)}")
        if args == ["wait"] and await receive() == "grow":
            queue.command("allocate_kv_pages", [2, 3])
            await queue.synchronize()
            send("grown")
            await receive()
        if args == ["bad"]:
            await queue.forward_text(1, [42], [8], [3], [], [0])
    """
).encode()


class RealModelServiceTests(unittest.TestCase):
    def setUp(self):
        worker = FakeWorker(num_pages=4, page_size=4)
        worker.tokenizer = CharTokenizer()
        self.service = ModelService(worker)
        self.runtime = make_runtime(
            self,
            home=os.path.abspath(self.mktemp()),
            executor=DevExecutor(),
            services={"fake": self.service},
        )
        self.owner = RecordingOwner()

    async def launch(self, *arguments: str) -> str:
        digest = await self.runtime.add_program(FORWARD)
        return await self.runtime.launch(digest, list(arguments), self.owner)

    def free_pages(self) -> int:
        return self.service.resources.pages.available

    async def test_pages_are_returned_after_a_normal_finish(self):
        instance_id = await self.launch()
        self.assertEqual(await self.owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(self.owner.messages(instance_id), ["1 3"])
        self.assertEqual(self.free_pages(), 4)

    async def test_pages_are_returned_after_terminate(self):
        instance_id = await self.launch("wait")
        await self.owner.heard(instance_id, "1 3")
        self.assertEqual(self.free_pages(), 2)
        self.runtime.terminate(instance_id, "user terminated the program")
        self.assertEqual(await self.owner.ended(instance_id), "user terminated the program")
        self.assertEqual(self.free_pages(), 4)

    async def test_failing_model_call_ends_the_instance_with_the_service_reason(self):
        instance_id = await self.launch("bad")
        reason = await self.owner.ended(instance_id)
        self.assertIn("42", reason)
        self.assertEqual(self.owner.terminations(instance_id), [reason])
        self.assertEqual(self.free_pages(), 4)

    async def test_contention_eviction_goes_through_the_runtime(self):
        """The service evicts the newer instance through runtime.terminate; its owner hears why."""
        older = await self.launch("wait")
        await self.owner.heard(older, "1 3")
        newer = await self.launch("wait")
        await self.owner.heard(newer, "1 3")
        self.assertEqual(self.free_pages(), 0)
        self.runtime.signal(older, "grow")
        self.assertEqual(await self.owner.ended(newer), CONTENTION_REASON)
        await self.owner.heard(older, "grown")
        self.assertEqual(list(self.runtime.instances.running), [older])
        self.runtime.terminate(older, "done")
        await self.owner.ended(older)
        self.assertEqual(self.free_pages(), 4)
        self.assertEqual(self.owner.terminations(newer), [CONTENTION_REASON])
