"""messaging: receive three messages from the client and answer each.

--count N (default 3)
"""

import argparse

from pie.inferlet import receive, send


async def main(args):
    parser = argparse.ArgumentParser(prog="messaging")
    parser.add_argument("--count", type=int, default=3)
    opts = parser.parse_args(args)
    for i in range(opts.count):
        message = await receive()
        send(f"reply {i + 1}: {message.upper()}")
