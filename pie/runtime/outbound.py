"""Outgoing HTTP for inferlets: the `fetch` host call, the one door out of the sandbox.

A guest never gets a socket. It asks the daemon to fetch a URL, and the
daemon makes the request with treq (Twisted's HTTP client) only if the
`inferlet_http_allow` policy lets it. With no patterns (the default) every
fetch is refused. The checks, each refused with its reason:

- the URL must match a pattern: scheme, host (`*.example.com` for the
  subdomains), port, and an optional path prefix; no credentials in the URL,
  no `.`/`..` path segments (a server would resolve them past the prefix);
- the host's address must be public: a name that resolves to a loopback,
  private, link-local or otherwise non-global address is refused unless the
  pattern names the host as an IP literal or `localhost`. The connection then
  goes to the very address that was checked (no second lookup a DNS answer
  could change), with TLS still verified against the host name;
- every redirect is checked the same way, at most MAX_REDIRECTS of them;
- request and response bodies are bounded by `max_bytes`; a response is cut
  off as soon as it passes the limit (counted after gzip decoding);
- the whole fetch (lookup, connection, redirects, body) gets `timeout_ms` at
  most; a guest may ask for less;
- an instance has at most `concurrency` fetches in flight.

The guest gets (error, status, headers, body): error is "" on success, else
the reason, so that a program handles a refused or failed request like any
tool failure instead of being ended for it. Ending the instance cancels its
fetches; the connections are aborted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

MAX_REDIRECTS = 5
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
FORBIDDEN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"}
)
"""Request headers the daemon sets itself (the guest may not steer framing or the host)."""
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_DEFAULT_PORTS = {"http": 80, "https": 443}

Result = tuple[str, int, list[tuple[str, str]], bytes]
"""What the guest gets: (error, status, headers, body)."""


class Refused(Exception):
    """A fetch the policy does not allow, or a limit it ran into; str is the reason."""


# --------------------------------------------------------------------------- URLs and patterns


@dataclass(frozen=True)
class Target:
    """One URL, parsed the way treq will parse it (hyperlink), in its URI (ASCII) form."""

    text: str
    scheme: str
    host: str
    port: int
    path: str


def parse_url(text: str) -> Target:
    """The URL as a Target; Refused if it is not an absolute http(s) URL the policy can judge."""
    try:
        url = EncodedURL.from_text(text).to_uri()
    except ValueError as e:
        raise Refused(f"invalid URL {text!r}: {e}") from None
    if url.scheme not in _DEFAULT_PORTS:
        raise Refused(f"invalid URL {text!r}: only http and https are supported")
    if not url.host:
        raise Refused(f"invalid URL {text!r}: no host")
    if url.userinfo:
        raise Refused(f"invalid URL {text!r}: credentials in a URL are not allowed")
    if not 0 < (url.port or 0) < 65536:
        raise Refused(f"invalid URL {text!r}: bad port")
    if any(unquote(segment) in (".", "..") for segment in url.path):
        raise Refused(f"invalid URL {text!r}: '.' and '..' path segments are not allowed")
    path = "/" + "/".join(url.path)
    return Target(url.to_text(), url.scheme, url.host.lower(), url.port, path)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class UrlPattern:
    """`scheme://host[:port][/path-prefix]`: what one entry of inferlet_http_allow allows."""

    text: str
    scheme: str
    host: str  # lower case; "*.example.com" matches every subdomain (not example.com)
    port: int
    path: str  # "" (any path) or a prefix: "/v1" matches /v1 and /v1/..., not /v10

    @classmethod
    def parse(cls, text: str) -> UrlPattern:
        wildcard = "://*." in text
        try:
            target = parse_url(text.replace("://*.", "://wildcard.", 1) if wildcard else text)
        except Refused as e:
            raise ValueError(f"bad inferlet_http_allow pattern {text!r}: {e}") from None
        host = "*." + target.host[len("wildcard.") :] if wildcard else target.host
        return cls(text, target.scheme, host, target.port, target.path.rstrip("/"))

    @property
    def names_address(self) -> bool:
        """True if the pattern names its host's address itself: then that address may be private."""
        return self.host == "localhost" or _is_ip(self.host)

    def matches(self, target: Target) -> bool:
        if (target.scheme, target.port) != (self.scheme, self.port):
            return False
        if self.host.startswith("*."):
            if not target.host.endswith(self.host[1:]):
                return False
        elif target.host != self.host:
            return False
        return not self.path or target.path == self.path or target.path.startswith(self.path + "/")


def parse_patterns(text: str) -> tuple[UrlPattern, ...]:
    """The patterns of the setting (separated by spaces or commas); ValueError names a bad one."""
    return tuple(UrlPattern.parse(p) for p in re.split(r"[\s,]+", text) if p)


@dataclass(frozen=True)
class HttpPolicy:
    """The inferlet_http_* settings."""

    patterns: tuple[UrlPattern, ...] = ()
    max_bytes: int = 8 * 1024 * 1024
    timeout_ms: int = 30_000
    concurrency: int = 4

    @classmethod
    def from_settings(cls, settings: dict) -> HttpPolicy:
        return cls(
            parse_patterns(settings["inferlet_http_allow"]),
            settings["inferlet_http_max_bytes"],
            settings["inferlet_http_timeout_ms"],
            settings["inferlet_http_concurrency"],
        )

    def allowing(self, target: Target) -> UrlPattern | None:
        for pattern in self.patterns:
            if pattern.matches(target):
                return pattern
        return None


# --------------------------------------------------------------------------- the client


def _resolve(resolver, host: str, port: int) -> Deferred:
    """Deferred of every address `host` resolves to (IHostnameResolver, both families)."""
    done: Deferred = Deferred()
    addresses: list[str] = []

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolution) -> None:
            pass

        def addressResolved(self, address) -> None:
            addresses.append(address.host)

        def resolutionComplete(self) -> None:
            done.callback(addresses)

    resolver.resolveHostName(Receiver(), host, port)
    return done


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast


@implementer(IAgentEndpointFactory)
class _Pinned:
    """Connects the request of one hop to the address its host was checked at."""

    def __init__(self, reactor, target: Target, address: str) -> None:
        self._reactor = reactor
        self._target = target
        self._address = address

    def endpointForURI(self, uri):
        target = self._target
        where = (uri.scheme.decode(), uri.host.decode().strip("[]").lower(), uri.port)
        if where != (target.scheme, target.host, target.port):
            raise Refused(f"the request for {target.text} changed its address on the way")
        kind = TCP6ClientEndpoint if ":" in self._address else TCP4ClientEndpoint
        endpoint = kind(self._reactor, self._address, target.port)
        if target.scheme == "https":
            endpoint = wrapClientTLS(optionsForClientTLS(target.host), endpoint)
        return endpoint


def _abort(transport) -> None:
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.stopProducing)()


class _LimitedBody(Protocol):
    """Collects a response body, cutting the connection once it passes `limit` bytes."""

    def __init__(self, limit: int, declared) -> None:
        self.finished: Deferred = Deferred(lambda _: _abort(self.transport))
        self._limit = limit
        self._declared = declared
        self._parts: list[bytes] = []
        self._size = 0

    def connectionMade(self) -> None:
        if self._declared is not UNKNOWN_LENGTH and self._declared > self._limit:
            self._refuse(f"response body of {self._declared} bytes")

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._refuse("response body")
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._parts))
        else:
            self.finished.errback(reason)

    def _refuse(self, what: str) -> None:
        _abort(self.transport)
        self.finished.errback(Refused(f"{what} over the limit of {self._limit} bytes"))


class OutboundHttp:
    """Carries out the fetches of every instance under one HttpPolicy."""

    def __init__(self, reactor, policy: HttpPolicy | None = None, resolver=None) -> None:
        """`resolver`: an IHostnameResolver (default: the reactor's own)."""
        self.policy = policy if policy is not None else HttpPolicy()
        self._reactor = reactor
        self._resolver = resolver  # looked up on use: a test's Clock reactor has none
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._active: dict[str, int] = {}  # instance id -> fetches in flight

    def in_flight(self, instance_id: str) -> int:
        return self._active.get(instance_id, 0)

    def fetch(
        self,
        instance,
        url: str,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout_ms: int,
    ) -> Deferred:
        """Deferred of a Result; ending `instance` cancels it (pie.runtime.instances.Instance)."""
        policy = self.policy
        try:
            if not policy.patterns:
                raise Refused("outgoing HTTP is off (the daemon's inferlet_http_allow is empty)")
            if self.in_flight(instance.id) >= policy.concurrency:
                raise Refused(f"too many fetches at once (at most {policy.concurrency})")
            method = method.upper()
            if method not in METHODS:
                raise Refused(f"method {method!r} is not one of {', '.join(sorted(METHODS))}")
            request_headers = _request_headers(headers)
            if len(body) > policy.max_bytes:
                raise Refused(
                    f"request body of {len(body)} bytes over the limit of {policy.max_bytes}"
                )
        except Refused as refused:
            return succeed(_failed(str(refused)))
        limit_ms = min(timeout_ms or policy.timeout_ms, policy.timeout_ms)
        self._active[instance.id] = self.in_flight(instance.id) + 1
        fetching = Deferred.fromCoroutine(self._fetch(url, method, request_headers, body))
        # Not addTimeout: the client wraps the CancelledError of a cut request in
        # ResponseNeverReceived, so whether the time ran out is told by the timer itself.
        timer = self._reactor.callLater(limit_ms / 1000.0, fetching.cancel)
        instance.add_timer(fetching)
        return fetching.addBoth(self._done, instance.id, timer, limit_ms)

    def _done(self, result, instance_id: str, timer, limit_ms: int) -> Result:
        left = self._active.pop(instance_id) - 1
        if left:
            self._active[instance_id] = left
        timed_out = not timer.active()
        if not timed_out:
            timer.cancel()
        if not isinstance(result, Failure):
            return result
        if result.check(Refused):
            return _failed(str(result.value))
        if timed_out:
            return _failed(f"timed out after {limit_ms} ms")
        error = result.value
        if isinstance(error, ResponseFailed) and error.reasons:
            error = error.reasons[0].value
        if isinstance(error, CancelledError | ConnectingCancelledError):
            return _failed("cancelled")
        return _failed(f"request failed: {type(error).__name__}: {error}")

    async def _fetch(self, url: str, method: str, headers: Headers, body: bytes) -> Result:
        what = "URL"
        for _ in range(MAX_REDIRECTS + 1):
            target = parse_url(url)
            pattern = self.policy.allowing(target)
            if pattern is None:
                raise Refused(f"{what} {target.text} is not allowed by inferlet_http_allow")
            address = await self._vet(target, pattern)
            agent = Agent.usingEndpointFactory(
                self._reactor, _Pinned(self._reactor, target, address), pool=self._pool
            )
            response = await HTTPClient(agent).request(
                method,
                target.text,
                headers=headers.copy(),
                data=body or None,
                allow_redirects=False,
                unbuffered=True,
            )
            reader = _LimitedBody(self.policy.max_bytes, response.length)
            response.deliverBody(reader)
            data = await reader.finished
            location = response.headers.getRawHeaders(b"location")
            if response.code not in REDIRECTS or not location:
                pairs = [
                    (name.decode("latin-1").lower(), value.decode("latin-1"))
                    for name, values in response.headers.getAllRawHeaders()
                    for value in values
                    if value or name.lower() != b"content-encoding"  # Twisted's decoder adds ""
                ]
                return ("", response.code, pairs, data)
            try:
                url = EncodedURL.from_text(target.text).click(location[0].decode("latin-1"))
            except ValueError as e:
                raise Refused(f"redirect ({response.code}) to a bad location: {e}") from None
            url, what = url.to_text(), f"redirect ({response.code}) to"
            if response.code in (301, 302, 303) and method != "HEAD":  # as browsers do
                method, body = "GET", b""
        raise Refused(f"more than {MAX_REDIRECTS} redirects")

    async def _vet(self, target: Target, pattern: UrlPattern) -> str:
        """The address to connect to for `target`; Refused if it is not public and not named."""
        if _is_ip(target.host):
            addresses = [target.host]
        else:
            resolver = self._resolver or self._reactor.nameResolver
            addresses = await _resolve(resolver, target.host, target.port)
        if not addresses:
            raise Refused(f"{target.host} does not resolve")
        if pattern.names_address:
            return addresses[0]
        for address in addresses:
            if _public(address):
                return address
        raise Refused(
            f"{target.host} resolves to {addresses[0]}, a loopback, private or link-local "
            "address; only a pattern naming it (an IP literal or localhost) allows that"
        )


def _request_headers(pairs: list[tuple[str, str]]) -> Headers:
    headers = Headers()
    for name, value in pairs:
        if not _TOKEN.match(name):
            raise Refused(f"invalid header name {name!r}")
        if name.lower() in FORBIDDEN_HEADERS:
            raise Refused(f"header {name!r} is set by the daemon")
        if any(c in value for c in "\r\n\0"):
            raise Refused(f"invalid value for header {name!r}")
        headers.addRawHeader(name.encode("ascii"), value.encode("utf-8"))
    return headers


def _failed(reason: str) -> Result:
    return (reason, 0, [], b"")
