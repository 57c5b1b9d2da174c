"""Runs the daemon's service tree as twistd would, with the runtime double (for signal tests).

Usage: python -m tests.servechild HOME  -> prints the bound port, serves until SIGTERM/SIGINT.
"""

import sys

from twisted.internet import reactor

from pie.tap import Options, makeService
from tests.fakeruntime import FakeRuntime


def main(home: str) -> None:
    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--no-auth", "--home", home])
    top = makeService(options, reactor=reactor, runtime=FakeRuntime())
    top.privilegedStartService()
    top.startService()
    # twistd's app.startApplication does exactly this: stop the services before the reactor.
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    listening = top.getServiceNamed("clients").whenListening()
    listening.addCallback(lambda port: print(port.getHost().port, flush=True))
    reactor.run()
    print("stopped cleanly", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
