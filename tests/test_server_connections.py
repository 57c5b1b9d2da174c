"""Connections under pressure, over real loopback sockets: closing clients, slow readers.

Each case runs the real runtime (dev executor, no model) behind the real
protocol, so the instance's `send()` goes through the host API as in the daemon.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from pie.runtime.executors.dev import DevExecutor
from pie.runtime.runtime import Runtime
from pie.server.uploads import hash_program
from tests.pieserver import LiveServer
from tests.protocol_helpers import launch, upload

CHATTY = b"""
from pie.inferlet import send, sleep

async def main(args):
    while True:
        send("tick " * 20)
        await sleep(1)
"""


def when(condition, timeout: float = 10.0, step: float = 0.01) -> Deferred:
    """Fires once condition() is true (polled); fails after timeout seconds."""
    done: Deferred = Deferred()
    deadline = reactor.seconds() + timeout

    def poll() -> None:
        if condition():
            done.callback(None)
        elif reactor.seconds() > deadline:
            done.errback(AssertionError(f"condition not met within {timeout} s"))
        else:
            reactor.callLater(step, poll)

    poll()
    return done


class LogCapture:
    """Every log event's text while the test runs (failures with their traceback)."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines)


class ConnectionTests(unittest.TestCase):
    async def daemon(self, **limits):
        runtime = Runtime(os.path.abspath(self.mktemp()), {}, DevExecutor(), reactor=reactor)
        runtime.startService()
        self.addCleanup(lambda: runtime.stopService() if runtime.running else None)
        server = await LiveServer(self, runtime=runtime, **limits).start()
        return runtime, server

    async def chatty_session(self):
        """A daemon, a client, and an instance of CHATTY that has sent its first message."""
        log = LogCapture(self)
        runtime, server = await self.daemon()
        client = await server.connect()
        self.assertTrue((await upload(client, CHATTY))["successful"])
        instance_id = await launch(client, hash_program(CHATTY))
        self.assertEqual((await client.next())["event"], "message")
        session = next(iter(server.factory.sessions))
        return log, runtime, server, client, session, runtime.instances.running[instance_id]

    async def test_closing_connection_is_never_written_to(self):
        """The session is closing (its close frame unanswered) while the instance sends: no traceback.

        The client stops reading, so the session stays in the closing state for the
        close handshake timeout while the instance goes on sending every millisecond.
        """
        log, runtime, server, client, session, instance = await self.chatty_session()
        session.factory.setProtocolOptions(closeHandshakeTimeout=0.5)
        client.transport.pauseProducing()
        session.sendClose(1000, "bye")
        self.assertEqual(session.state, session.STATE_CLOSING)
        await session.closed
        self.assertTrue(instance.ended)
        self.assertNotIn(instance.id, runtime.instances.running)
        self.assertNotIn("closed protocol", log.text())
        self.assertNotIn("Traceback", log.text())

    async def test_client_closing_while_its_instance_sends(self):
        """The client's close frame ends the session; the instance ends, nothing is logged."""
        log, runtime, server, client, session, instance = await self.chatty_session()
        client.transport.pauseProducing()
        client.close()
        await session.closed
        self.assertTrue(instance.ended)
        self.assertNotIn("Traceback", log.text())
