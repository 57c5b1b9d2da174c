"""`--openai`: the daemon's OpenAI endpoint driven by the official `openai` client.

Each test composes the daemon with tap.makeService (the client listener and
the OpenAI endpoint, auth on) over a real runtime whose model is SmolLM2 in
float32 (loaded once for the module, as test_inferlets_apps does, so greedy
text is the same on every CPU), and talks to it over loopback: the official
client (in a thread: it is synchronous) for what applications do, raw HTTP
(treq) for what a client library would not send. Greedy answers are compared
with what the `text_completion` example app gives over pie's own protocol.
"""

from __future__ import annotations

import json
import os
import re
import time

import openai
import pytest
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from pie import tap
from pie.client.tx import connect
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.runtime import Runtime
from pie.server.auth import issue_token
from pie.server.uploads import hash_program
from tests.model_fixtures import model_path, shared_worker
from tests.pied import Daemon
from tests.pieserver import ROOT, SECRET

pytestmark = pytest.mark.slow

LOOPBACK = "tcp:0:interface=127.0.0.1"
QUESTION = "What is the capital of France?"


class OpenAIEndpointTests(unittest.TestCase):
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
        """client.PATH.METHOD(**kwargs) in a thread, on a client closed after it."""

        def blocking():
            with self.client(key) as client:
                target = client
                for name in path:
                    target = getattr(target, name)
                return getattr(target, method)(**kwargs)

        return await deferToThread(blocking)

    async def chat(self, **kwargs):
        messages = [{"role": "user", "content": kwargs.pop("question", QUESTION)}]
        return await self.call(
            "create", "chat", "completions", model=self.model, messages=messages, **kwargs
        )

    async def text_completion(self, *arguments: str) -> str:
        """The reply of the text_completion app (greedy) over pie's protocol."""
        listener = self.daemon.getServiceNamed("clients")
        port = (await listener.whenListening()).getHost().port
        client = await connect(f"ws://127.0.0.1:{port}", reactor=reactor)
        self.addCleanup(client.close)
        await client.authenticate(self.key)
        with open(os.path.join(ROOT, "inferlets", "text_completion.py"), "rb") as f:
            program = f.read()
        await client.upload_program(program)
        instance = await client.launch_instance(hash_program(program), list(arguments))
        messages = [message async for event, message in instance if event == "message"]
        return messages[0]

    async def test_greedy_chat_and_completions_equal_text_completion(self):
        answer = await self.chat(max_tokens=12, temperature=0)
        want = await self.text_completion("--prompt", QUESTION, "--max-tokens", "12")
        choice = answer.choices[0]
        self.assertEqual(choice.message.content, want)
        self.assertIn("Paris", choice.message.content)
        self.assertEqual((answer.object, choice.message.role), ("chat.completion", "assistant"))
        self.assertLessEqual(answer.usage.completion_tokens, 12)
        self.assertEqual(
            answer.usage.total_tokens, answer.usage.prompt_tokens + answer.usage.completion_tokens
        )
        self.assertLess(abs(answer.created - time.time()), 60)  # wall-clock seconds

        prompt = "The capital of France is"
        legacy = await self.call(
            "create", "completions", model=self.model, prompt=prompt, max_tokens=8, temperature=0
        )
        raw = await self.text_completion("--raw", "--prompt", prompt, "--max-tokens", "8")
        self.assertEqual((legacy.object, legacy.choices[0].text), ("text_completion", raw))
        self.assertEqual(legacy.usage.completion_tokens, 8)

        models = await self.call("list", "models")
        self.assertEqual([m.id for m in models.data], [self.model])
        self.assertEqual((await self.call("retrieve", "models", model=self.model)).id, self.model)
        with self.assertRaises(openai.NotFoundError):
            await self.call("retrieve", "models", model="gpt-4o")

    async def test_stop_n_seed_and_logprobs(self):
        full = (await self.chat(max_tokens=12, temperature=0)).choices[0].message.content
        stop = full[len(full) // 2 : len(full) // 2 + 4]  # a piece from the middle of the reply
        stopped = await self.chat(max_tokens=12, temperature=0, stop=[stop, "\u2603"])
        self.assertEqual(stopped.choices[0].message.content, full[: full.find(stop)])
        self.assertEqual(stopped.choices[0].finish_reason, "stop")

        first = await self.chat(max_tokens=4, temperature=1.0, seed=1234, n=2)
        again = await self.chat(max_tokens=4, temperature=1.0, seed=1234, n=2)
        self.assertEqual([c.index for c in first.choices], [0, 1])
        self.assertEqual(
            [c.message.content for c in first.choices], [c.message.content for c in again.choices]
        )

        scored = await self.chat(max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
        entries = scored.choices[0].logprobs.content
        self.assertEqual(len(entries), scored.usage.completion_tokens)
        self.assertEqual("".join(e.token for e in entries), scored.choices[0].message.content)
        for entry in entries:
            self.assertEqual(len(entry.top_logprobs), 3)
            self.assertEqual(entry.top_logprobs[0].token, entry.token)  # greedy: the top one
            self.assertLessEqual(entry.logprob, 0.0)
        self.assertEqual(self.service.resources.pages.available, self.service.info.num_kv_pages)

    async def test_api_keys(self):
        with self.assertRaises(openai.AuthenticationError):
            await self.call("list", "models", key="not-a-pie-token")
        wrong = issue_token("another-secret-that-is-long-enough-for-hs256!!", subject="x")
        with self.assertRaises(openai.AuthenticationError):
            await self.call("list", "models", key=wrong)
        response = await treq.get(f"{self.base_url}/models", persistent=False)
        body = json.loads(await response.text())
        self.assertEqual((response.code, body["error"]["code"]), (401, "invalid_api_key"))

    async def test_malformed_requests_get_openai_errors(self):
        headers = {"authorization": f"Bearer {self.key}", "content-type": "application/json"}
        url = f"{self.base_url}/chat/completions"
        good = {"model": self.model, "messages": [{"role": "user", "content": "hi"}]}
        for data, param in (
            (b"{not json", None),
            (json.dumps({**good, "temperature": "hot"}).encode(), "temperature"),
            (json.dumps({**good, "stream": True}).encode(), "stream"),
            (
                json.dumps({**good, "response_format": {"type": "json_object"}}).encode(),
                "response_format",
            ),
            (json.dumps({**good, "messages": "hi"}).encode(), "messages"),
        ):
            response = await treq.post(url, data=data, headers=headers, persistent=False)
            error = json.loads(await response.text())["error"]
            self.assertEqual(
                (response.code, error["type"], error["param"]),
                (400, "invalid_request_error", param),
            )
        self.assertRegex(error["message"], re.compile("messages", re.I))

    async def test_the_daemon_restarts_its_endpoint(self):
        first = self.endpoint.server_id
        self.runtime.terminate(first, "killed by the test")
        second = await self.endpoint.whenServing()
        self.assertNotEqual(second, first)
        self.assertEqual(self.endpoint.launches, 2)
        models = await self.call("list", "models")
        self.assertEqual(models.data[0].id, self.model)


class ServeFlagTests(unittest.TestCase):
    """`pie serve --openai` in a child process (no model, no auth): the flag reaches the daemon."""

    timeout = 240

    async def test_pie_serve_openai_flag(self):
        daemon = await Daemon(self).start("--openai", LOOPBACK)
        found = await daemon.child.when_output(rb"pie openai listening on \S*\(.*port=(\d+)")
        url = f"http://127.0.0.1:{int(found.group(1))}/v1"

        def models():
            with openai.OpenAI(base_url=url, api_key="anything", max_retries=0) as client:
                return client.models.list()

        self.assertEqual((await deferToThread(models)).data, [])  # --model none: none served
