"""The client side of pie's protocol, written once for Twisted and asyncio through txaio.

`PieClientMixin` holds everything but the transport: correlation of requests
and responses, chunked uploads, per-instance event streams. pie.client.tx and
pie.client.aio mix it into autobahn's Twisted and asyncio WebSocket client
protocols. Every operation returns a txaio future: a Deferred under Twisted, an
asyncio Future under asyncio; both can be awaited.

Unlike Pie 0.1.1's Python client, a request's future is registered before its
frames are sent (no lost fast replies), and a launched instance's event stream
exists before any event that follows the launch response is dispatched.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
import txaio

from pie.server.uploads import CHUNK_SIZE_BYTES, hash_program

__all__ = ["ConnectionClosed", "EventStream", "Instance", "PieClientMixin", "RequestFailed"]


class RequestFailed(Exception):
    """The server answered a request with successful=false; str(self) is its reason."""


class ConnectionClosed(Exception):
    """The connection ended before the answer or event arrived."""


class EventStream:
    """An unbounded queue whose get() returns a txaio future."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiters: deque[Any] = deque()
        self._error: Exception | None = None

    def put(self, item: Any) -> None:
        if self._waiters:
            txaio.resolve(self._waiters.popleft(), item)
        else:
            self._items.append(item)

    def get(self) -> Any:
        if self._items:
            return txaio.create_future_success(self._items.popleft())
        if self._error is not None:
            return txaio.create_future_error(self._error)
        waiter = txaio.create_future()
        self._waiters.append(waiter)
        return waiter

    def close(self, error: Exception) -> None:
        """No more items will come: waiters (now and later, once drained) get `error`."""
        self._error = error
        while self._waiters:
            txaio.reject(self._waiters.popleft(), error)


class Instance:
    """A launched instance: its id, its events, and the owner's controls.

    `recv()` gives the next (event, message); `async for event, message in
    instance` yields events up to and including "terminated".
    """

    def __init__(self, client: PieClientMixin, instance_id: str) -> None:
        self.client = client
        self.instance_id = instance_id
        self.events = EventStream()
        self._done = False

    def recv(self) -> Any:
        return self.events.get()

    def send(self, message: str) -> None:
        self.client.signal_instance(self.instance_id, message)

    def terminate(self) -> None:
        self.client.terminate_instance(self.instance_id)

    def __aiter__(self) -> Instance:
        return self

    async def __anext__(self) -> tuple[str, str]:
        if self._done:
            raise StopAsyncIteration
        event, message = await self.recv()
        self._done = event == "terminated"
        return event, message


class PieClientMixin:
    """Mixed into an autobahn WebSocketClientProtocol (Twisted or asyncio flavour)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_corr_id = 1
        self._pending: dict[int, tuple[Any, Callable[[str], Any]]] = {}
        self.instances: dict[str, Instance] = {}
        self.server_events = EventStream()
        self.opened = txaio.create_future()
        self.closed = txaio.create_future()

    def onOpen(self) -> None:
        txaio.resolve(self.opened, self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        error = ConnectionClosed(f"connection closed ({code}: {reason})")
        if not txaio.is_called(self.opened):
            txaio.reject(self.opened, error)
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            txaio.reject(future, error)
        for instance in self.instances.values():
            instance.events.close(error)
        self.server_events.close(error)
        if not txaio.is_called(self.closed):
            txaio.resolve(self.closed, code)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.server_events.put(f"(text frame from server) {payload[:200]!r}")
            return
        message = msgpack.unpackb(payload, raw=False)
        kind = message.get("type")
        if kind == "response":
            entry = self._pending.pop(message["corr_id"], None)
            if entry is not None:
                future, transform = entry
                if message["successful"]:
                    try:
                        txaio.resolve(future, transform(message["result"]))
                    except Exception as e:
                        txaio.reject(future, e)
                else:
                    txaio.reject(future, RequestFailed(message["result"]))
        elif kind == "instance_event":
            instance = self.instances.get(message["instance_id"])
            if instance is not None:
                instance.events.put((message["event"], message["message"]))
                if message["event"] == "terminated":
                    del self.instances[instance.instance_id]
        elif kind == "server_event":
            self.server_events.put(message["message"])

    # ------------------------------------------------------------------ requests

    def _send(self, message: dict[str, Any]) -> None:
        self.sendMessage(msgpack.packb(message, use_bin_type=True), isBinary=True)

    def _expect(self, transform: Callable[[str], Any] = str) -> tuple[int, Any]:
        """A fresh corr_id and the future its response will resolve (registered first)."""
        corr_id = self._next_corr_id
        self._next_corr_id = corr_id % (2**32 - 1) + 1
        future = txaio.create_future()
        self._pending[corr_id] = (future, transform)
        return corr_id, future

    def call(self, message: dict[str, Any], transform: Callable[[str], Any] = str) -> Any:
        """Send a request (its corr_id is filled in); future of transform(result).

        The future fails with RequestFailed when the server says successful=false.
        """
        corr_id, future = self._expect(transform)
        self._send(dict(message, corr_id=corr_id))
        return future

    def authenticate(self, token: str) -> Any:
        """Future of the token's subject (or "Already authenticated")."""
        return self.call({"type": "authenticate", "token": token})

    def query(self, subject: str, record: str = "") -> Any:
        return self.call({"type": "query", "subject": subject, "record": record})

    def program_exists(self, program_hash: str) -> Any:
        """Future of a bool."""
        return self.call(
            {"type": "query", "subject": "program_exists", "record": program_hash},
            lambda result: result == "true",
        )

    def model_status(self) -> Any:
        """Future of the list of model status dicts."""
        return self.call({"type": "query", "subject": "model_status", "record": ""}, json.loads)

    def upload_program(self, program: bytes) -> Any:
        """Send the program in 256 KiB chunks; future of its hash once the server stored it."""
        program_hash = hash_program(program)
        chunks = [
            program[i : i + CHUNK_SIZE_BYTES] for i in range(0, len(program), CHUNK_SIZE_BYTES)
        ] or [b""]
        corr_id, future = self._expect()
        for index, chunk in enumerate(chunks):
            self._send(
                {
                    "type": "upload_program",
                    "corr_id": corr_id,
                    "program_hash": program_hash,
                    "chunk_index": index,
                    "total_chunks": len(chunks),
                    "chunk_data": chunk,
                }
            )
        return future

    def launch_instance(self, program_hash: str, arguments: list[str] | None = None) -> Any:
        """Future of an Instance, whose event stream exists before any of its events arrive."""
        return self.call(
            {"type": "launch_instance", "program_hash": program_hash, "arguments": arguments or []},
            self._register_instance,
        )

    def launch_server_instance(
        self, program_hash: str, port: int, arguments: list[str] | None = None
    ) -> Any:
        """Future of an Instance for the HTTP server (terminate() stops it)."""
        return self.call(
            {
                "type": "launch_server_instance",
                "port": port,
                "program_hash": program_hash,
                "arguments": arguments or [],
            },
            self._register_instance,
        )

    def _register_instance(self, instance_id: str) -> Instance:
        instance = Instance(self, instance_id)
        self.instances[instance_id] = instance
        return instance

    def signal_instance(self, instance_id: str, message: str) -> None:
        self._send({"type": "signal_instance", "instance_id": instance_id, "message": message})

    def terminate_instance(self, instance_id: str) -> None:
        self._send({"type": "terminate_instance", "instance_id": instance_id})

    def attach_remote_service(self, endpoint: str, service_type: str, service_name: str) -> Any:
        return self.call(
            {
                "type": "attach_remote_service",
                "endpoint": endpoint,
                "service_type": service_type,
                "service_name": service_name,
            }
        )

    def close(self) -> Any:
        """Close the connection; future fired once it is closed."""
        self.sendClose(1000)
        return self.closed
