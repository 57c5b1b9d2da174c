"""Shared helpers for the protocol tests: a trivial program, upload and launch frames."""

from __future__ import annotations

from pie.server.uploads import CHUNK_SIZE_BYTES, hash_program

PING = {"type": "query", "corr_id": 999, "subject": "program_exists", "record": "0" * 64}
PROGRAM = b"async def main(args):\n    pass\n"


def upload_frames(data: bytes, corr_id: int, chunk: int = CHUNK_SIZE_BYTES) -> list[dict]:
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    return [
        {
            "type": "upload_program",
            "corr_id": corr_id,
            "program_hash": hash_program(data),
            "chunk_index": i,
            "total_chunks": len(chunks),
            "chunk_data": c,
        }
        for i, c in enumerate(chunks)
    ]


async def upload(client, data: bytes, corr_id: int = 90) -> dict:
    for frame in upload_frames(data, corr_id):
        client.send(frame)
    return await client.next()


async def launch(client, program_hash: str, arguments=(), corr_id: int = 91) -> str:
    reply = await client.request(
        {
            "type": "launch_instance",
            "corr_id": corr_id,
            "program_hash": program_hash,
            "arguments": list(arguments),
        }
    )
    assert reply["successful"], reply
    return reply["result"]
