"""The sandbox: the executor contract, plus isolation of hostile programs.

Every hostile program runs next to a well-behaved instance that is parked at
the time; the hostile one must end with a clear reason and the neighbour must
then finish intact. The runtime component is built once into the Pie cache
($PIE_HOME, default ~/.cache/pie) and shared by every test and every run.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from pie.runtime.executors import build
from pie.runtime.executors.wasm import WasmExecutor
from tests.test_executor_contract import WELL_BEHAVED, ExecutorContract, ExecutorHelpers

MEMORY_LIMIT = 64 * 1024 * 1024
DEADLINE_MS = 200


def sandbox(**limits) -> WasmExecutor:
    """A WasmExecutor over the cached runtime (built here, once, if the sources changed)."""
    build.build()
    executor = WasmExecutor(**{"memory_limit": MEMORY_LIMIT, "deadline_ms": DEADLINE_MS, **limits})
    executor.ready()
    return executor


class WasmContractTests(ExecutorContract, TestCase):
    def setUp(self) -> None:
        self.executor = sandbox()


class WasmIsolationTests(ExecutorHelpers, TestCase):
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
        self.assertEndsAlone(
            "async def main(args):\n    while True:\n        pass\n", "CPU deadline exceeded"
        )

    def test_loop_after_a_host_call_hits_the_deadline_too(self) -> None:
        _, host, outcome = self.launch(
            b"from pie.inferlet import _abi\nasync def main(args):\n"
            b"    await _abi.call_async('receive')\n    while True:\n        pass\n"
        )
        host.release("receive", "go")
        self.assertFailedWith(outcome, "CPU deadline exceeded")

    def test_busy_guest_making_host_calls_is_not_cut_off(self) -> None:
        # The deadline is CPU time between host calls, not the length of a step.
        source = (
            "from pie.inferlet import _abi\nasync def main(args):\n"
            "    n = 0\n    for i in range(40):\n"
            "        for _ in range(20000):\n            n += 1\n"
            "        _abi.call('get_version')\n    return str(n)\n"
        )
        _, _, outcome = self.launch(source.encode())
        self.assertFinishedWith(outcome, str(40 * 20000))

    def test_memory_bomb_hits_the_store_limit(self) -> None:
        self.assertEndsAlone(
            "async def main(args):\n    hog = []\n    while True:\n"
            "        hog.append(bytearray(1 << 20))\n",
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
