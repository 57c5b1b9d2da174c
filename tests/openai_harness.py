"""The daemon's `--openai` endpoint over a real runtime, for the OpenAI endpoint tests.

The daemon is composed with tap.makeService (the client listener and the
OpenAI endpoint, auth on) over a real runtime whose model is SmolLM2 in
float32 (loaded once per process, as test_inferlets_apps does, so greedy text
is the same on every CPU). Tests talk to it over loopback: the official client
(in a thread: it is synchronous) for what applications do, raw HTTP for what a
client library would not send.
"""

from __future__ import annotations

import os

import openai
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from pie import tap
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.runtime import Runtime
from pie.server.auth import issue_token
from tests.model_fixtures import model_path, shared_worker
from tests.pieserver import SECRET

LOOPBACK = "tcp:0:interface=127.0.0.1"
QUESTION = "What is the capital of France?"


class OpenAIHarness(unittest.TestCase):
    """setUp starts the daemon; `call`/`chat` use the official client."""

    timeout = 240

    async def setUp(self) -> None:
        if model_path() is None:
            raise unittest.SkipTest("SmolLM2 is not in $PIE_HOME/models")
        from pie.service.service import ModelService

        self.service = ModelService(shared_worker(), reactor=reactor)
        home = os.path.abspath(self.mktemp())
        runtime = Runtime(home, {"smollm2": self.service}, DevExecutor(), reactor)
        options = tap.Options()
        options.parseOptions(
            ["--openai", LOOPBACK, "--port", LOOPBACK, "--auth-secret", SECRET, "--home", home]
        )
        self.daemon = tap.makeService(options, reactor, runtime=runtime)
        self.daemon.startService()
        self.addCleanup(self.daemon.stopService)
        self.runtime = runtime
        self.endpoint = self.daemon.getServiceNamed("openai")
        await self.endpoint.whenServing()
        self.key = issue_token(SECRET, subject="app")  # what `pie token` prints
        self.model = self.service.name

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.endpoint.port}/v1"

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0)

    async def call(self, method: str, *path: str, key: str | None = None, **kwargs):
        """client.PATH.METHOD(**kwargs) in a thread, on a client closed after it
        (a stream is read to its end there: the list of its chunks)."""

        def blocking():
            with self.client(key) as client:
                target = client
                for name in path:
                    target = getattr(target, name)
                result = getattr(target, method)(**kwargs)
                return list(result) if isinstance(result, openai.Stream) else result

        return await deferToThread(blocking)

    async def chat(self, **kwargs):
        messages = [{"role": "user", "content": kwargs.pop("question", QUESTION)}]
        return await self.call(
            "create", "chat", "completions", model=self.model, messages=messages, **kwargs
        )
