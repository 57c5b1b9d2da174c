"""Protocol round trips per second: N concurrent clients, each asking query/program_exists in a loop.

The daemon's protocol layer runs in a child process (its own reactor and core)
with a runtime that answers at once, so the figure is the cost of the
WebSocket + msgpack + session dispatch path, not of any inference.

    PYTHONPATH=. .venv/bin/python bench/protocol.py [--clients 1,8,32] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ProcessProtocol
from zope.interface import implementer

from pie.interfaces import IRuntime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HASH = "0" * 64


@implementer(IRuntime)
class _AnsweringRuntime:
    """Only what the benchmarked request touches: no program is ever stored."""

    def program_exists(self, program_hash: str) -> bool:
        return False


def serve() -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from pie.server.protocol import PieServerFactory

    factory = PieServerFactory(_AnsweringRuntime(), auth_secret=None, reactor=reactor)
    listening = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    listening.addCallback(lambda port: print(port.getHost().port, flush=True))
    reactor.run()


class _Server(ProcessProtocol):
    def __init__(self) -> None:
        self.port: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if not self.port.called and b"\n" in self._out:
            self.port.callback(int(self._out.split(b"\n")[0]))

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)


async def _client_loop(client: object, deadline: float) -> int:
    count = 0
    while time.perf_counter() < deadline:
        await client.program_exists(HASH)  # type: ignore[attr-defined]
        count += 1
    return count


async def measure(reactor: object, url: str, clients: int, seconds: float) -> float:
    from pie.client.tx import connect

    sessions = await gatherResults([connect(url, reactor=reactor) for _ in range(clients)])
    for session in sessions:  # warm up each connection
        await session.program_exists(HASH)
    start = time.perf_counter()
    counts = await gatherResults(
        [Deferred.fromCoroutine(_client_loop(s, start + seconds)) for s in sessions]
    )
    elapsed = time.perf_counter() - start
    await gatherResults([s.close() for s in sessions])
    return sum(counts) / elapsed


async def main(reactor: object, args: argparse.Namespace) -> None:
    server = _Server()
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        server,
        sys.executable,
        [sys.executable, os.path.abspath(__file__), "--serve"],
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    try:
        url = f"ws://127.0.0.1:{await server.port}"
        print(f"protocol round trips (query program_exists), {args.seconds:g} s per point")
        print(f"{'clients':>8} {'round trips/s':>14} {'per client/s':>13}")
        for clients in args.clients:
            rate = await measure(reactor, url, clients, args.seconds)
            print(f"{clients:>8} {rate:>14.0f} {rate / clients:>13.0f}", flush=True)
    finally:
        process.signalProcess("TERM")
        await server.ended


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", default="1,8,32", type=lambda s: [int(n) for n in s.split(",")]
    )
    parser.add_argument("--seconds", default=3.0, type=float)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve:
        serve()
    else:
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
