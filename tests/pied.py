"""A real daemon for tests: `pie serve` in a child process, on a free loopback port.

The child builds its own runtime, executor and listener exactly as in production
(`--model none`: no model, which hostile-program tests do not need). The sandbox
runtime the tests pinned is linked into the daemon's home, so it does not build.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from pie.runtime.executors import build
from tests import rawclient
from tests.pieserver import SECRET, spawn_module
from tests.wasm_artifact import pinned_artifact


class Daemon:
    def __init__(self, testcase: Any, home: str | None = None) -> None:
        self.testcase = testcase
        self.home = home or os.path.abspath(testcase.mktemp())
        self.child: Any = None
        self.process: Any = None
        self.port = 0

    async def start(self, *flags: str, auth: bool = False) -> Daemon:
        """Serve on HOME with these extra flags; returns once it listens.

        auth: require tokens signed with tests.pieserver.SECRET (else --no-auth).
        """
        artifact = pinned_artifact()
        link = build.artifact_path(Path(self.home)).parent
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(artifact.parent, link)
        self.child, self.process = spawn_module(
            "pie.cli", "serve", *(("--auth-secret", SECRET) if auth else ("--no-auth",)), "--home", self.home, "--model", "none",
            "--port", "tcp:0:interface=127.0.0.1", *flags,
        )  # fmt: skip
        self.testcase.addCleanup(self.kill)
        found = await self.child.when_output(rb"pie listening on \S*\(.*port=(\d+)")
        self.port = int(found.group(1))
        return self

    async def connect(self) -> rawclient.RawClient:
        client = await rawclient.connect(self.port)
        self.testcase.addCleanup(client.transport.loseConnection)
        return client

    def signal(self, name: int = signal.SIGTERM) -> None:
        self.process.signalProcess(name)

    async def kill(self) -> None:
        """kill -9 (if it still runs) and wait for it to be gone."""
        if self.child is not None and not self.child.ended.called:
            self.process.signalProcess("KILL")
            await self.child.ended
