"""`--openai` wiring without a model: the setting, the service in the daemon's tree, the key check."""

from __future__ import annotations

import json

from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from pie.server.auth import issue_token
from pie.server.openai import OpenAIService, api_key_gate
from pie.tap import Options, makeService
from tests.fakeruntime import FakeRuntime
from tests.pieserver import SECRET


def daemon(*flags: str):
    options = Options()
    options.parseOptions(["--home", "home", "--auth-secret", SECRET, *flags])
    return options.settings, makeService(options, reactor=MemoryReactor(), runtime=FakeRuntime())


class WiringTests(unittest.TestCase):
    def test_off_by_default_and_a_service_of_the_daemon_when_set(self):
        settings, top = daemon()
        self.assertEqual(settings["openai"], "")
        self.assertNotIn("openai", [s.name for s in top])
        settings, top = daemon("--openai", "8000")
        self.assertEqual(settings["openai"], "tcp:8000")  # a bare number, as for --port
        endpoint = top.getServiceNamed("openai")
        self.assertIsInstance(endpoint, OpenAIService)
        self.assertIsNotNone(endpoint.gate)  # auth is on: keys are checked
        self.assertEqual(list(top)[-1], endpoint)  # started last, so stopped first
        _, top = daemon("--openai", "8000", "--no-auth")
        self.assertIsNone(top.getServiceNamed("openai").gate)


class GateTests(unittest.TestCase):
    def check(self, header: str | None):
        request = DummyRequest([b"v1", b"models"])
        if header is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [header.encode()])
        return api_key_gate(SECRET)(request)

    def test_a_pie_token_passes_anything_else_is_openais_401(self):
        self.assertIsNone(self.check(f"Bearer {issue_token(SECRET)}"))
        for header in (None, "Bearer", "Basic abc", "Bearer nonsense"):
            status, headers, body = self.check(header)
            error = json.loads(body)["error"]
            self.assertEqual(
                (status, error["code"], error["type"]),
                (401, "invalid_api_key", "invalid_request_error"),
            )
            self.assertEqual(headers["content-type"], "application/json")
        expired = issue_token(SECRET, lifetime_seconds=-3600)
        self.assertIn("expired", json.loads(self.check(f"Bearer {expired}")[2])["error"]["message"])
