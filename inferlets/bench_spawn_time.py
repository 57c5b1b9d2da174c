"""bench-spawn-time: sends one message at once; the client times launch -> message."""

from pie.inferlet import send


async def main(args):
    send("spawned")
