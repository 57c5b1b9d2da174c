"""Outgoing HTTP: `await fetch(url)`, carried out by the daemon, never by the guest.

    from pie.inferlet.http import HttpError, fetch

    response = await fetch("https://api.example.com/v1/search?q=pie", timeout=5)
    if response.ok:
        hits = response.json()

The daemon makes the request only if its `inferlet_http_allow` setting lists
the URL (off by default), follows redirects that stay allowed, and bounds
the body size, the time and the number of fetches in flight per instance
(docs/sandbox.md). A refused or failed request raises HttpError with the
daemon's reason; an HTTP error status is a Response like any other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pie.inferlet._abi import call_async

__all__ = ["HttpError", "Response", "fetch"]


class HttpError(Exception):
    """The daemon refused the request (its policy, a limit) or the request failed."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]]  # names in lower case, in the order received
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header (case-insensitive), or `default`."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), default)

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding, "replace")

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    body: bytes | str = b"",
    timeout: float | None = None,
) -> Response:
    """Make an HTTP request through the daemon; raises HttpError if it is refused or fails.

    `body` as str is sent UTF-8 encoded; `timeout` is in seconds (None: the
    daemon's limit, which also caps a longer one).
    """
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    timeout_ms = 0 if timeout is None else min(max(1, round(timeout * 1000)), 2**32 - 1)
    error, status, got, content = await call_async(
        "fetch", url, method, [(str(k), str(v)) for k, v in pairs], data, timeout_ms
    )
    if error:
        raise HttpError(error)
    return Response(status, [tuple(pair) for pair in got], bytes(content))
