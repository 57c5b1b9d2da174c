"""Daemon memory: idle RSS with the default model, and RSS per parked instance.

Starts `pie serve` (cpu, wasm) on a temporary home that links the cached
SmolLM2 model, reads its RSS once it listens, then launches 2 x 50 instances
that park in receive() and prints the growth per instance. Figures: docs/limits.md.
Run from the repository root: PYTHONPATH=$PWD python bench/memory.py
"""

import os
import re
import subprocess
import sys
import tempfile

from twisted.internet import defer, task

from pie.server.uploads import hash_program
from tests import rawclient
from tests.test_server_protocol import upload

PARK = b"from pie.inferlet import receive, send\n\nasync def main(args):\n    send('parked')\n    await receive()\n"


def rss(pid):
    return int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024


async def main(reactor):
    home = tempfile.mkdtemp()
    os.makedirs(f"{home}/models")
    os.symlink(
        os.path.expanduser("~/.cache/pie/models/smollm2-135m-instruct"),
        f"{home}/models/smollm2-135m-instruct",
    )
    log = open(f"{home}/log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pie.cli",
            "serve",
            "--no-auth",
            "--home",
            home,
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--device",
            "cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        port = None
        while port is None:
            await task.deferLater(reactor, 0.5, lambda: None)
            m = re.search(r"pie listening on \S*\(.*port=(\d+)", open(f"{home}/log").read())
            port = m and int(m.group(1))
        await task.deferLater(reactor, 3, lambda: None)
        idle = rss(proc.pid)
        client = await rawclient.connect(port)
        assert (await upload(client, PARK, corr_id=1))["successful"]
        ids = set()
        for batch in range(2):
            for i in range(50):
                client.send(
                    {
                        "type": "launch_instance",
                        "corr_id": 10 + batch * 100 + i,
                        "program_hash": hash_program(PARK),
                        "arguments": [],
                    }
                )
            got = 0
            while got < 50:
                msg = await client.next()
                got += msg.get("event") == "message"
                if msg["type"] == "response":
                    ids.add(msg["result"])
            print(f"{len(ids)} parked: RSS {rss(proc.pid)} MiB")
            if batch == 0:
                first = rss(proc.pid)
        print(
            f"idle RSS {idle} MiB; per parked instance (50->100) {(rss(proc.pid) - first) / 50 * 1024:.0f} KiB"
        )
    finally:
        proc.kill()


task.react(lambda r: defer.ensureDeferred(main(r)))
