"""HTTP server inferlets (launch_server_instance): one fresh instance per request.

The runtime (pie.runtime.http) starts the program for every request with the
arguments `["--pie-http-request", <request JSON>]` and answers with the
instance's return value, a JSON object {"status", "headers", "body"}. This
module turns a friendlier handler into that `main`:

    from pie.inferlet.server import http_main

    async def handle(request):          # request: Request
        return {"status": 200, "body": "hi"}   # or a str body, or a Response dict

    main = http_main(handle)

A handler may stream instead of returning: start the response, write chunks
as they are ready (each is sent at once, chunked; `text/event-stream` works),
finish it (or let the handler return, which finishes it):

    async def handle(request):
        resp = await request.start_response(200, {"content-type": "text/event-stream"})
        for token in tokens:
            await resp.write(f"data: {token}\\n\\n")   # waits while the client is slow
        await resp.finish()

A client that disconnects ends the instance (its KV pages return to the pool).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pie.inferlet._abi import call, call_async

HTTP_REQUEST_ARGUMENT = "--pie-http-request"


@dataclass
class Request:
    method: str = "GET"
    path: str = "/"
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    arguments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        """The body parsed as JSON (ValueError if it is not)."""
        return json.loads(self.body)

    async def start_response(
        self, status: int = 200, headers: dict[str, str] | None = None
    ) -> StreamedResponse:
        """Send the status and headers now; the body follows through the returned writer.

        Once started, what the handler returns is ignored.
        """
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"status must be an integer 100..599, not {status!r}")
        pairs = [(str(k), str(v)) for k, v in (headers or {}).items()]
        call("http_response_start", status, pairs)
        return StreamedResponse()


class StreamedResponse:
    """The body of a started response (Request.start_response)."""

    def __init__(self) -> None:
        self.finished = False

    async def write(self, data: str | bytes) -> None:
        """Send a chunk (str is UTF-8); returns once the client's socket can take more."""
        if self.finished:
            raise RuntimeError("the response is finished")
        await call_async("http_response_write", data.encode() if isinstance(data, str) else data)

    async def finish(self) -> None:
        """End the response (the client sees the body complete)."""
        if not self.finished:
            self.finished = True
            call("http_response_finish")


def parse_request(args: list[str]) -> Request | None:
    """The HTTP request these launch arguments carry, or None for a normal launch."""
    if len(args) != 2 or args[0] != HTTP_REQUEST_ARGUMENT:
        return None
    data = json.loads(args[1])
    return Request(
        method=data.get("method", "GET"),
        path=data.get("path", "/"),
        query=data.get("query", ""),
        headers=dict(data.get("headers", {})),
        body=data.get("body", ""),
        arguments=list(data.get("arguments", [])),
    )


def response(
    body: str | dict | list = "", status: int = 200, headers: dict[str, str] | None = None
) -> str:
    """A response as the runtime expects it; dict/list bodies become JSON."""
    headers = dict(headers or {})
    if not isinstance(body, str):
        body = json.dumps(body)
        headers.setdefault("content-type", "application/json")
    return json.dumps({"status": status, "headers": headers, "body": body})


Handler = Callable[[Request], Awaitable[Any]]


def http_main(handler: Handler) -> Callable[[list[str]], Awaitable[str]]:
    """`main(args)` for a server inferlet from `async def handler(request)`.

    The handler returns a str (the body, status 200), a dict with any of
    status/headers/body, or the text of response(). An exception becomes a
    500 with its message (the runtime logs it). A handler that streamed
    (request.start_response) returns nothing; its response is finished for it.
    """

    async def main(args: list[str]) -> str:
        request = parse_request(args)
        if request is None:
            return response(
                "this inferlet is an HTTP server: start it with launch_server_instance", status=400
            )
        result = await handler(request)
        if result is None:
            return response("the handler returned no response", status=500)
        if isinstance(result, str):
            try:
                parsed = json.loads(result)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and "status" in parsed:
                return result
            return response(result)
        if isinstance(result, dict):
            return response(
                result.get("body", ""), int(result.get("status", 200)), result.get("headers")
            )
        raise TypeError(f"HTTP handler returned {type(result).__name__}, not str or dict")

    return main
