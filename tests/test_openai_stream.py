"""`stream: true` on the `--openai` endpoint: the official client's streams equal the
non-streamed replies, the SSE framing is OpenAI's, and a client gone mid-stream frees
its instance and KV pages. The daemon is tests/openai_harness.py (SmolLM2, float32)."""

from __future__ import annotations

import json

import pytest
import treq

from tests.openai_harness import QUESTION, OpenAIHarness
from tests.rawhttp import connect, until

pytestmark = pytest.mark.slow

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


def joined(chunks, index: int = 0) -> str:
    return "".join(
        c.choices[0].delta.content or ""
        for c in chunks
        if c.choices and c.choices[0].index == index
    )


class OpenAIStreamTests(OpenAIHarness):
    def free_pages(self) -> int:
        return self.service.resources.pages.available

    async def test_streamed_chat_equals_the_reply(self):
        reply = await self.chat(max_tokens=12, temperature=0)
        chunks = await self.chat(
            max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual(chunks[0].choices[0].delta.content, "")
        self.assertEqual({c.object for c in chunks}, {"chat.completion.chunk"})
        self.assertEqual(len({c.id for c in chunks}), 1)
        self.assertGreater(len(chunks), 4)  # deltas as decoded, not one piece
        self.assertEqual(joined(chunks), reply.choices[0].message.content)
        *body, last_choice, usage = chunks
        self.assertEqual(last_choice.choices[0].finish_reason, reply.choices[0].finish_reason)
        self.assertEqual(last_choice.choices[0].delta.content, None)
        self.assertEqual({c.choices[0].finish_reason for c in body}, {None})
        self.assertEqual({c.usage for c in body + [last_choice]}, {None})
        self.assertEqual((usage.choices, usage.usage), ([], reply.usage))

        two = await self.chat(max_tokens=6, temperature=0, n=2, stream=True)
        self.assertEqual({c.choices[0].index for c in two}, {0, 1})
        self.assertEqual(joined(two, 0), joined(two, 1))
        self.assertEqual([c.choices[0].delta.role for c in two[:2]], ["assistant"] * 2)
        self.assertEqual(self.free_pages(), self.service.info.num_kv_pages)

    async def test_streamed_completion_and_stop(self):
        reply = await self.call(
            "create", "completions", model=self.model, prompt=COUNTING, max_tokens=10, temperature=0
        )
        chunks = await self.call(
            "create",
            "completions",
            model=self.model,
            prompt=COUNTING,
            max_tokens=10,
            temperature=0,
            stream=True,
        )
        self.assertEqual("".join(c.choices[0].text for c in chunks), reply.choices[0].text)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "length")

        full = reply.choices[0].text
        stop = full[len(full) // 2 : len(full) // 2 + 3]  # across token boundaries, mid-reply
        stopped = await self.chat(max_tokens=12, temperature=0, stop=[stop])
        streamed = await self.chat(max_tokens=12, temperature=0, stop=[stop], stream=True)
        self.assertEqual(joined(streamed), stopped.choices[0].message.content)
        self.assertNotIn(stop, joined(streamed))
        self.assertEqual(streamed[-1].choices[0].finish_reason, stopped.choices[0].finish_reason)

    def request(self, body: dict) -> tuple[str, dict, bytes]:
        data = json.dumps({"model": self.model, "temperature": 0, "stream": True, **body}).encode()
        headers = {"authorization": f"Bearer {self.key}", "content-type": "application/json"}
        return f"{self.base_url}/chat/completions", headers, data

    async def test_sse_framing(self):
        messages = [{"role": "user", "content": QUESTION}]
        url, headers, data = self.request(
            {"max_tokens": 4, "messages": messages, "logprobs": True, "top_logprobs": 2}
        )
        response = await treq.post(url, data=data, headers=headers, persistent=False)
        self.assertEqual(response.code, 200)
        content_type = response.headers.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"text/event-stream"))
        events = (await response.text()).split("\n\n")
        self.assertEqual(events[-1], "")  # every event ends with a blank line
        self.assertEqual(events[-2], "data: [DONE]")
        self.assertTrue(all(e.startswith("data: ") for e in events[:-1]))
        chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
        self.assertEqual(
            chunks[0]["choices"],
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        )
        self.assertEqual(chunks[-1]["choices"][0]["delta"], {})
        self.assertIn(chunks[-1]["choices"][0]["finish_reason"], ("stop", "length"))
        self.assertNotIn("usage", chunks[0])  # only with stream_options.include_usage
        deltas = [c["choices"][0] for c in chunks[1:-1]]
        entries = [e for d in deltas for e in d["logprobs"]["content"]]
        self.assertEqual(
            "".join(e["token"] for e in entries), "".join(d["delta"]["content"] for d in deltas)
        )
        self.assertEqual({len(e["top_logprobs"]) for e in entries}, {2})

    async def test_disconnect_mid_stream_ends_the_instance_and_frees_its_pages(self):
        messages = [{"role": "user", "content": f"Continue: {COUNTING}"}]
        url, headers, data = self.request({"max_tokens": 2000, "messages": messages})
        client = await connect(self.endpoint.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        client.send(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{head}"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await client.seen(b'{"content": ')  # a content delta: generating
        server = self.runtime.servers[self.endpoint.server_id]
        [instance] = server.in_flight
        self.assertLess(self.free_pages(), self.service.info.num_kv_pages)
        client.transport.abortConnection()
        reason, _ = await instance.when_ended()
        self.assertEqual(reason, "HTTP client disconnected")
        await until(
            lambda: self.free_pages() == self.service.info.num_kv_pages, "the pages to return"
        )
        self.assertEqual(server.in_flight, set())
