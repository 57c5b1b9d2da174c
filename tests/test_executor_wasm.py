"""The sandbox: the executor contract, plus isolation of hostile programs.

Every hostile program runs next to a well-behaved instance that is parked at
the time; the hostile one must end with a clear reason and the neighbour must
then finish intact. The runtime component is built once into the Pie cache
($PIE_HOME, default ~/.cache/pie) and shared by every test and every run.
"""

from __future__ import annotations

import json
import struct

from twisted.trial.unittest import TestCase

from pie.runtime.executors import wasm
from tests.executor_contract import WELL_BEHAVED, ExecutorContract, ExecutorHelpers, HostDouble
from tests.wasm_artifact import BUILD_TIMEOUT, SHORT_DEADLINE_MS, sandbox


class WasmContractTests(ExecutorContract, TestCase):
    timeout = BUILD_TIMEOUT

    def setUp(self) -> None:
        self.executor = sandbox()


class WasmIsolationTests(ExecutorHelpers, TestCase):
    timeout = BUILD_TIMEOUT

    def setUp(self) -> None:
        self.executor = sandbox()

    def assertEndsAlone(self, hostile: str, reason: str) -> str:
        """Run `hostile` next to a parked well-behaved instance; the reason text."""
        _, neighbour, neighbour_outcome = self.launch(WELL_BEHAVED, ["--who", "bystander"])
        _, _, outcome = self.launch(hostile.encode())
        text = self.assertFailedWith(outcome, reason)
        self.finish_well_behaved(neighbour, neighbour_outcome, "bystander")
        return text

    def test_reading_files_fails(self) -> None:
        self.assertEndsAlone(
            "async def main(args):\n    return open('/etc/passwd').read()\n",
            "No such file or directory: '/etc/passwd'",
        )

    def test_listing_the_filesystem_fails(self) -> None:
        self.assertEndsAlone(
            "import os\nasync def main(args):\n    return str(os.listdir('/'))\n",
            "No such file or directory",
        )

    def test_sockets_are_unavailable(self) -> None:
        self.assertEndsAlone(
            "async def main(args):\n    import socket\n"
            "    socket.create_connection(('127.0.0.1', 22))\n",
            "No module named 'socket'",
        )

    def test_infinite_loop_hits_the_cpu_deadline(self) -> None:
        self.executor = sandbox(deadline_ms=SHORT_DEADLINE_MS)
        self.assertEndsAlone(
            "async def main(args):\n    while True:\n        pass\n", "CPU deadline exceeded"
        )

    def test_loop_after_a_host_call_hits_the_deadline_too(self) -> None:
        self.executor = sandbox(deadline_ms=SHORT_DEADLINE_MS)
        _, host, outcome = self.launch(
            b"from pie.inferlet import _abi\nasync def main(args):\n"
            b"    await _abi.call_async('receive')\n    while True:\n        pass\n"
        )
        host.release("receive", "go")
        self.assertFailedWith(outcome, "CPU deadline exceeded")

    def test_busy_guest_making_host_calls_is_not_cut_off(self) -> None:
        # The deadline is CPU time between host calls, not the length of a step:
        # this step does about 4 deadlines of work, in slices between host calls.
        self.executor = sandbox(deadline_ms=SHORT_DEADLINE_MS)
        source = (
            "import time\nfrom pie.inferlet import _abi\nasync def main(args):\n"
            "    start = slices = 0\n    start = time.monotonic()\n"
            "    while time.monotonic() - start < 0.4:\n"
            "        mark = time.monotonic()\n"
            "        while time.monotonic() - mark < 0.02:\n            pass\n"
            "        _abi.call('get_version')\n        slices += 1\n"
            "    return 'ok' if slices > 4 else 'too few slices'\n"
        )
        _, _, outcome = self.launch(source.encode())
        self.assertFinishedWith(outcome, "ok")

    def test_memory_bomb_hits_the_store_limit(self) -> None:
        self.assertEndsAlone(
            "async def main(args):\n    hog = []\n    while True:\n"
            "        hog.append(bytearray(8 << 20))\n",
            "memory limit exceeded (64 MiB)",
        )

    def test_one_huge_allocation_hits_the_store_limit(self) -> None:
        self.assertEndsAlone(
            "async def main(args):\n    return str(len(bytearray(1 << 30)))\n",
            "memory limit exceeded",
        )

    def test_exception(self) -> None:
        self.assertEndsAlone("async def main(args):\n    return 1 / 0\n", "ZeroDivisionError")

    def test_deep_recursion(self) -> None:
        self.assertEndsAlone(
            "async def main(args):\n    def down(n):\n        return down(n + 1)\n    down(0)\n",
            "RecursionError",
        )

    def test_deep_recursion_past_the_interpreter_limit_traps(self) -> None:
        self.assertEndsAlone(
            "import sys\nasync def main(args):\n    sys.setrecursionlimit(10 ** 8)\n"
            "    def down(n):\n        return down(n + 1)\n    down(0)\n",
            "trap: call stack exhausted",
        )

    def test_print_goes_to_the_server_log_not_the_host(self) -> None:
        logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        _, host, outcome = self.launch(b"async def main(args):\n    print('to the log')\n")
        self.assertFinishedWith(outcome, None)
        self.assertEqual(host.sent, [])
        self.assertIn("to the log", [e.get("text") for e in logged])

    def test_output_flood_is_cut_off(self) -> None:
        logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        source = b"async def main(args):\n    for i in range(3000):\n        print(str(i) * 5000)\n"
        _, _, outcome = self.launch(source)
        self.assertFinishedWith(outcome, None)
        lines = [e for e in logged if e.get("stream") == "stdout"]
        # each write is cut to OUTPUT_LINE_LIMIT characters, and inferlet_output_bytes of
        # them are logged: 131 whole writes of 2000 characters fit in 256 KiB
        self.assertEqual(len(lines), wasm.DEFAULT_OUTPUT_BYTES // wasm.OUTPUT_LINE_LIMIT)
        self.assertEqual(
            len([e for e in logged if "more output dropped" in e.get("log_format", "")]), 1
        )

    def test_host_value_of_the_wrong_shape_is_named_in_the_reason(self) -> None:
        host = HostDouble()
        host.call = lambda name, args: (1, 2)  # a tuple where WIT says list<u32>
        _, _, outcome = self.launch(
            b"from pie.inferlet import _abi\nasync def main(args):\n"
            b"    return str(_abi.call('tokenize', 0, 'x'))\n",
            host=host,
        )
        self.assertFailedWith(
            outcome, "host call tokenize returned (1, 2) does not fit its WIT type"
        )

    def test_async_result_of_the_wrong_shape_is_named_in_the_reason(self) -> None:
        _, host, outcome = self.launch(WELL_BEHAVED, ["--who", "x"])
        host.release("forward_text", [[[1], [0.5]]])  # lists where WIT says tuple
        self.assertFailedWith(outcome, "resume-forward-text got")

    def test_lists_of_numbers_bytes_and_bools_cross_intact(self) -> None:
        vocabs = ([0, 1, 70000], b"ab" + bytes(range(256)), [2, 2, 258])
        dist = [(list(range(64)), [1 / 64] * 64), ([4000000000], [0.1])]
        host = HostDouble()
        answers = {"get_vocabs": vocabs, "tokenize": list(range(5000))}
        call = host.call
        host.call = lambda name, args: answers[name] if name in answers else call(name, args)
        source = b"""
import json
from pie.inferlet import _abi
async def main(args):
    _abi.call("mask_kv_page", 1, 2, [True, False, True])
    _abi.call("copy_kv_page", 1, 2, 3, 0, 4294967295, 5)
    ids, data, ends = _abi.call("get_vocabs", 0)
    tokens = _abi.call("tokenize", 0, "x")
    dists = await _abi.call_async("forward_text", 1, 1, [1], [5], [0], [[1]], [0])
    return json.dumps([ids, list(data), ends, tokens == list(range(5000)), dists])
"""
        _, _, outcome = self.launch(source, host=host)
        self.assertEqual(
            host.commands,
            [("mask_kv_page", (1, 2, [True, False, True])),
             ("copy_kv_page", (1, 2, 3, 0, 4294967295, 5))],
        )  # fmt: skip
        host.release("forward_text", dist)
        ids, data, ends, tokens_ok, dists = json.loads(outcome[0])
        self.assertEqual((ids, bytes(data), ends, tokens_ok), (*vocabs, True))
        self.assertEqual(dists[1], [[4000000000], [struct.unpack("f", struct.pack("f", 0.1))[0]]])
        self.assertEqual(dists[0][1], [1 / 64] * 64)

    def test_number_out_of_range_is_a_clear_error(self) -> None:
        host = HostDouble()
        host.call = lambda name, args: [1, -1]
        _, _, outcome = self.launch(
            b"from pie.inferlet import _abi\nasync def main(args):\n"
            b"    return str(_abi.call('tokenize', 0, 'x'))\n",
            host=host,
        )
        self.assertFailedWith(outcome, "host call tokenize returned [1, -1] does not fit")

    def test_unknown_host_call_name_fails_clearly(self) -> None:
        _, _, outcome = self.launch(
            b"from pie.inferlet import _abi\nasync def main(args):\n    _abi.call('List')\n"
        )
        self.assertFailedWith(outcome, "invalid host call: unknown host call 'List'")
