"""HTTP server inferlets (launch_server_instance): one fresh instance per request.

The runtime (pie.runtime.http) starts the program for every request with the
arguments `["--pie-http-request", <request JSON>]` and answers with the
instance's return value, a JSON object {"status", "headers", "body"}. This
module turns a friendlier handler into that `main`:

    from pie.inferlet.server import http_main

    async def handle(request):          # request: Request
        return {"status": 200, "body": "hi"}   # or a str body, or a Response dict

    main = http_main(handle)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

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
    500 with its message (the runtime logs it).
    """

    async def main(args: list[str]) -> str:
        request = parse_request(args)
        if request is None:
            return response(
                "this inferlet is an HTTP server: start it with launch_server_instance", status=400
            )
        result = await handler(request)
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
