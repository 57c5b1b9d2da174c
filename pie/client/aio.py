"""pie's client for asyncio code: `client = await connect("ws://127.0.0.1:8080")`.

Every operation returns an asyncio Future. A process uses either this module or
pie.client.tx, not both (txaio picks one framework per process).
"""

from __future__ import annotations

import asyncio

from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url

from pie.client.session import PieClientMixin

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class PieClient(PieClientMixin, WebSocketClientProtocol):
    """A connection to a pie daemon (see pie.client.session.PieClientMixin for operations)."""


async def connect(url: str, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> PieClient:
    """Open a WebSocket connection and return the PieClient once it is open."""
    loop = asyncio.get_running_loop()
    secure, host, port, _, _, _ = parse_url(url)
    factory = WebSocketClientFactory(url, loop=loop)
    factory.protocol = PieClient
    factory.setProtocolOptions(
        maxFramePayloadSize=max_message_size, maxMessagePayloadSize=max_message_size
    )
    _, client = await loop.create_connection(factory, host, port, ssl=secure or None)
    return await client.opened
