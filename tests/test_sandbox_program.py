"""The program format, the loader that imports a program's own modules, and the guest driver."""

from __future__ import annotations

import io
import struct
import sys
import zipfile

from twisted.trial.unittest import TestCase

from pie.inferlet import _abi
from pie.inferlet._driver import Driver, Park, current
from pie.interfaces import PieError
from pie.runtime.executors import program
from pie.runtime.sandbox.loader import load_main, module_name
from tests.executor_contract import zipped


class ProgramFormatTests(TestCase):
    def test_source_file_is_main(self) -> None:
        files = program.check(b"async def main(args):\n    return 'x'\n").files
        self.assertEqual(list(files), ["main.py"])

    def test_syntax_error_message_names_file_and_line(self) -> None:
        error = self.assertRaises(PieError, program.check, b"async def main(args):\n    return (\n")
        self.assertIn("SyntaxError", str(error))
        self.assertIn("main.py, line 2", str(error))

    def test_syntax_error_in_archive_module(self) -> None:
        data = zipped({"main.py": "async def main(args): pass\n", "util.py": "def f(:\n"})
        error = self.assertRaises(PieError, program.check, data)
        self.assertIn("util.py, line 1", str(error))

    def test_main_is_required(self) -> None:
        error = self.assertRaises(PieError, program.check, b"def helper(): pass\n")
        self.assertIn("async def main(args)", str(error))
        self.assertEqual(list(program.check(b"from util import main\n").files), ["main.py"])

    def test_zipped_folder(self) -> None:
        data = zipped({"app/main.py": "async def main(a): pass\n", "app/pkg/__init__.py": ""})
        self.assertEqual(sorted(program.check(data).files), ["main.py", "pkg/__init__.py"])

    def test_archive_without_main(self) -> None:
        error = self.assertRaises(PieError, program.check, zipped({"util.py": "x = 1\n"}))
        self.assertIn("no main.py", str(error))

    def test_not_utf8(self) -> None:
        error = self.assertRaises(PieError, program.check, b"x = '\xff'\n")
        self.assertIn("not UTF-8", str(error))

    def test_broken_archive(self) -> None:
        error = self.assertRaises(PieError, program.check, b"PK\x03\x04garbage")
        self.assertIn("not a valid zip", str(error))

    def test_source_over_the_limit(self) -> None:
        limits = program.Limits(max_source_bytes=1000)
        error = self.assertRaises(PieError, program.check, b"#" * 1001, limits)
        self.assertIn("the program's source exceeds 1000 bytes", str(error))

    def test_zip_bomb_is_refused_before_it_inflates(self) -> None:
        """A 5 KB archive that would inflate to 5 MB of source: refused by its declared sizes."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("main.py", "async def main(args): pass\n" + "#" * (5 << 20))
        self.assertLess(len(buffer.getvalue()), 20_000)
        error = self.assertRaises(PieError, program.check, buffer.getvalue())
        self.assertIn(
            f"the program's sources exceed {program.DEFAULT_MAX_SOURCE_BYTES}", str(error)
        )

    def test_zip_member_that_lies_about_its_size_is_refused(self) -> None:
        """Declared 30 bytes, inflates to 1 MB: nothing past the declared size is inflated."""
        buffer = io.BytesIO()
        source = "async def main(args): pass\n" + "#" * (1 << 20)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("main.py", source)
        data = bytearray(buffer.getvalue())
        real = struct.pack("<I", len(source))
        for at in (i for i in range(len(data) - 4) if data[i : i + 4] == real):
            data[at : at + 4] = struct.pack("<I", 30)  # the local and central headers
        error = self.assertRaises(PieError, program.check, bytes(data))
        self.assertIn("not a valid zip file", str(error))

    def test_archive_with_too_many_members(self) -> None:
        files = {"main.py": "async def main(args): pass\n"}
        files.update({f"data/{i}.txt": "" for i in range(10)})
        error = self.assertRaises(
            PieError, program.check, zipped(files), program.Limits(max_files=10)
        )
        self.assertIn("the program archive has 11 members; the limit is 10", str(error))

    def test_bad_module_path_in_archive(self) -> None:
        data = zipped({"main.py": "async def main(a): pass\n", "my-mod.py": "x = 1\n"})
        error = self.assertRaises(PieError, program.check, data)
        self.assertIn("my-mod.py", str(error))

    def test_module_names(self) -> None:
        self.assertEqual(module_name("pkg/util.py"), "pkg.util")
        self.assertEqual(module_name("pkg/__init__.py"), "pkg")
        self.assertRaises(ValueError, module_name, "data.txt")


class LoaderTests(TestCase):
    FILES = {
        "main.py": "import util\nfrom pkg import helper\nfrom pkg.deep import VALUE\n"
        "async def main(args):\n    return util.NAME + helper.twice(VALUE)\n",
        "util.py": "NAME = 'u'\n",
        "pkg/__init__.py": "",
        "pkg/helper.py": "from . import deep\ndef twice(x):\n    return x * 2 + deep.VALUE\n",
        "pkg/deep.py": "VALUE = 'd'\n",
    }

    def test_program_modules_import_each_other(self) -> None:
        main = load_main(self.FILES)
        coro = main([])
        with self.assertRaises(StopIteration) as stop:
            coro.send(None)
        self.assertEqual(stop.exception.value, "uddd")

    def test_programs_do_not_share_modules_or_touch_sys_modules(self) -> None:
        one = load_main(
            {
                "main.py": "import util\nmain = util.main\n",
                "util.py": "async def main(a): return 1\n",
            }
        )
        two = load_main(
            {
                "main.py": "import util\nmain = util.main\n",
                "util.py": "async def main(a): return 2\n",
            }
        )
        self.assertNotIn("util", sys.modules)
        self.assertEqual([_finish(one([])), _finish(two([]))], [1, 2])

    def test_missing_program_module_is_module_not_found(self) -> None:
        self.assertRaises(
            ModuleNotFoundError,
            load_main,
            {"main.py": "import pkg.nothere\n", "pkg/__init__.py": ""},
        )

    def test_main_must_exist(self) -> None:
        error = self.assertRaises(ImportError, load_main, {"main.py": "x = 1\n"})
        self.assertIn("main(args)", str(error))


def _finish(coro):
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("coroutine did not finish")


class RecordingBinding:
    """Futures are numbered in call order; sync calls echo their name."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def call(self, name, args):
        self.calls.append((name, args))
        return name

    def call_async(self, name, args):
        self.calls.append((name, args))
        return len(self.calls)


class DriverTests(TestCase):
    def test_tasks_park_and_resume_in_any_order(self) -> None:
        async def fetch(key):
            return await _abi.call_async("store_get", key)

        async def main(args):
            values = await _abi.gather(fetch("a"), fetch("b"), fetch("c"))
            return "".join(values) + _abi.call("get_version")

        binding = RecordingBinding()
        driver, step = _abi.run(main, [], binding)
        self.assertEqual(step, ("parked",))
        self.assertEqual([c[1] for c in binding.calls], [("a",), ("b",), ("c",)])
        self.assertEqual(driver.resume(3, "C"), ("parked",))
        self.assertEqual(driver.resume(1, "A"), ("parked",))
        self.assertEqual(driver.resume(2, "B"), ("done", "ABCget_version"))

    def test_failure_text_has_program_frames_only(self) -> None:
        async def main(args):
            raise ValueError("bad " + args[0])

        _, step = _abi.run(main, ["input"], RecordingBinding())
        self.assertEqual(step[0], "failed")
        self.assertIn("ValueError: bad input", step[1])
        self.assertNotIn("_driver.py", step[1])

    def test_spawned_failure_reaches_the_awaiter_after_all_tasks_end(self) -> None:
        async def boom():
            await Park(1)
            raise KeyError("k")

        async def fine():
            return await Park(2)

        async def main(args):
            try:
                await _abi.gather(boom(), fine())
            except KeyError:
                return "caught"

        driver, _ = _abi.run(main, [], RecordingBinding())
        self.assertEqual(driver.resume(1, None), ("parked",))
        self.assertEqual(driver.resume(2, "x"), ("done", "caught"))

    def test_waiting_on_nothing_is_a_deadlock_failure(self) -> None:
        async def stuck(args):
            task = _abi.spawn(stuck_forever())
            return await task

        async def stuck_forever():
            me = current().main
            return await me  # waits on main, which waits on it

        _, step = _abi.run(stuck, [], RecordingBinding())
        self.assertEqual(step[0], "failed")
        self.assertIn("deadlock", step[1])

    def test_awaiting_asyncio_objects_is_a_clear_error(self) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)

        async def main(args):
            await loop.create_future()

        _, step = _abi.run(main, [], RecordingBinding())
        self.assertEqual(step[0], "failed")
        self.assertIn("asyncio does not run inside an inferlet", step[1])

    def test_return_value_becomes_text_and_none_stays_none(self) -> None:
        async def number(args):
            return 42

        async def nothing(args):
            return None

        self.assertEqual(_abi.run(number, [], RecordingBinding())[1], ("done", "42"))
        self.assertEqual(_abi.run(nothing, [], RecordingBinding())[1], ("done", None))

    def test_main_must_be_async(self) -> None:
        self.assertRaises(TypeError, _abi.run, lambda args: None, [], RecordingBinding())

    def test_host_calls_outside_an_inferlet_explain_themselves(self) -> None:
        error = self.assertRaises(RuntimeError, _abi.call, "get_version")
        self.assertIn("inside a running inferlet", str(error))

    def test_close_runs_finally_blocks_of_parked_tasks(self) -> None:
        cleaned = []

        async def main(args):
            try:
                await Park(7)
            finally:
                cleaned.append(True)

        driver = Driver(RecordingBinding())
        self.assertEqual(driver.start(main([])), ("parked",))
        driver.close()
        self.assertEqual(cleaned, [True])
        self.assertEqual(driver.resume(7, None)[0], "failed")
