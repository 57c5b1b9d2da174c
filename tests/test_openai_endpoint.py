"""`--openai`: the daemon's OpenAI endpoint driven by the official `openai` client.

The daemon and the client helpers are tests/openai_harness.py. Greedy answers
are compared with what the `text_completion` example app gives over pie's own
protocol.
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

from pie.client.tx import connect
from pie.server.auth import issue_token
from pie.server.uploads import hash_program
from tests.openai_harness import LOOPBACK, QUESTION, OpenAIHarness
from tests.pied import Daemon
from tests.pieserver import ROOT

pytestmark = pytest.mark.slow


class OpenAIEndpointTests(OpenAIHarness):
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

    async def test_response_format_json_schema_and_json_object(self):
        """Structured outputs (issue 13 on the endpoint): a strict json_schema reply parses
        and validates, at temperature 1 too; json_object gives a JSON object."""
        import jsonschema

        schema = {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "population": {"type": "integer"},
                "coastal": {"type": "boolean"},
            },
            "required": ["city", "population", "coastal"],
            "additionalProperties": False,
        }
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        }
        for temperature in (0, 1.0):
            answer = await self.chat(
                max_tokens=60, temperature=temperature, seed=3, response_format=response_format
            )
            choice = answer.choices[0]
            jsonschema.validate(json.loads(choice.message.content), schema)
            self.assertEqual(choice.finish_reason, "stop")
        answer = await self.chat(
            max_tokens=60, temperature=0, response_format={"type": "json_object"}
        )
        content = answer.choices[0].message.content
        if answer.choices[0].finish_reason == "stop":
            self.assertIsInstance(json.loads(content), dict)
        else:  # cut at max_tokens: still the start of an object
            self.assertTrue(content.startswith("{"), content)

    async def test_malformed_requests_get_openai_errors(self):
        headers = {"authorization": f"Bearer {self.key}", "content-type": "application/json"}
        url = f"{self.base_url}/chat/completions"
        good = {"model": self.model, "messages": [{"role": "user", "content": "hi"}]}
        for data, param in (
            (b"{not json", None),
            (json.dumps({**good, "temperature": "hot"}).encode(), "temperature"),
            (json.dumps({**good, "stream": "yes"}).encode(), "stream"),
            (
                json.dumps({**good, "stream_options": {"include_usage": True}}).encode(),
                "stream_options",
            ),
            (
                json.dumps(
                    {
                        **good,
                        "response_format": {
                            "type": "json_schema",
                            "json_schema": {
                                "name": "bad",
                                "schema": {"type": "object", "properties": {"a": {"type": 7}}},
                            },
                        },
                    }
                ).encode(),
                "response_format",
            ),  # a malformed schema: the grammar library's message, a 400
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
