"""Drives pie.client.aio against a server given by URL (run as a child process by a test).

Uploads, launches, answers the instance's first message with a signal and
prints every event; exits 0 on a normal finish.
"""

import asyncio
import sys

from pie.client import RequestFailed
from pie.client.aio import connect

PROGRAM = b"async def main(args):\n    pass\n"


async def main(url: str) -> int:
    client = await connect(url)
    try:
        await client.query("weather")
    except RequestFailed as e:
        print("refused:", e)
    program_hash = await client.upload_program(PROGRAM)
    print("exists:", await client.program_exists(program_hash))
    instance = await client.launch_instance(program_hash, ["--n", "1"])
    async for event, message in instance:
        print(f"{event}: {message}", flush=True)
        if message == "hello":
            instance.send("hi back")
    await client.close()
    return 0 if message == "instance normally finished" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
