"""Nothing heavy on the reactor (issue 17 point 4): programs are checked off the reactor thread.

A 2 MB source took the daemon 5-9 s to parse on the reactor thread, during which no
client was served. A thread is not enough: the compiler holds the GIL while it works
(for seconds on one huge expression). The sandbox therefore compiles an uploaded
program in a throwaway instance, on a guest thread, in slices, without the GIL
(wasm runs outside it), within the memory limit; the reactor keeps turning.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.trial import unittest

from pie.interfaces import PieError
from tests.runtime_doubles import RecordingOwner, make_runtime
from tests.wasm_artifact import BUILD_TIMEOUT, sandbox


def one_big_expression(entries: int) -> bytes:
    """main.py with a dict literal of `entries` entries: one expression, compiled in one go."""
    return (
        b"async def main(args):\n    return str(len(TABLE))\n"
        + b"TABLE = {\n"
        + b"".join(b"    %d: [%d, 'x', {'k': %d}]," % (i, i, i) for i in range(entries))
        + b"}\n"
    )


class OffReactorTests(unittest.TestCase):
    timeout = BUILD_TIMEOUT

    def ticking(self) -> list:
        ticks: list = []
        ticker = LoopingCall(lambda: ticks.append(reactor.seconds()))
        ticker.clock = reactor
        ticker.start(0.01)
        self.addCleanup(ticker.stop)
        return ticks

    async def test_a_big_program_is_compiled_while_the_reactor_turns(self):
        executor = sandbox(slice_ms=20)
        runtime = make_runtime(self, executor=executor)
        program = one_big_expression(8_000)
        ticks = self.ticking()
        before = len(ticks)
        digest = await runtime.add_program(program)
        self.assertGreater(len(ticks) - before, 3, "the reactor did not turn during the check")

        owner = RecordingOwner()
        instance_id = await runtime.launch(digest, [], owner)
        await owner.ended(instance_id)
        self.assertEqual(owner.messages(instance_id), ["8000"])
        self.assertEqual(len(executor._compiled), 1, "the launch loaded the check's code")

    async def test_a_program_too_big_to_compile_is_refused_with_the_reason(self):
        runtime = make_runtime(self, executor=sandbox(memory_limit=48 << 20))
        with self.assertRaises(PieError) as raised:
            await runtime.add_program(one_big_expression(60_000))
        self.assertIn("too big to compile within the memory limit", str(raised.exception))
        self.assertEqual(runtime.programs.hashes(), [])
