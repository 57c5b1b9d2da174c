"""docs/cli.md documents every `pie` subcommand and flag; the worker's and daemon's flags are documented too.

The parsers are read, not a list kept here, so a new subcommand or flag fails
this test until the docs have it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

from twisted.trial import unittest

from pie.cli import build_parser
from pie.cli import model as model_cli
from pie.cli import sandbox as sandbox_cli
from pie.remote.worker import Options as WorkerOptions
from pie.tap import Options as DaemonOptions

ROOT = Path(__file__).resolve().parent.parent


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def mentions(text: str, flag: str) -> bool:
    """`flag` appears as a whole option name (`--home`, not the start of `--home-dir`)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def help_text(main, argv: list[str]) -> str:
    """What `pie model|sandbox ARGV --help` prints (these build their parser inside main)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def twisted_flags(options_class) -> set[str]:
    options = options_class()
    names = [p[0] for p in getattr(options, "optParameters", [])]
    names += [f[0] for f in getattr(options, "optFlags", [])]
    helps = {p[0]: p[3] or "" for p in getattr(options, "optParameters", [])}
    return {f"--{name}" for name in names if not helps.get(name, "").startswith("(internal)")}


class CliDocTests(unittest.TestCase):
    def test_every_subcommand_is_in_cli_md(self):
        text = doc("cli.md")
        commands = subcommands(build_parser())
        self.assertIn("worker", commands)
        self.assertEqual({name for name in commands if f"`pie {name}" not in text}, set())

    def test_every_flag_of_run_token_and_query_is_in_cli_md(self):
        text = doc("cli.md")
        for name, parser in subcommands(build_parser()).items():
            missing = {flag for flag in long_flags(parser) if not mentions(text, flag)}
            self.assertEqual(missing, set(), f"pie {name}")

    def test_model_and_sandbox_subcommands_and_flags_are_in_cli_md(self):
        text = doc("cli.md")
        for command, main in (("model", model_cli.main), ("sandbox", sandbox_cli.main)):
            names = re.findall(r"\{([a-z,]+)\}", help_text(main, []))[0]
            for name in names.split(","):
                self.assertIn(f"pie {command} {name}", text)
                flags = set(re.findall(r"--[a-z][a-z-]*", help_text(main, [name]))) - {"--help"}
                missing = {flag for flag in flags if not mentions(text, flag)}
                self.assertEqual(missing, set(), f"{command} {name}")

    def test_every_worker_flag_is_in_remote_workers_md(self):
        text = doc("remote-workers.md")
        missing = {
            f for f in twisted_flags(WorkerOptions) - {"--help", "--version"} if f"`{f}" not in text
        }
        self.assertEqual(missing, set())

    def test_every_daemon_flag_is_in_configuration_md(self):
        text = doc("configuration.md")
        self.assertEqual({f for f in twisted_flags(DaemonOptions) if not mentions(text, f)}, set())
