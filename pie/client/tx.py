"""pie's client for Twisted code: `client = await connect("ws://127.0.0.1:8080")`.

Every operation returns a Deferred (await it in an `async def` run by
ensureDeferred / trial, or add callbacks).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

from pie.client.session import PieClientMixin

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class PieClient(PieClientMixin, WebSocketClientProtocol):
    """A connection to a pie daemon (see pie.client.session.PieClientMixin for operations)."""


async def _connect(url: str, reactor: Any, max_message_size: int) -> PieClient:
    if reactor is None:
        from twisted.internet import reactor
    secure, host, port, _, _, _ = parse_url(url)
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = PieClient
    factory.setProtocolOptions(
        maxFramePayloadSize=max_message_size, maxMessagePayloadSize=max_message_size
    )
    endpoint = HostnameEndpoint(reactor, host, port)
    if secure:  # wss:// needs pyOpenSSL (twisted[tls])
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    client = await endpoint.connect(factory)
    return await client.opened


def connect(
    url: str, reactor: Any = None, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> Deferred[PieClient]:
    """Open a WebSocket connection; Deferred firing with the PieClient once it is open."""
    return Deferred.fromCoroutine(_connect(url, reactor, max_message_size))
