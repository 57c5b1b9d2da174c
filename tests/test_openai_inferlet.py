"""The bundled OpenAI inferlet and the SDK's Completion on the fake model (no daemon).

Each request runs the real inferlet (pie/bundled/openai.py) through the guest
driver as the runtime would start it for one HTTP request; the answers are
checked against the fake model's own greedy continuation.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from twisted.trial import unittest

import pie.bundled
from pie.inferlet import get_auto_model
from pie.inferlet.completion import Completion
from pie.inferlet.server import HTTP_REQUEST_ARGUMENT
from pie.inferlet.testing import FakeModel, FakeWorld, greedy_reference


def _inferlet():
    path = Path(pie.bundled.__file__).parent / "openai.py"
    spec = importlib.util.spec_from_file_location("pie_bundled_openai", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OPENAI = _inferlet()


def request(path, body=None, method=None):
    """(status, parsed body) of one request to the inferlet, and the world it ran in."""
    world = FakeWorld(FakeModel(dist_size=8))
    text = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
    data = {"method": method or ("POST" if body is not None else "GET"), "path": path}
    response = json.loads(
        world.run(OPENAI.main, [HTTP_REQUEST_ARGUMENT, json.dumps({**data, "body": text})])
    )
    return response["status"], json.loads(response["body"]), world


def chat(**fields):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **fields}
    return request("/v1/chat/completions", body)


class ChatTests(unittest.TestCase):
    def reference(self, steps):
        model = FakeModel(dist_size=8)
        prompt = model.tokenize(_render(model, [{"role": "user", "content": "hi"}]))
        return model, greedy_reference(model, prompt, steps), len(prompt)

    def test_greedy_chat_is_the_models_greedy_continuation(self):
        status, answer, world = chat(max_tokens=9, temperature=0, some_future_field=[1])
        model, want, prompt_tokens = self.reference(9)
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["choices"][0]["message"]["content"], model.detokenize(want))
        self.assertEqual(answer["choices"][0]["finish_reason"], "length")
        self.assertEqual(
            answer["usage"],
            {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 9,
                "total_tokens": prompt_tokens + 9,
            },
        )
        self.assertEqual(world.live_pages, 0)
        calls = [name for name, _ in world.instances[0].calls]
        self.assertEqual(
            (calls.count("generate"), calls.count("forward_text")), (1, 0)
        )  # fast path

    def test_a_stop_text_across_tokens_ends_the_reply_before_it(self):
        model, want, _ = self.reference(12)
        text = model.detokenize(want)
        stop = text[4:7]  # three byte tokens: the match spans token boundaries
        status, answer, _ = chat(max_tokens=12, temperature=0, stop=["zzzz", stop])
        first = text.find(stop)
        self.assertEqual(answer["choices"][0]["message"]["content"], text[:first])
        self.assertEqual(answer["choices"][0]["finish_reason"], "stop")
        self.assertEqual(answer["usage"]["completion_tokens"], first + len(stop))

    def test_n_choices_and_seeds(self):
        _, first, _ = chat(max_tokens=8, n=2, seed=7, temperature=1.0)
        _, again, _ = chat(max_tokens=8, n=2, seed=7, temperature=1.0)
        texts = [c["message"]["content"] for c in first["choices"]]
        self.assertEqual([c["index"] for c in first["choices"]], [0, 1])
        self.assertEqual(texts, [c["message"]["content"] for c in again["choices"]])
        self.assertEqual(first["usage"]["completion_tokens"], 16)

    def test_logprobs_come_from_the_distributions(self):
        _, answer, _ = chat(max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
        entries = answer["choices"][0]["logprobs"]["content"]
        self.assertEqual(len(entries), 4)
        for entry in entries:
            self.assertEqual(len(entry["top_logprobs"]), 3)
            self.assertEqual(entry["top_logprobs"][0]["token"], entry["token"])  # greedy
            self.assertAlmostEqual(entry["top_logprobs"][0]["logprob"], entry["logprob"])
            self.assertLessEqual(entry["logprob"], 0.0)
        self.assertEqual(
            "".join(e["token"] for e in entries), answer["choices"][0]["message"]["content"]
        )

    def test_bad_fields_are_400s_naming_the_field(self):
        for fields, param in (
            ({"temperature": 3}, "temperature"),
            ({"top_p": "x"}, "top_p"),
            ({"n": 0}, "n"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_completion_tokens": True}, "max_completion_tokens"),
            ({"stop": [1]}, "stop"),
            ({"seed": 1.5}, "seed"),
            ({"logprobs": "yes"}, "logprobs"),
            ({"logprobs": True, "top_logprobs": 9}, "top_logprobs"),  # over dist_size
            ({"stream": "yes"}, "stream"),
            ({"stream_options": {"include_usage": True}}, "stream_options"),
            ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
            ({"response_format": {"type": "xml"}}, "response_format"),
            ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
            ({"response_format": {"type": "json_object"}, "logprobs": True}, "logprobs"),
            ({"messages": []}, "messages"),
            ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
            (
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                "messages[0].content",
            ),
            ({"user": 5}, "user"),
        ):
            status, answer, _ = chat(**fields)
            self.assertEqual(status, 400, fields)
            self.assertEqual(answer["error"]["type"], "invalid_request_error")
            self.assertEqual(answer["error"]["param"], param, answer)
        status, answer, _ = chat(model="gpt-4o")
        self.assertEqual((status, answer["error"]["code"]), (404, "model_not_found"))
        status, answer, _ = request("/v1/chat/completions", "{not json")
        self.assertEqual(status, 400)
        self.assertIn("not valid JSON", answer["error"]["message"])

    def test_text_parts_are_joined(self):
        parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
        _, joined, _ = chat(
            max_tokens=5, temperature=0, messages=[{"role": "user", "content": parts}]
        )
        _, plain, _ = chat(max_tokens=5, temperature=0)
        self.assertEqual(joined["choices"], plain["choices"])


class CompletionsAndModelsTests(unittest.TestCase):
    def test_completions_for_several_prompts(self):
        body = {"model": "fake-model", "prompt": ["ab", "cd"], "max_tokens": 5, "temperature": 0}
        status, answer, _ = request("/v1/completions", body)
        model = FakeModel(dist_size=8)
        self.assertEqual(status, 200, answer)
        self.assertEqual(
            [c["text"] for c in answer["choices"]],
            [model.detokenize(greedy_reference(model, model.tokenize(p), 5)) for p in ("ab", "cd")],
        )
        self.assertEqual(answer["usage"]["prompt_tokens"], 4)
        body = {"model": "fake-model", "prompt": "ab", "logprobs": 2, "max_tokens": 3}
        _, answer, _ = request("/v1/completions", body)
        logprobs = answer["choices"][0]["logprobs"]
        self.assertEqual(len(logprobs["tokens"]), 3)
        self.assertEqual(logprobs["text_offset"], [0, 1, 2])
        self.assertTrue(all(len(top) <= 2 for top in logprobs["top_logprobs"]))
        status, answer, _ = request("/v1/completions", {"model": "fake-model", "prompt": 3})
        self.assertEqual((status, answer["error"]["param"]), (400, "prompt"))

    def test_models(self):
        status, answer, _ = request("/v1/models")
        self.assertEqual((status, [m["id"] for m in answer["data"]]), (200, ["fake-model"]))
        self.assertEqual(request("/v1/models/fake-model")[1]["id"], "fake-model")
        self.assertEqual(request("/v1/models/other")[0], 404)
        self.assertEqual(request("/v1/models", {}, "POST")[0], 405)
        self.assertEqual(request("/v2/nothing")[0], 404)


def streamed(path, body):
    """(status, headers, chunks) of a streamed reply: the JSON of each event before [DONE]."""
    world = FakeWorld(FakeModel(dist_size=8))
    data = {"method": "POST", "path": path, "body": json.dumps({**body, "stream": True})}
    world.run(OPENAI.main, [HTTP_REQUEST_ARGUMENT, json.dumps(data)])
    reply = world.instances[0].streamed
    events = b"".join(reply["chunks"]).decode().split("\n\n")
    assert reply["finished"] and events[-2:] == ["data: [DONE]", ""], events
    assert world.live_pages == 0
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    return reply["status"], dict(reply["headers"]), chunks, world


class StreamTests(unittest.TestCase):
    def test_streamed_chat_is_the_greedy_continuation_in_pieces(self):
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        fields = {"max_tokens": 20, "temperature": 0, "stream_options": {"include_usage": True}}
        status, headers, chunks, world = streamed("/v1/chat/completions", {**body, **fields})
        _, reply, _ = chat(max_tokens=20, temperature=0)
        self.assertEqual((status, headers["content-type"][:17]), (200, "text/event-stream"))
        self.assertEqual(
            chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": "", "refusal": None}
        )
        *deltas, last, usage = chunks
        pieces = [c["choices"][0]["delta"]["content"] for c in deltas[1:]]
        self.assertEqual(len(pieces), 3)  # 2 tokens first, then chunks of 16 (2 + 16 + 2)
        self.assertEqual("".join(pieces), reply["choices"][0]["message"]["content"])
        self.assertEqual(last["choices"][0]["delta"], {})
        self.assertEqual(last["choices"][0]["finish_reason"], "length")
        self.assertEqual((usage["choices"], usage["usage"]), ([], reply["usage"]))
        self.assertEqual({c["usage"] for c in chunks[:-1]}, {None})
        self.assertEqual({c["object"] for c in chunks}, {"chat.completion.chunk"})
        calls = [name for name, _ in world.instances[0].calls]
        self.assertEqual(calls.count("generate"), 3)  # the fast path, in chunks

    def test_streamed_choices_and_completions(self):
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        _, _, chunks, _ = streamed("/v1/chat/completions", {**body, "n": 2, "max_tokens": 5})
        by_index = {0: [], 1: []}
        for chunk in chunks:
            [choice] = chunk["choices"]
            by_index[choice["index"]].append(choice)
        for choices in by_index.values():
            self.assertEqual(choices[0]["delta"]["role"], "assistant")
            self.assertEqual(choices[-1]["finish_reason"], "length")
        self.assertNotIn("usage", chunks[0])

        body = {"model": "fake-model", "prompt": "ab", "max_tokens": 5, "temperature": 0}
        _, answer, _ = request("/v1/completions", body)
        _, _, chunks, _ = streamed("/v1/completions", body)
        self.assertEqual({c["object"] for c in chunks}, {"text_completion"})
        self.assertEqual(
            "".join(c["choices"][0]["text"] for c in chunks), answer["choices"][0]["text"]
        )
        self.assertEqual(
            chunks[-1]["choices"][0],
            {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"},
        )


class CompletionDeltaTests(unittest.TestCase):
    def test_a_split_character_is_held_back_and_deltas_rebuild_the_text(self):
        script = [ord(c) + 3 for c in "a"] + [b + 3 for b in "é".encode()] + [ord("|") + 3, 2]

        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("x")
            picks = iter(script)
            completion = Completion(ctx, lambda ids, probs: next(picks), 10, ["|"], chunk=1)
            deltas = [d.text async for d in completion.deltas()]
            return json.dumps([deltas, completion.finish_reason, completion.completion_tokens])

        deltas, finish, count = json.loads(FakeWorld().run(main))
        self.assertEqual(deltas, ["a", "é"])  # never "\ufffd"
        self.assertEqual((finish, count), ("stop", 4))

    def test_nothing_that_may_start_a_stop_text_is_handed_out(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("x")
            picks = iter([ord(c) + 3 for c in "abZZq"])
            completion = Completion(ctx, lambda ids, probs: next(picks), 10, ["abZZ"], chunk=1)
            deltas = [d.text async for d in completion.deltas()]
            return json.dumps([deltas, completion.finish_reason, completion.completion_tokens])

        self.assertEqual(json.loads(FakeWorld().run(main)), [[], "stop", 4])

    def test_log_of_zero_is_openais_floor(self):
        from pie.inferlet.completion import UNDERFLOW_LOGPROB, _log

        self.assertEqual(_log(0.0), UNDERFLOW_LOGPROB)
        self.assertEqual(_log(1.0), 0.0)
        self.assertTrue(math.isfinite(_log(1e-300)))


def _render(model, messages):
    from pie.runtime import chat_template

    return chat_template.render(
        model.chat_template, messages, add_generation_prompt=True, eos_token=model.eos_token
    )
