"""image-fetch: download a PNG and report its size and dimensions, parsed in the sandbox.

The file comes through `pie.inferlet.http.fetch` (the daemon makes the
request if its inferlet_http_allow policy allows the URL); the PNG is then
read in pure Python inside the inferlet: the signature, every chunk with its
CRC-32 (computed here, no zlib), and the IHDR header. Sends one JSON line
{"url", "bytes", "width", "height", "bit_depth", "colour", "chunks"}, or
"error: <reason>" if the fetch is refused or fails, or the file is no PNG.

    --url URL
"""

import argparse
import json

from pie.inferlet import send, sleep
from pie.inferlet.http import HttpError, fetch

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOURS = {0: "grey", 2: "rgb", 3: "palette", 4: "grey+alpha", 6: "rgba"}
YIELD_EVERY = 64 * 1024


def _crc_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = 0xEDB88320 ^ (c >> 1) if c & 1 else c >> 1
        table.append(c)
    return table


_CRC = _crc_table()


async def crc32(data):
    """CRC-32 of PNG chunks. Pure Python is ~1 MB/s in the sandbox, so it parks every
    64 KiB: the sandbox's CPU deadline bounds the time between two host calls."""
    c = 0xFFFFFFFF
    for start in range(0, len(data), YIELD_EVERY):
        for byte in data[start : start + YIELD_EVERY]:
            c = _CRC[(c ^ byte) & 0xFF] ^ (c >> 8)
        if start + YIELD_EVERY < len(data):
            await sleep(0)
    return c ^ 0xFFFFFFFF


async def parse_png(data):
    """The IHDR fields and chunk names of a PNG; ValueError if it is not a valid one."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    chunks, header, at = [], None, len(SIGNATURE)
    while at + 12 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        name = kind.decode("latin-1")
        body = data[at + 8 : at + 8 + length]
        if len(body) != length or at + 12 + length > len(data):
            raise ValueError(f"chunk {name} is truncated")
        stored = int.from_bytes(data[at + 8 + length : at + 12 + length], "big")
        if await crc32(kind + body) != stored:
            raise ValueError(f"chunk {name} has a bad CRC")
        chunks.append(name)
        if kind == b"IHDR":
            header = body
        at += 12 + length
        if kind == b"IEND":
            break
    if not chunks or chunks[0] != "IHDR" or header is None or len(header) != 13:
        raise ValueError("no IHDR chunk first")
    if chunks[-1] != "IEND":
        raise ValueError("no IEND chunk")
    return {
        "width": int.from_bytes(header[0:4], "big"),
        "height": int.from_bytes(header[4:8], "big"),
        "bit_depth": header[8],
        "colour": COLOURS.get(header[9], f"type {header[9]}"),
        "chunks": chunks,
    }


async def main(args):
    parser = argparse.ArgumentParser(prog="image-fetch")
    parser.add_argument("--url", required=True)
    opts = parser.parse_args(args)
    try:
        response = await fetch(opts.url)
        if not response.ok:
            raise ValueError(f"HTTP status {response.status}")
        info = await parse_png(response.body)
    except (HttpError, ValueError) as error:
        send(f"error: {error}")
        return
    send(json.dumps({"url": opts.url, "bytes": len(response.body), **info}))
