"""The pie command: run, query, token, serve's options and the dispatch hooks."""

from __future__ import annotations

import io
import os
import sys

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial import unittest

from pie import cli
from pie.server.auth import validate_token
from pie.server.uploads import hash_program
from tests.pieserver import SECRET, LiveServer, spawn_module, token
from tests.protocol_helpers import PROGRAM

pytestmark = pytest.mark.slow


class RunTests(unittest.TestCase):
    def program_file(self) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(PROGRAM)
        return path

    async def run_cli(self, server, *argv, script=None):
        """Run `pie run` in-process while `script(instance)` plays the instance's part."""
        args = cli.parse_args(
            [
                "run",
                *argv[:1],
                "--url",
                f"ws://127.0.0.1:{server.port_number}",
                "--token",
                token(),
                *argv[1:],
            ]
        )
        out, err = io.StringIO(), io.StringIO()
        started = server.runtime.next_launch()
        running = Deferred.fromCoroutine(cli.run_program(args, reactor, out, err))
        if script is not None:
            script(await started)
        return await running, out.getvalue(), err.getvalue()

    async def test_run_uploads_once_streams_and_exits_with_the_outcome(self):
        server = await LiveServer(self, auth=True).start()
        path = self.program_file()

        def succeed(instance):
            self.assertEqual(instance.arguments, ["--prompt", "hi there"])
            instance.send("Hello")
            instance.send("world")
            instance.finish()

        status, out, err = await self.run_cli(
            server, path, "--", "--prompt", "hi there", script=succeed
        )
        self.assertEqual((status, out), (0, "Hello\nworld\n"))
        self.assertIn(f"uploaded {path} ({hash_program(PROGRAM)})", err)
        self.assertIn("terminated: instance normally finished", err)

        status, out, err = await self.run_cli(
            server, path, script=lambda i: i.finish("Runtime error: boom")
        )
        self.assertEqual(status, 1)
        self.assertNotIn("uploaded", err)  # already on the server
        self.assertIn("terminated: Runtime error: boom", err)

    async def test_query(self):
        server = await LiveServer(self, auth=True).start()
        args = cli.parse_args(
            [
                "query",
                "program_exists",
                "ab" * 32,
                "--url",
                f"ws://127.0.0.1:{server.port_number}",
                "--token",
                token(),
            ]
        )
        out = io.StringIO()
        self.assertEqual(await cli.query_command(args, reactor, out), 0)
        self.assertEqual(out.getvalue(), "false\n")

    async def test_missing_program_file(self):
        server = await LiveServer(self).start()
        with self.assertRaises(cli.CliError) as error:
            await self.run_cli(server, "/nonexistent/prog.py")
        self.assertIn("cannot read /nonexistent/prog.py", str(error.exception))


class TokenTests(unittest.TestCase):
    def test_token_uses_the_daemons_secret(self):
        home = self.mktemp()
        os.makedirs(home)
        with open(os.path.join(home, "auth_secret"), "w") as f:
            f.write(SECRET + "\n")
        out = io.StringIO()
        args = cli.parse_args(["token", "--home", home, "--role", "Admin", "--subject", "ops"])
        self.assertEqual(cli.token_command(args, out), 0)
        claims = validate_token(SECRET, out.getvalue().strip())
        self.assertEqual((claims.subject, claims.role), ("ops", "Admin"))

    def test_token_without_a_secret_says_where_it_looked(self):
        args = cli.parse_args(["token", "--home", "/nonexistent-home"])
        error = self.assertRaises(cli.CliError, cli.token_command, args, io.StringIO())
        self.assertIn("/nonexistent-home/auth_secret does not exist", str(error))


class DispatchTests(unittest.TestCase):
    """`pie model|worker|sandbox` reach the parsers of their own modules with the rest of argv."""

    def test_model_list_reads_the_home_it_is_given(self):
        home = os.path.abspath(self.mktemp())
        self.patch(os, "environ", dict(os.environ, PIE_HOME=home))
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["model", "list"]), 0)
        self.assertIn(f"no models in {home}/models", out.getvalue())

    def test_worker_options_are_the_workers(self):
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(cli.main(["worker", "--tp", "0"]), 2)
        self.assertIn("pie worker: --tp must be at least 1", err.getvalue())


class ConsoleScriptTests(unittest.TestCase):
    async def spawn(self, *argv: str) -> tuple[int, str]:
        child, _ = spawn_module("pie.cli", *argv)
        status = await child.ended
        return status, child.output.decode()

    async def test_pie_run_process_exit_status(self):
        """The console entry point wires run_program to a reactor and returns its status."""
        server = await LiveServer(self).start()
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(PROGRAM)
        home = os.path.abspath(self.mktemp())
        started = server.runtime.next_launch()
        running = Deferred.fromCoroutine(
            self.spawn("run", path, "--url", f"ws://127.0.0.1:{server.port_number}", "--home", home)
        )
        await DeferredList([started, running], fireOnOneCallback=True)
        if not started.called:
            self.fail(f"pie run ended without launching: {running.result}")
        instance = await started
        instance.send("out")
        instance.finish("killed by test")
        status, output = await running
        self.assertEqual(status, 1, output)
        self.assertIn("out\n", output)
        self.assertIn("terminated: killed by test", output)

    async def test_pie_serve_help_lists_the_daemon_options(self):
        status, output = await self.spawn("serve", "--help")
        self.assertEqual(status, 0, output)
        self.assertIn("--max-program-size", output)
        self.assertIn("--no-auth", output)

    async def test_pie_serve_exits_1_with_the_reason_when_the_model_cannot_load(self):
        """A model file no loader recognises stops the daemon; `pie serve` says why, status 1."""
        bad = os.path.abspath(self.mktemp())
        with open(bad, "wb") as f:
            f.write(b"not a model " * 100)
        home = os.path.abspath(self.mktemp())
        status, output = await self.spawn(
            "serve", "--model", bad, "--home", home, "--no-auth", "--port", "tcp:0"
        )
        self.assertEqual(status, 1, output)
        self.assertIn(
            "pie serve: the model could not be loaded: no model loader recognises", output
        )
        self.assertIn(bad, output)
