"""Outgoing HTTP for inferlets (issue 14 point 1): the `fetch` host call under its policy.

Real inferlet sources fetch from a real loopback twisted.web server
(tests/httpfixtures.py) through the runtime, once per executor: dev here,
the wasm sandbox in FetchWasmTests. Host names other than IP literals are
answered by a fake resolver, so that "a name that resolves to 127.0.0.1"
needs no DNS.
"""

from __future__ import annotations

import datetime
import json
import textwrap

from twisted.internet import reactor, ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, gatherResults
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from pie import config
from pie.runtime.executors.dev import DevExecutor
from pie.runtime.instances import NORMAL_FINISH, Instance
from pie.runtime.outbound import (
    HttpPolicy,
    OutboundHttp,
    Refused,
    UrlPattern,
    _LimitedBody,
    parse_patterns,
    parse_url,
)
from tests.httpfixtures import ToolServer
from tests.runtime_doubles import FakeModelService, RecordingOwner, make_runtime

FETCH = textwrap.dedent(
    """
    import json
    from pie.inferlet.http import HttpError, fetch

    async def main(args):
        spec = json.loads(args[0])
        try:
            response = await fetch(
                spec["url"],
                method=spec.get("method", "GET"),
                headers=spec.get("headers"),
                body=spec.get("body", b""),
                timeout=spec.get("timeout"),
            )
        except HttpError as error:
            return json.dumps({"error": str(error)})
        return json.dumps({
            "status": response.status,
            "type": response.header("Content-Type"),
            "body": response.text(),
        })
    """
).encode()

CROWD = textwrap.dedent(
    """
    import json
    from pie.inferlet import receive, spawn
    from pie.inferlet.http import HttpError, fetch

    async def attempt(url):
        try:
            return (await fetch(url)).text()
        except HttpError as error:
            return "error: " + str(error)

    async def main(args):
        slow, hello = args
        spawn(attempt(slow))
        spawn(attempt(slow))
        await receive()  # the test signals once both are at the server
        return await attempt(hello)  # the slow ones are cancelled when main ends
    """
).encode()

ECHO = b"""
from pie.inferlet import receive, send

async def main(args):
    send("echo " + await receive())
"""


@implementer(IHostnameResolver)
class FakeResolver:
    """Answers from a table (IHostnameResolver); unknown names resolve to nothing."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):  # noqa: E501
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        if hostName in self.table:
            receiver.addressResolved(IPv4Address("TCP", self.table[hostName], portNumber))
        receiver.resolutionComplete()


class PolicyTests(unittest.TestCase):
    """The URL patterns and URL checks on their own."""

    def test_a_pattern_matches_scheme_host_port_and_path_prefix(self):
        pattern = UrlPattern.parse("https://api.example.com/v1")
        for url, allowed in (
            ("https://api.example.com/v1", True),
            ("https://API.example.com:443/v1/search?q=x", True),
            ("https://api.example.com/v10", False),
            ("https://api.example.com/", False),
            ("http://api.example.com/v1", False),
            ("https://api.example.com:8443/v1", False),
            ("https://evil.example.com/v1", False),
        ):
            self.assertEqual(pattern.matches(parse_url(url)), allowed, url)

    def test_a_wildcard_matches_subdomains_only(self):
        (pattern,) = parse_patterns("http://*.example.com")
        self.assertTrue(pattern.matches(parse_url("http://a.b.example.com/x")))
        self.assertFalse(pattern.matches(parse_url("http://example.com/x")))
        self.assertFalse(pattern.matches(parse_url("http://badexample.com/x")))

    def test_only_ip_literals_and_localhost_name_their_address(self):
        named = {
            p.text: p.names_address
            for p in parse_patterns("http://10.0.0.7 , http://localhost:8 https://x.org")
        }
        self.assertEqual(
            named, {"http://10.0.0.7": True, "http://localhost:8": True, "https://x.org": False}
        )

    def test_urls_the_policy_cannot_judge_are_refused(self):
        for url, reason in (
            ("ftp://example.com/", "only http and https"),
            ("http://user:secret@example.com/", "credentials"),
            ("http://example.com/v1/../admin", "path segments"),
            ("http://example.com/v1/%2e%2e/admin", "path segments"),
            ("/relative", "only http and https"),
            ("http://exa mple.com/", "invalid URL"),
        ):
            with self.assertRaises(Refused) as caught:
                parse_url(url)
            self.assertIn(reason, str(caught.exception), url)

    def test_a_bad_pattern_is_a_config_error(self):
        settings = {s.key: None for s in config.SETTINGS}
        settings["inferlet_http_allow"] = "http://ok.example ftp://nope.example"
        with self.assertRaises(config.ConfigError) as caught:
            config.resolve(settings, {})
        self.assertIn("ftp://nope.example", str(caught.exception))
        good = config.resolve({"inferlet_http_allow": "http://127.0.0.1:9/"}, {})
        self.assertEqual(len(HttpPolicy.from_settings(good).patterns), 1)

    def test_a_name_is_connected_at_the_address_it_was_checked_at(self):
        """No second lookup between the check and the connection (DNS rebinding)."""
        clock = MemoryReactorClock()
        resolver = FakeResolver({"api.example.com": "93.184.216.34"})
        http = OutboundHttp(clock, HttpPolicy(parse_patterns("http://api.example.com")), resolver)
        instance = Instance("0" * 64, [], None)
        pending = http.fetch(instance, "http://api.example.com/q", "GET", [], b"", 0)
        self.assertEqual([c[:2] for c in clock.tcpClients], [("93.184.216.34", 80)])
        self.assertEqual(http.in_flight(instance.id), 1)
        instance.cancel_timers()  # what ending the instance does
        self.assertEqual(self.successResultOf(pending)[0], "cancelled")
        self.assertEqual(http.in_flight(instance.id), 0)


def self_signed_pem(name: str) -> bytes:
    """A key and a self-signed certificate for `name` (subjectAltName included), as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + certificate.public_bytes(serialization.Encoding.PEM)


class BodyTests(unittest.TestCase):
    """The body reader on its own: cancelling it (the instance ended) aborts the connection."""

    def test_cancelling_while_the_body_arrives_aborts_the_connection(self):
        body = _LimitedBody(100, UNKNOWN_LENGTH)
        transport = StringTransport()
        body.makeConnection(transport)
        body.dataReceived(b"first part")
        body.finished.cancel()
        self.assertTrue(transport.disconnected)  # abortConnection
        self.failureResultOf(body.finished, CancelledError)

    def test_a_body_past_the_limit_aborts_the_connection(self):
        body = _LimitedBody(15, UNKNOWN_LENGTH)
        transport = StringTransport()
        body.makeConnection(transport)
        body.dataReceived(b"0123456789")
        self.assertFalse(transport.disconnecting)
        body.dataReceived(b"0123456789")
        self.assertTrue(transport.disconnected)  # abortConnection
        failure = self.failureResultOf(body.finished, Refused)
        self.assertEqual(str(failure.value), "response body over the limit of 15 bytes")


class TlsTests(unittest.TestCase):
    async def test_https_is_verified_against_the_host_name(self):
        """The connection goes to the checked address, but TLS still checks the name."""
        certificate = ssl.PrivateCertificate.loadPEM(self_signed_pem("localhost"))
        site = server.Site(resource.Resource())  # never reached: the handshake fails
        port = reactor.listenSSL(0, site, certificate.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"https://localhost:{port.getHost().port}/"
        resolver = FakeResolver({"localhost": "127.0.0.1"})
        http = OutboundHttp(reactor, HttpPolicy(parse_patterns(url)), resolver)
        error, status, _, body = await http.fetch(
            Instance("0" * 64, [], None), url, "GET", [], b"", 0
        )
        self.assertIn("certificate verify failed", error)
        self.assertEqual((status, body, resolver.asked), (0, b"", ["localhost"]))


class FetchTests:
    """Inferlets fetching from the loopback server; subclasses choose the executor."""

    def make_executor(self):
        raise NotImplementedError

    def setUp(self):
        self.server = ToolServer().start(self)
        self.resolver = FakeResolver({"tools.test": "127.0.0.1"})
        self.runtime = make_runtime(
            self, executor=self.make_executor(), services={"fake": FakeModelService()}
        )
        self.allow(f"http://127.0.0.1:{self.server.port}/")
        self.owner = RecordingOwner()

    def allow(self, patterns: str, **limits) -> None:
        policy = HttpPolicy(parse_patterns(patterns), **limits)
        self.runtime.http = OutboundHttp(reactor, policy, self.resolver)

    async def launch(self, program: bytes, *arguments: str) -> str:
        digest = await self.runtime.add_program(program)
        return await self.runtime.launch(digest, list(arguments), self.owner)

    async def fetch(self, **spec) -> dict:
        instance_id = await self.launch(FETCH, json.dumps(spec))
        self.assertEqual(await self.owner.ended(instance_id), NORMAL_FINISH)
        return json.loads(self.owner.messages(instance_id)[-1])

    async def test_an_allowed_fetch_returns_status_headers_and_body(self):
        got = await self.fetch(
            url=self.server.url("/echo?q=pie"), method="POST", headers={"X-Test": "yes"}, body="hi"
        )
        self.assertEqual((got["status"], got["type"]), (200, "application/json"))
        self.assertEqual(
            json.loads(got["body"]), {"method": "POST", "body": "hi", "x_test": "yes", "q": "pie"}
        )
        missing = await self.fetch(url=self.server.url("/nope"))
        self.assertEqual((missing["status"], missing["body"]), (404, "not found"))

    async def test_outgoing_http_is_off_by_default(self):
        self.runtime.http = OutboundHttp(reactor)
        got = await self.fetch(url=self.server.url("/hello"))
        self.assertIn("outgoing HTTP is off", got["error"])
        self.assertEqual(self.server.paths, [])

    async def test_a_host_not_in_the_patterns_is_refused(self):
        got = await self.fetch(url="http://example.com/")
        self.assertEqual(
            got["error"], "URL http://example.com/ is not allowed by inferlet_http_allow"
        )
        other_port = await self.fetch(url=f"http://127.0.0.1:{self.server.port + 1}/hello")
        self.assertIn("is not allowed", other_port["error"])
        self.assertEqual(self.resolver.asked, [])

    async def test_a_redirect_is_followed_only_inside_the_allowed_set(self):
        inside = await self.fetch(url=self.server.url("/redirect?to=/hello"))
        self.assertEqual((inside["status"], inside["body"]), (200, "hello"))
        outside = await self.fetch(url=self.server.url("/redirect?to=http://example.com/steal"))
        self.assertEqual(
            outside["error"],
            "redirect (302) to http://example.com/steal is not allowed by inferlet_http_allow",
        )
        self.assertEqual(self.server.paths, ["/redirect", "/hello", "/redirect"])

    async def test_a_name_resolving_to_loopback_needs_a_pattern_naming_the_address(self):
        port = self.server.port
        self.allow(f"http://tools.test:{port}/")
        got = await self.fetch(url=f"http://tools.test:{port}/hello")
        self.assertIn("tools.test resolves to 127.0.0.1, a loopback", got["error"])
        self.assertEqual(self.server.paths, [])
        redirected = f"http://127.0.0.1:{port}/redirect?to=http://tools.test:{port}/hello"
        self.allow(f"http://tools.test:{port}/ http://127.0.0.1:{port}/redirect")
        got = await self.fetch(url=redirected)
        self.assertIn("resolves to 127.0.0.1", got["error"])
        self.assertEqual(self.server.paths, ["/redirect"])

    async def test_a_body_over_the_limit_is_refused(self):
        self.allow(self.server.url("/"), max_bytes=4096)
        self.assertEqual(len((await self.fetch(url=self.server.url("/big?n=4096")))["body"]), 4096)
        declared = await self.fetch(url=self.server.url("/big?n=5000"))
        self.assertEqual(
            declared["error"], "response body of 5000 bytes over the limit of 4096 bytes"
        )
        streamed = await self.fetch(url=self.server.url("/stream?n=50000"))
        self.assertEqual(streamed["error"], "response body over the limit of 4096 bytes")
        sent = await self.fetch(url=self.server.url("/echo"), method="POST", body="z" * 5000)
        self.assertEqual(sent["error"], "request body of 5000 bytes over the limit of 4096")

    async def test_a_slow_server_times_out_and_neighbours_carry_on(self):
        self.allow(self.server.url("/"), timeout_ms=300)
        arrived = self.server.next_slow()
        slow = await self.launch(FETCH, json.dumps({"url": self.server.url("/slow")}))
        request = await arrived
        neighbour = await self.launch(ECHO)
        self.runtime.signal(neighbour, "still here")
        self.assertEqual(await self.owner.ended(neighbour), NORMAL_FINISH)
        self.assertEqual(self.owner.messages(neighbour), ["echo still here"])
        self.assertEqual(self.runtime.debug_query("ping"), "pong")
        self.assertEqual(await self.owner.ended(slow), NORMAL_FINISH)
        self.assertEqual(
            json.loads(self.owner.messages(slow)[-1]), {"error": "timed out after 300 ms"}
        )
        await self.assertFailure(self.server.ends[request], Exception)  # the connection was cut
        asked = await self.fetch(url=self.server.url("/slow"), timeout=0.05)
        self.assertEqual(asked["error"], "timed out after 50 ms")

    async def test_killing_the_instance_cancels_its_request(self):
        for path in ("/slow", "/drip"):  # waiting for the answer, and in the middle of the body
            arrived = self.server.next_slow()
            instance_id = await self.launch(FETCH, json.dumps({"url": self.server.url(path)}))
            request = await arrived
            self.assertEqual(self.runtime.http.in_flight(instance_id), 1)
            self.runtime.terminate(instance_id, "user terminated the program")
            self.assertEqual(await self.owner.ended(instance_id), "user terminated the program")
            await self.assertFailure(self.server.ends[request], Exception)  # the server saw it go
            self.assertEqual(self.runtime.http.in_flight(instance_id), 0)

    async def test_fetches_in_flight_are_bounded_per_instance(self):
        self.allow(self.server.url("/"), concurrency=2)
        arrivals = [self.server.next_slow(), self.server.next_slow()]
        crowd = await self.launch(CROWD, self.server.url("/slow"), self.server.url("/hello"))
        requests = await gatherResults(arrivals)
        self.assertEqual(self.runtime.http.in_flight(crowd), 2)
        self.runtime.signal(crowd, "go")
        self.assertEqual(await self.owner.ended(crowd), NORMAL_FINISH)
        self.assertEqual(
            self.owner.messages(crowd), ["error: too many fetches at once (at most 2)"]
        )
        self.assertEqual(self.runtime.http.in_flight(crowd), 0)  # ending main cancelled the rest
        for request in requests:
            await self.assertFailure(self.server.ends[request], Exception)
        neighbour = await self.fetch(url=self.server.url("/hello"))
        self.assertEqual(neighbour["body"], "hello")


class FetchDevTests(FetchTests, unittest.TestCase):
    def make_executor(self):
        return DevExecutor()


class FetchWasmTests(FetchTests, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from pie.runtime.executors import build

        build.build()  # cached; rebuilt only when the guest sources change

    def make_executor(self):
        from pie.runtime.executors.wasm import WasmExecutor

        return WasmExecutor()
