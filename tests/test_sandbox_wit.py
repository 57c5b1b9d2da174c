"""The committed WIT world is exactly what witgen makes of the host-call table."""

from __future__ import annotations

import re

from twisted.trial.unittest import TestCase

from pie.runtime import witgen
from pie.runtime.hostcalls import HOST_CALLS, HostCall


class WitWorldTests(TestCase):
    def test_committed_file_is_generated(self) -> None:
        committed = witgen.WIT_PATH.read_text(encoding="utf-8")
        self.assertEqual(
            committed,
            witgen.generate(),
            "pie/runtime/inferlet.wit is stale: run "
            "`PYTHONPATH=. .venv/bin/python -m pie.runtime.witgen --write`",
        )

    def test_every_call_is_an_import_with_its_mode(self) -> None:
        text = witgen.generate()
        host = text[text.index("interface host {") : text.index("world runtime")]
        imported = dict(re.findall(r"^    (%?[a-z][a-z0-9-]*): (func.*);$", host, re.M))
        self.assertEqual(set(imported), {witgen.kebab(n) for n in HOST_CALLS})
        for name, call in HOST_CALLS.items():
            signature = imported[witgen.kebab(name)]
            if call.mode == "async":
                self.assertTrue(signature.endswith("-> u32"), signature)
            elif call.result is None:
                self.assertNotIn("->", signature)
            else:
                self.assertTrue(signature.endswith(f"-> {call.result}"), signature)

    def test_every_async_result_has_a_typed_resume_export(self) -> None:
        text = witgen.generate()
        for call in HOST_CALLS.values():
            if call.mode != "async":
                continue
            export = witgen.resume_export(call)
            if call.result is None:
                self.assertIn("export resume: func(fut: u32) -> bool;", text)
            else:
                self.assertIn(
                    f"export {export}: func(fut: u32, value: {call.result}) -> bool;", text
                )

    def test_keywords_are_escaped(self) -> None:
        self.assertEqual(witgen.kebab("list"), "%list")
        self.assertEqual(witgen.kebab("forward_text"), "forward-text")
        call = HostCall("type", (("future", "u32"),), "string", "async", "doc")
        self.assertEqual(witgen.resume_export(call), "resume-type")
        self.assertEqual(witgen._signature(list(call.params), None), "func(%future: u32)")

    def test_cli_writes_nothing_without_flag(self) -> None:
        before = witgen.WIT_PATH.stat().st_mtime_ns
        from io import StringIO
        from unittest import mock

        with mock.patch("sys.stdout", new_callable=StringIO) as out:
            self.assertEqual(witgen.main([]), 0)
        self.assertEqual(out.getvalue(), witgen.generate())
        self.assertEqual(witgen.WIT_PATH.stat().st_mtime_ns, before)
