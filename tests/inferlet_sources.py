"""Real inferlet sources and the tests every executor must pass running them through the runtime.

tests/test_runtime_dev.py and tests/test_runtime_wasm.py mix InferletSourceTests into their
TestCases with their executor; this module holds no tests of its own.
"""

from __future__ import annotations

import json
import os
import textwrap

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, ResponseDone, readBody

from pie.interfaces import PieError
from pie.runtime.instances import NORMAL_FINISH
from tests.runtime_doubles import FakeModelService, RecordingOwner, make_runtime


def source(text: str) -> bytes:
    return textwrap.dedent(text).encode()


ECHO = source(
    """
    from pie.inferlet import receive, send

    async def main(args):
        for _ in range(int(args[0])):
            send("echo " + await receive())
    """
)

SUBSCRIBER = source(
    """
    from pie.inferlet import send, subscribe

    async def main(args):
        subscription = subscribe("pipeline")
        send("ready")
        got = []
        async for message in subscription:
            if message == "end":
                break
            got.append(message)
        subscription.close()
        return "+".join(got)
    """
)

PUBLISHER = source(
    """
    from pie.inferlet import broadcast

    async def main(args):
        for word in args:
            broadcast("pipeline", word)
        broadcast("pipeline", "end")
    """
)

COUNTER = source(
    """
    from pie.inferlet import store_get, store_set, store_list_keys

    async def main(args):
        count = int(await store_get("count") or "0") + 1
        await store_set("count", str(count))
        return f"{count} {await store_list_keys()}"
    """
)

FAILS = source(
    """
    async def main(args):
        raise ValueError("no " + args[0])
    """
)

USES_MODEL = source(
    """
    from pie.inferlet import get_auto_model, receive, send

    async def main(args):
        queue = get_auto_model().create_queue()
        queue.command("allocate_kv_pages", [1, 2, 3])
        send("allocated")
        await receive()
    """
)

SLEEPER = source(
    """
    from pie.inferlet import send, sleep

    async def main(args):
        send("sleeping")
        await sleep(2**32 - 1)
    """
)


class _Collect(Protocol):
    """A streamed body: each piece into `chunks` as it arrives, `done` at a complete end."""

    def __init__(self, chunks: DeferredQueue, done: Deferred) -> None:
        self.chunks, self.done = chunks, done

    def dataReceived(self, data: bytes) -> None:
        self.chunks.put(data)

    def connectionLost(self, reason) -> None:
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


HTTP_SERVER = source(
    """
    from pie.inferlet import receive, store_set
    from pie.inferlet.server import http_main

    async def handle(request):
        if request.path == "/boom":
            raise KeyError("boom")
        if request.path == "/stream":
            resp = await request.start_response(201, {"content-type": "text/event-stream"})
            await resp.write("data: é1\\n\\n")
            await resp.write(b"data: " + (await receive()).encode() + b"\\n\\n")
            await resp.finish()
            return None
        await store_set("seen", request.path)
        return {"status": 202, "body": {"path": request.path, "args": request.arguments}}

    main = http_main(handle)
    """
)

CHAT = source(
    """
    from pie.inferlet import TemplateError, get_auto_model

    async def main(args):
        model = get_auto_model()
        text = model.render_chat(
            [{"role": "user", "content": "héllo"}], True, tools=[{"name": "f"}], note="!"
        )
        try:
            model.render_chat([{"role": "system", "content": "x"}])
        except TemplateError as e:
            return text + "|" + str(e)
    """
)
CHAT_TEMPLATE = (
    "{% if messages[0].role != 'user' %}{{ raise_exception('user first, please') }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}{{ tools | tojson }}{{ note }}"
)


class InferletSourceTests:
    """The runtime running real sources; subclasses choose the executor."""

    def make_executor(self):
        raise NotImplementedError

    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        self.model = FakeModelService()
        self.runtime = self.start()
        self.owner = RecordingOwner()

    def start(self):
        return make_runtime(
            self, home=self.home, executor=self.make_executor(), services={"fake": self.model}
        )

    async def launch(self, program: bytes, *arguments: str, runtime=None) -> str:
        runtime = runtime or self.runtime
        digest = await runtime.add_program(program)
        return await runtime.launch(digest, list(arguments), self.owner)

    async def test_syntax_error_fails_the_upload_with_the_message(self):
        with self.assertRaises(PieError) as caught:
            await self.runtime.add_program(b"async def main(args:\n    pass\n")
        self.assertIn("SyntaxError", str(caught.exception))
        self.assertIn("line 1", str(caught.exception))

    async def test_signals_are_received_in_order(self):
        instance_id = await self.launch(ECHO, "3")
        for word in ("one", "two", "three"):
            self.runtime.signal(instance_id, word)
        self.assertEqual(await self.owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(self.owner.messages(instance_id), ["echo one", "echo two", "echo three"])

    async def test_subscription_streams_every_message(self):
        subscriber = await self.launch(SUBSCRIBER)
        await self.owner.heard(subscriber, "ready")
        publisher = await self.launch(PUBLISHER, "a", "b", "c", "d")
        reasons = await gatherResults([self.owner.ended(subscriber), self.owner.ended(publisher)])
        self.assertEqual(reasons, [NORMAL_FINISH, NORMAL_FINISH])
        self.assertEqual(self.owner.messages(subscriber), ["ready", "a+b+c+d"])

    async def test_kv_store_counts_across_a_restart(self):
        first = await self.launch(COUNTER)
        await self.owner.ended(first)
        await self.runtime.stopService()
        restarted = self.start()
        second = await self.launch(COUNTER, runtime=restarted)
        await self.owner.ended(second)
        self.assertEqual(self.owner.messages(first), ["1 ['count']"])
        self.assertEqual(self.owner.messages(second), ["2 ['count']"])

    async def test_chat_template_renders_on_the_host_and_refusals_are_handled(self):
        self.model.tokenizer.chat_template = CHAT_TEMPLATE
        instance_id = await self.launch(CHAT)
        self.assertEqual(await self.owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(
            self.owner.messages(instance_id),
            ['<s>[user] héllo[assistant][{"name": "f"}]!|user first, please'],
        )

    async def test_exception_is_a_runtime_error_with_the_traceback(self):
        instance_id = await self.launch(FAILS, "luck")
        reason = await self.owner.ended(instance_id)
        self.assertTrue(reason.startswith("Runtime error: "), reason)
        self.assertIn("ValueError: no luck", reason)
        self.assertEqual(self.owner.terminations(instance_id), [reason])

    async def test_malformed_host_calls_end_the_instance_with_what_was_wrong(self):
        """The same reason in both executors (the sandbox used to trap on `unreachable`),
        also when the program catches the error and goes on."""
        cases = {
            "'send', 123": "send: argument 'message': expected a string, got int",
            "'send'": "send takes 1 arguments (message), got 0",
            "'tokenize', -1, 'x'": "tokenize: argument 'service': -1 is out of range for u32",
            "'create_queue', 2**40": "create_queue: argument 'service': "
            "1099511627776 is out of range for u32",
            "'send', 'a\\ud800'": "send: argument 'message': string is not valid Unicode (surrogates not allowed)",
            "'allocate_kv_pages', 1, [1, 'x']": "allocate_kv_pages: argument 'ids': "
            "item 1: expected an integer (u32), got str",
            "'List'": "unknown host call 'List'",
        }
        for call, detail in cases.items():
            program = source(
                f"""
                from pie.inferlet import _abi, send

                async def main(args):
                    try:
                        _abi.call({call})
                    except BaseException:
                        pass
                    send("went on")
                """
            )
            instance_id = await self.launch(program)
            reason = await self.owner.ended(instance_id)
            self.assertEqual(reason, f"Runtime error: invalid host call: {detail}", call)
            self.assertEqual(self.owner.messages(instance_id), [], call)

    async def test_terminate_frees_the_model_resources(self):
        instance_id = await self.launch(USES_MODEL)
        await self.owner.heard(instance_id, "allocated")
        self.assertEqual(self.model.pages, {instance_id: {1, 2, 3}})
        self.runtime.terminate(instance_id, "socket terminated")
        self.assertEqual(await self.owner.ended(instance_id), "socket terminated")
        self.assertEqual(self.model.destroyed, [instance_id])
        self.assertEqual(self.model.pages, {})
        self.assertEqual(self.runtime.instances.running, {})

    async def test_terminate_cancels_pending_sleeps(self):
        """A killed sleeper leaves no delayed call behind (a u32 sleep would last 49 days)."""

        def naps():
            return [c for c in reactor.getDelayedCalls() if c.getTime() > reactor.seconds() + 1e6]

        instance_id = await self.launch(SLEEPER)
        await self.owner.heard(instance_id, "sleeping")
        self.assertEqual(len(naps()), 1)
        self.runtime.terminate(instance_id, "user terminated the program")
        await self.owner.ended(instance_id)
        self.assertEqual(naps(), [])

    async def test_http_server_program(self):
        digest = await self.runtime.add_program(HTTP_SERVER)
        server_id = await self.runtime.launch_server(digest, 0, ["--flag"], self.owner)
        port = self.runtime.servers[server_id].port
        agent = Agent(reactor)

        response = await agent.request(b"GET", f"http://127.0.0.1:{port}/hello".encode())
        body = await readBody(response)
        self.assertEqual(response.code, 202)
        self.assertEqual(json.loads(body), {"path": "/hello", "args": ["--flag"]})
        self.assertEqual(await self.runtime.kvstore.get("seen"), "/hello")

        response = await agent.request(b"GET", f"http://127.0.0.1:{port}/boom".encode())
        body = (await readBody(response)).decode()
        self.assertEqual(response.code, 500)
        self.assertIn("KeyError: 'boom'", body)

    async def test_http_server_program_streams(self):
        """Chunks cross the executor's boundary as they are written (str and bytes)."""
        digest = await self.runtime.add_program(HTTP_SERVER)
        server_id = await self.runtime.launch_server(digest, 0, [], self.owner)
        port = self.runtime.servers[server_id].port
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/stream".encode())
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        chunks: DeferredQueue = DeferredQueue()
        done: Deferred = Deferred()
        response.deliverBody(_Collect(chunks, done))
        self.assertEqual(await chunks.get(), "data: é1\n\n".encode())
        [instance] = self.runtime.servers[server_id].in_flight  # parked in receive()
        self.runtime.signal(instance.id, "second")
        self.assertEqual(await chunks.get(), b"data: second\n\n")
        await done
