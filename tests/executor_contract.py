"""What every inferlet executor must do, written once and run against each executor.

test_executor_dev.py and test_executor_wasm.py mix ExecutorContract into their
TestCases; this module holds no tests of its own.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import defaultdict

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface.verify import verifyObject

from pie.interfaces import IExecution, IInferletExecutor, InstanceFault, PieError
from pie.runtime.hostcalls import HOST_CALLS


class HostDouble:
    """Answers host calls as the runtime would; async results wait until the test releases them."""

    def __init__(self, arguments: list[str] | None = None) -> None:
        self.arguments = arguments or []
        self.sent: list[str] = []
        self.commands: list[tuple[str, tuple]] = []
        self.pending: dict[str, list[Deferred]] = defaultdict(list)
        self.errors: dict[str, Exception] = {}
        self.on_send = None

    def call(self, name: str, args: tuple):
        mode = HOST_CALLS[name].mode
        if name in self.errors:
            raise self.errors[name]
        if name == "send":
            self.sent.append(args[0])
            if self.on_send is not None:
                self.on_send(args[0])
            return False  # the WIT result: not backed up
        if mode == "command":
            self.commands.append((name, tuple(args)))
            return None
        if mode == "async":
            deferred: Deferred = Deferred()
            self.pending[name].append(deferred)
            return deferred
        return {
            "get_version": lambda: "0.0-test",
            "get_arguments": lambda: list(self.arguments),
            "tokenize": lambda: [ord(c) for c in args[1]],
            "get_model": lambda: 3 if args[0] == "m" else None,
        }[name]()

    def release(self, name: str, value) -> int:
        """Fire every pending `name` call with `value`; how many there were."""
        waiting, self.pending[name] = self.pending[name], []
        for deferred in waiting:
            deferred.callback(value)
        return len(waiting)


WELL_BEHAVED = b"""
import argparse, json
from pie.inferlet import _abi

async def main(args):
    parser = argparse.ArgumentParser()
    parser.add_argument("--who", required=True)
    opts = parser.parse_args(args)
    _abi.call("send", "hello " + opts.who)
    tokens = _abi.call("tokenize", 0, opts.who)
    _abi.call("allocate_kv_pages", 5, [1, 2])
    dists = await _abi.call_async(
        "forward_text", 5, 1, [1], tokens, list(range(len(tokens))), [[1]] * len(tokens), [0])
    stored = await _abi.call_async("store_get", "k")
    return json.dumps({"tokens": tokens, "dists": dists, "stored": stored, "who": opts.who})
"""
DIST = [([7, 8], [0.5, 0.25])]


def zipped(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, source in files.items():
            archive.writestr(path, source)
    return buffer.getvalue()


class ExecutorHelpers:
    """Launching programs against a HostDouble; mixed into a TestCase that sets self.executor."""

    executor = None

    def launch(self, source: bytes, arguments: list[str] | None = None, host=None):
        host = host or HostDouble(arguments)
        execution = self.executor.run(source, list(arguments or []), host)
        outcome: list = []
        execution.finished.addBoth(outcome.append)
        return execution, host, outcome

    def assertFinishedWith(self, outcome: list, value) -> None:
        self.assertEqual(len(outcome), 1, f"not finished: {outcome}")
        if not isinstance(outcome[0], str | type(None)):
            self.fail(f"instance failed: {outcome[0].value}")
        self.assertEqual(outcome[0], value)

    def assertFailedWith(self, outcome: list, text: str, kind=InstanceFault) -> str:
        self.assertEqual(len(outcome), 1, f"not finished: {outcome}")
        failure = outcome[0]
        self.assertFalse(isinstance(failure, str | type(None)), f"finished with {failure!r}")
        self.assertIsInstance(failure.value, kind)
        self.assertIn(text, str(failure.value))
        return str(failure.value)

    def finish_well_behaved(self, host: HostDouble, outcome: list, who: str) -> None:
        self.assertEqual(host.release("forward_text", DIST), 1)
        self.assertEqual(host.release("store_get", "S"), 1)
        expected = {
            "tokens": [ord(c) for c in who],
            "dists": [[[7, 8], [0.5, 0.25]]],
            "stored": "S",
            "who": who,
        }
        self.assertFinishedWith(outcome, json.dumps(expected))


class ExecutorContract(ExecutorHelpers):
    """The tests every executor passes."""

    def test_interfaces(self) -> None:
        verifyObject(IInferletExecutor, self.executor)
        execution, _, _ = self.launch(b"async def main(args):\n    return None\n")
        verifyObject(IExecution, execution)

    def test_well_behaved_instance_uses_sync_async_and_command_calls(self) -> None:
        _, host, outcome = self.launch(WELL_BEHAVED, ["--who", "ada"])
        self.assertEqual(host.sent, ["hello ada"])
        self.assertEqual(host.commands, [("allocate_kv_pages", (5, [1, 2]))])
        self.assertEqual(outcome, [])  # parked on forward_text
        self.assertEqual(len(host.pending["forward_text"]), 1)
        self.finish_well_behaved(host, outcome, "ada")

    def test_sdk_imports_and_runs(self) -> None:
        source = b"""
from pie.inferlet import get_arguments, get_version, send, store_get

async def main(args):
    send(get_version() + " " + " ".join(get_arguments()))
    return await store_get("key")
"""
        _, host, outcome = self.launch(source, ["a", "b"])
        self.assertEqual(host.sent, ["0.0-test a b"])
        host.release("store_get", None)
        self.assertFinishedWith(outcome, None)

    def test_stdlib_allow_list_imports(self) -> None:
        source = b"""
import argparse, bisect, collections, copy, dataclasses, enum, functools, heapq, itertools
import json, math, operator, random, re, string, textwrap, typing

async def main(args):
    counts = collections.Counter("abca")
    return json.dumps([counts["a"], heapq.nsmallest(1, [3, 1]), bisect.bisect([1, 2], 1),
                       math.isqrt(17), re.sub("a", "b", "aa"), string.digits[:2],
                       functools.reduce(operator.add, [1, 2]), len(list(itertools.permutations("ab"))),
                       textwrap.shorten("aa bb cc dd", 9), copy.copy([1]), random.Random(1).random() < 1])
"""
        _, _, outcome = self.launch(source)
        self.assertFinishedWith(
            outcome, json.dumps([2, [1], 1, 4, "bb", "01", 3, 2, "aa [...]", [1], True])
        )

    def test_instances_draw_different_random_numbers(self) -> None:
        source = b"import random\nasync def main(args):\n    return str(random.getrandbits(64))\n"
        draws = {self.launch(source)[2][0] for _ in range(3)}
        self.assertEqual(len(draws), 3)

    def test_program_archive_with_modules(self) -> None:
        data = zipped({
            "main.py": "from helpers.text import shout\nasync def main(args):\n"
                       "    return shout(args[0])\n",
            "helpers/__init__.py": "",
            "helpers/text.py": "def shout(s):\n    return s.upper() + '!'\n",
        })  # fmt: skip
        _, _, outcome = self.launch(data, ["hey"])
        self.assertFinishedWith(outcome, "HEY!")

    def test_http_server_program_defines_handle(self) -> None:
        source = b"""
async def handle(request):
    return {"status": 201, "body": request.method + " " + request.path}
"""
        request = json.dumps({"method": "POST", "path": "/x", "arguments": []})
        _, _, outcome = self.launch(source, ["--pie-http-request", request])
        self.assertEqual(len(outcome), 1)
        self.assertEqual(json.loads(outcome[0])["status"], 201)
        self.assertEqual(json.loads(outcome[0])["body"], "POST /x")

    def test_exception_ends_the_instance_with_message_and_traceback(self) -> None:
        source = (
            b"async def main(args):\n    x = 1\n    raise ValueError('bad input: ' + args[0])\n"
        )
        _, _, outcome = self.launch(source, ["zz"])
        text = self.assertFailedWith(outcome, "ValueError: bad input: zz")
        self.assertIn("main.py", text)
        self.assertIn("line 3", text)

    def test_bad_arguments_fail_with_argparse_message(self) -> None:
        _, host, outcome = self.launch(WELL_BEHAVED, ["--whom", "x"])
        text = self.assertFailedWith(outcome, "exited with status 2")
        self.assertIn("the following arguments are required: --who", text)
        self.assertEqual(host.sent, [])

    async def test_syntax_error_fails_check_with_the_message(self) -> None:
        with self.assertRaises(PieError) as raised:
            await maybeDeferred(self.executor.check, b"async def main(args)\n    pass\n")
        self.assertIn("SyntaxError", str(raised.exception))
        self.assertIn("line 1", str(raised.exception))
        checked = await maybeDeferred(self.executor.check, WELL_BEHAVED)
        _, host, outcome = self.launch(checked, ["--who", "c"])  # run() takes what check made
        self.finish_well_behaved(host, outcome, "c")

    async def test_a_program_without_main_fails_check(self) -> None:
        with self.assertRaises(PieError) as raised:
            await maybeDeferred(self.executor.check, b"def helper():\n    pass\n")
        self.assertIn("main.py must define `async def main(args)`", str(raised.exception))

    def test_kill_while_parked(self) -> None:
        execution, host, outcome = self.launch(WELL_BEHAVED, ["--who", "x"])
        execution.kill("terminated by the owner")
        self.assertFailedWith(outcome, "terminated by the owner")
        host.release("forward_text", DIST)  # a late result is ignored
        self.assertEqual(host.pending["store_get"], [])
        self.assertEqual(len(outcome), 1)
        execution.kill("again")  # a second kill is a no-op
        self.assertEqual(len(outcome), 1)

    def test_kill_from_inside_a_host_call(self) -> None:
        source = b"""
from pie.inferlet import _abi
async def main(args):
    await _abi.call_async("receive")
    _abi.call("send", "first")
    _abi.call("send", "after the kill")
    return "finished anyway"
"""
        execution, host, outcome = self.launch(source)
        host.on_send = lambda message: execution.kill("killed mid-call")
        host.release("receive", "go")
        self.assertFailedWith(outcome, "killed mid-call")
        self.assertEqual(host.sent, ["first"])

    def test_parked_instances_are_all_waiting_at_once_then_all_resumed(self) -> None:
        runs = [self.launch(WELL_BEHAVED, ["--who", f"w{i}"]) for i in range(12)]
        # Every instance is parked on its forward at the same time: one batch.
        waiting = [len(host.pending["forward_text"]) for _, host, _ in runs]
        self.assertEqual(waiting, [1] * 12)
        for i, (_, host, outcome) in enumerate(reversed(runs)):
            self.finish_well_behaved(host, outcome, f"w{11 - i}")

    def test_tasks_inside_one_instance_park_together(self) -> None:
        source = b"""
from pie.inferlet import _abi
async def one(i):
    return (await _abi.call_async("store_get", str(i))) + str(i)
async def main(args):
    return ",".join(await _abi.gather(*[one(i) for i in range(3)]))
"""
        _, host, outcome = self.launch(source)
        self.assertEqual(len(host.pending["store_get"]), 3)
        host.release("store_get", "v")
        self.assertFinishedWith(outcome, "v0,v1,v2")

    def test_result_arriving_during_a_step_waits_for_the_step(self) -> None:
        source = b"""
from pie.inferlet import _abi
async def listen():
    return await _abi.call_async("subscription_next", 1)
async def main(args):
    listener = _abi.spawn(listen())
    await _abi.call_async("receive")
    _abi.call("broadcast", "topic", "hello")  # delivers to our own subscription at once
    return "heard " + await listener
"""
        host = HostDouble()
        call = host.call

        def broadcast_delivers_now(name, args):
            if name == "broadcast":
                host.release("subscription_next", args[1])
                return None
            return call(name, args)

        host.call = broadcast_delivers_now
        _, _, outcome = self.launch(source, host=host)
        host.release("receive", "go")
        self.assertFinishedWith(outcome, "heard hello")

    def test_host_call_of_one_instance_resumes_another_inside_it(self) -> None:
        listener_source = b"""
from pie.inferlet import _abi
async def main(args):
    return "B heard " + await _abi.call_async("subscription_next", 1)
"""
        _, listener_host, listener_outcome = self.launch(listener_source)
        speaker_host = HostDouble()
        call = speaker_host.call

        def broadcast_resumes_listener(name, args):
            if name == "broadcast":  # B runs to its end inside A's host call
                listener_host.release("subscription_next", args[1])
                return None
            return call(name, args)

        speaker_host.call = broadcast_resumes_listener
        speaker_source = b"""
from pie.inferlet import _abi
async def main(args):
    _abi.call("broadcast", "topic", "hello")
    _abi.call("send", "A goes on")
    return "A done"
"""
        _, _, outcome = self.launch(speaker_source, host=speaker_host)
        self.assertFinishedWith(listener_outcome, "B heard hello")
        self.assertFinishedWith(outcome, "A done")
        self.assertEqual(speaker_host.sent, ["A goes on"])

    def test_sync_host_call_error_ends_the_instance(self) -> None:
        host = HostDouble()
        host.errors["get_model"] = PieError("no model named 'x'")
        source = b"""
from pie.inferlet import _abi
async def main(args):
    try:
        _abi.call("get_model", "x")
    except Exception:
        pass
    return "should not finish"
"""
        _, _, outcome = self.launch(source, host=host)
        self.assertFailedWith(outcome, "no model named 'x'", PieError)

    def test_async_host_call_failure_ends_the_instance(self) -> None:
        _, host, outcome = self.launch(WELL_BEHAVED, ["--who", "q"])
        host.pending.pop("forward_text")[0].errback(InstanceFault("forward failed: page 9"))
        self.assertFailedWith(outcome, "forward failed: page 9")
