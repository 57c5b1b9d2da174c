"""Client library for pie's WebSocket protocol, for Twisted and for asyncio.

    from pie.client.tx import connect     # Twisted: operations return Deferreds
    from pie.client.aio import connect    # asyncio: operations return Futures

    client = await connect("ws://127.0.0.1:8080")
    await client.authenticate(token)
    program_hash = await client.upload_program(source_bytes)
    instance = await client.launch_instance(program_hash, ["--prompt", "Hi"])
    async for event, message in instance:
        print(event, message)

Importing this package picks no framework; the two modules each pick one.
"""

from pie.client.session import ConnectionClosed, Instance, RequestFailed

__all__ = ["ConnectionClosed", "Instance", "RequestFailed"]
