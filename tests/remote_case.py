"""The base case of the remote-worker tests: a tiny model on disk, a worker token and a runtime."""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap

from twisted.trial import unittest

from pie.remote import client, wire
from pie.runtime.executors.dev import DevExecutor
from pie.service.placement import ModelPool
from tests.model_fixtures import write_tiny_model
from tests.remote_helpers import start_worker_process
from tests.runtime_doubles import RecordingOwner, make_runtime

GREEDY = textwrap.dedent(
    """
    from pie.inferlet import Greedy, Length, get_auto_model, receive, send

    async def main(args):
        ctx = get_auto_model().create_context()
        ctx.fill_tokens([int(t) for t in args[0].split(",")])
        send(",".join(map(str, await ctx.generate_tokens(Greedy(), Length(int(args[1]))))))
        if len(args) > 2:  # hold the KV pages until signalled, then decode two more tokens
            send("ready")
            await receive()
            send(",".join(map(str, await ctx.generate_tokens(Greedy(), Length(2)))))
    """
).encode()

PROMPT = "3,17,5,40,2,9,11"


class RemoteWorkerCase(unittest.TestCase):
    timeout = 240

    def setUp(self):
        tmp = tempfile.mkdtemp(prefix="pie-remote-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.model = os.path.join(tmp, "tiny")
        write_tiny_model(self.model)
        self.home = os.path.join(tmp, "home")
        os.makedirs(self.home)
        self.token_file = os.path.join(self.home, wire.WORKER_TOKEN_FILE)
        with open(self.token_file, "w") as f:
            f.write("t" * 64)
        self.runtime = make_runtime(self, home=self.home, executor=DevExecutor(), services={})
        self.owner = RecordingOwner()

    async def worker(
        self, *extra: str, token_file: str | None = None, env: dict | None = None
    ) -> tuple[client.WorkerProcess, str]:
        process = start_worker_process(self.model, token_file or self.token_file, *extra, env=env)
        self.addCleanup(process.stop, "KILL")
        return process, await process.url

    async def launch(self, *arguments: str, runtime=None) -> str:
        runtime = runtime or self.runtime
        digest = await runtime.add_program(GREEDY)
        return await runtime.launch(digest, list(arguments), self.owner)

    def pool(self) -> ModelPool:
        (pool,) = self.runtime.model_services()
        return pool
