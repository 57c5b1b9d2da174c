"""The daemon: options and config file, service tree, plugin, SIGTERM, restart with programs kept."""

from __future__ import annotations

import os
import signal

from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.server import Site

from pie.server.protocol import PieServerFactory
from pie.server.uploads import hash_program
from pie.tap import Options, makeService, memory_trimmer
from tests import rawclient
from tests.fakeruntime import FakeRuntime
from tests.pieserver import spawn_module
from tests.protocol_helpers import PROGRAM, launch, upload


def parse(*argv: str) -> dict:
    options = Options()
    options.parseOptions(list(argv))
    return options.settings


class OptionsTests(unittest.TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self):
        settings = parse("--home", "/h")
        self.assertEqual(settings["port"], "tcp:8080:interface=127.0.0.1")
        self.assertEqual(
            (settings["auth"], settings["executor"], settings["page_size"]), (True, "wasm", 16)
        )

    def test_file_then_flags(self):
        """The file overrides defaults; flags override the file; a bare port becomes tcp:N."""
        path = self.write('port = "9000"\nnum_pages = 64\nauth = false\ndevice = "cuda:1"\n')
        settings = parse("--config", path, "--num-pages", "128")
        self.assertEqual(settings["port"], "tcp:9000")
        self.assertEqual(
            (settings["num_pages"], settings["auth"], settings["device"]), (128, False, "cuda:1")
        )

    def test_bad_files_and_values(self):
        for text, message in (
            ("colour = 1\n", "unknown setting 'colour'"),
            ('num_pages = "many"\n', "num_pages must be a int"),
            ("auth = 1\n", "auth must be a bool"),
            ("port = [\n", "not valid TOML"),
            ('executor = "docker"\n', "executor must be one of wasm, dev"),
        ):
            error = self.assertRaises(usage.UsageError, parse, "--config", self.write(text))
            self.assertIn(message, str(error))
        self.assertRaises(usage.UsageError, parse, "--page-size", "zero")
        self.assertIn(
            "cannot read config file",
            str(self.assertRaises(usage.UsageError, parse, "--config", "/nonexistent.toml")),
        )

    def test_server_instance_limits(self):
        """The inferlet_server_* settings become the runtime's HttpLimits; 0 is refused."""
        from pie.runtime.http import HttpLimits

        settings = parse(
            "--inferlet-server-max-requests", "3", "--inferlet-server-idle-timeout-ms", "500"
        )
        self.assertEqual(
            HttpLimits.from_settings(settings, 20_000),
            HttpLimits(
                max_requests=3,
                max_body=16 * 2**20,
                header_timeout_ms=30_000,
                idle_timeout_ms=500,
                max_connections=2_500,  # half of the quarter the client listener leaves
                max_connections_per_address=2_500,
            ),
        )
        caps = parse(
            "--inferlet-server-max-connections", "40",
            "--inferlet-server-max-connections-per-address", "50",
        )  # fmt: skip
        limits = HttpLimits.from_settings(caps, 1024)
        self.assertEqual((limits.max_connections, limits.max_connections_per_address), (40, 40))
        limits = HttpLimits.from_settings(settings, 1024)  # 256 left by the listener, half here
        self.assertEqual((limits.max_connections, limits.max_connections_per_address), (128, 128))
        error = self.assertRaises(
            usage.UsageError, parse, "--inferlet-server-max-connections", "-1"
        )
        self.assertIn("0 (automatic) or more", str(error))
        for flag in ("--inferlet-server-max-body", "--inferlet-server-header-timeout-ms"):
            error = self.assertRaises(usage.UsageError, parse, flag, "0")
            self.assertIn("must be positive", str(error))


class ServiceTests(unittest.TestCase):
    def test_plugin_is_found(self):
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("pie", makers)
        self.assertIs(makers["pie"].options, Options)

    def test_make_service_listens_on_the_endpoint(self):
        memory = MemoryReactor()
        home = self.mktemp()
        options = Options()
        options.parseOptions(["--port", "tcp:9123:interface=127.0.0.1", "--home", home])
        top = makeService(options, reactor=memory, runtime=FakeRuntime())
        top.privilegedStartService()
        port, factory, _, interface = memory.tcpServers[0]
        self.assertEqual((port, interface), (9123, "127.0.0.1"))
        self.assertIsInstance(factory, PieServerFactory)
        self.assertTrue(factory.auth_enabled)
        # with no secret configured one is created under HOME and reused
        with open(os.path.join(home, "auth_secret")) as f:
            self.assertEqual(f.read().strip(), factory.auth_secret)
        self.assertEqual(factory.maxMessagePayloadSize, 1024 * 1024)

    def test_freed_memory_is_trimmed_every_interval_unless_0(self):
        top = makeService(self.options(), reactor=MemoryReactor(), runtime=FakeRuntime())
        self.assertEqual(top.getServiceNamed("memory-trim").step, 10)
        options = self.options("--memory-trim-interval-s", "0")
        top = makeService(options, reactor=MemoryReactor(), runtime=FakeRuntime())
        self.assertNotIn("memory-trim", [s.name for s in top])

        class Reactor(Clock):  # runs the pool's work at once, as a thread would
            def getThreadPool(self):
                return self

            def callInThreadWithCallback(self, on_result, f):
                on_result(True, f())

            def callFromThread(self, f, *args):
                f(*args)

        clock, trims = Reactor(), []
        trimmer = memory_trimmer(10, clock, trim=lambda: trims.append(clock.seconds()))
        trimmer.startService()
        clock.advance(9.5)
        self.assertEqual(trims, [0])
        clock.advance(0.5)
        self.assertEqual(trims, [0, 10])
        trimmer.stopService()
        clock.advance(10)
        self.assertEqual(trims, [0, 10])

    def options(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--home", self.mktemp(), "--port", "tcp:9123", *argv])
        return options

    def test_metrics_listen_on_their_own_endpoint(self):
        """--metrics (or TOML metrics) adds a listener before the client one; a bare number is
        tcp:N; without it there is none."""
        self.assertEqual(parse("--home", "/h")["metrics"], "")
        self.assertEqual(parse("--home", "/h", "--metrics", "9464")["metrics"], "tcp:9464")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('metrics = "tcp:9464:interface=127.0.0.1"\n')
        memory = MemoryReactor()
        options = Options()
        options.parseOptions(["--config", path, "--home", self.mktemp(), "--port", "tcp:9123"])
        top = makeService(options, reactor=memory, runtime=FakeRuntime())
        self.assertEqual([s.name for s in top], ["memory-trim", "metrics", "clients"])
        top.privilegedStartService()
        (port, site, _, interface), (client_port, *_) = memory.tcpServers
        self.assertEqual((port, interface, client_port), (9464, "127.0.0.1", 9123))
        self.assertIsInstance(site, Site)


class DaemonTests(unittest.TestCase):
    async def test_sigterm_closes_sessions_and_exits_cleanly(self):
        child, process = spawn_module("tests.servechild", os.path.abspath(self.mktemp()))
        port = int(await child.first_line)
        client = await rawclient.connect(port)
        await launch(client, (await upload(client, PROGRAM))["result"])
        process.signalProcess(signal.SIGTERM)
        self.assertEqual(await client.closed, 1000)  # a proper close frame from the daemon
        self.assertEqual(await child.ended, 0, child.output)
        self.assertIn(b"stopped cleanly", child.output)

    async def test_restart_keeps_uploaded_programs(self):
        """A fresh daemon on the same home finds the program uploaded to the previous one.

        The program store is the runtime's (pie.runtime.programs.ProgramStore), used here
        under the runtime double so the test exercises the daemon's own upload path.
        """
        from pie.runtime.programs import ProgramStore

        home = self.mktemp()

        async def daemon():
            store = ProgramStore(os.path.join(home, "programs"), reactor)
            store.scan()
            options = Options()
            options.parseOptions(
                ["--port", "tcp:0:interface=127.0.0.1", "--no-auth", "--home", home]
            )
            top = makeService(options, reactor=reactor, runtime=FakeRuntime(store=store))
            top.startService()
            port = await top.getServiceNamed("clients").whenListening()
            return top, await rawclient.connect(port.getHost().port)

        top, client = await daemon()
        self.assertEqual((await upload(client, PROGRAM))["result"], hash_program(PROGRAM))
        await top.stopService()
        await client.closed

        top, client = await daemon()
        self.addCleanup(top.stopService)
        query = {
            "type": "query",
            "corr_id": 1,
            "subject": "program_exists",
            "record": hash_program(PROGRAM),
        }
        self.assertEqual((await client.request(query))["result"], "true")
        self.assertTrue(await launch(client, hash_program(PROGRAM)))


class StopOrderTests(unittest.TestCase):
    async def test_sessions_close_before_the_runtime_stops(self):
        """On shutdown the listener (added last) finishes stopping before the runtime starts to."""
        from twisted.application.service import Service

        order = []

        class RecordingRuntime(FakeRuntime, Service):
            def stopService(self):
                order.append(("runtime", len(factory.sessions)))
                return Service.stopService(self)

        options = Options()
        options.parseOptions(
            ["--port", "tcp:0:interface=127.0.0.1", "--no-auth", "--home", self.mktemp()]
        )
        top = makeService(options, reactor=reactor, runtime=RecordingRuntime())
        top.startService()
        listener = top.getServiceNamed("clients")
        factory = listener.factory
        client = await rawclient.connect((await listener.whenListening()).getHost().port)
        await top.stopService()
        self.assertEqual(order, [("runtime", 0)])
        self.assertEqual(await client.closed, 1000)
