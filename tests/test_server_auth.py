"""Authentication: tokens as Pie mints them, and a gate that holds before authenticate."""

from __future__ import annotations

import json
import time

import jwt
from twisted.trial import unittest

from pie.server.auth import AuthError, issue_token, load_or_create_secret, validate_token
from pie.server.uploads import hash_program
from tests.pieserver import SECRET, LiveServer, token
from tests.protocol_helpers import PROGRAM, launch, upload, upload_frames


class TokenTests(unittest.SynchronousTestCase):
    def test_round_trip(self):
        claims = validate_token(SECRET, issue_token(SECRET, subject="alice", role="Admin"))
        self.assertEqual((claims.subject, claims.role, claims.is_admin), ("alice", "Admin", True))

    def test_leeway_of_60_seconds(self):
        """A token expired 30 s ago still passes (leeway 60 s); one expired 120 s ago does not."""
        now = time.time()
        validate_token(SECRET, issue_token(SECRET, lifetime_seconds=0, now=now - 30))
        expired = issue_token(SECRET, lifetime_seconds=0, now=now - 120)
        self.assertEqual(
            str(self.assertRaises(AuthError, validate_token, SECRET, expired)), "token has expired"
        )

    def test_refusals_say_why(self):
        cases = {
            issue_token("another-secret-that-is-long-enough!!"): "signature does not match",
            "not.a.jwt": "malformed token",
            jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"): "lacks the required 'exp' claim",
            jwt.encode(
                {"sub": "x", "exp": time.time() + 60}, SECRET, algorithm="HS512"
            ): "algorithm is not HS256",
            jwt.encode(
                {"sub": "x", "exp": time.time() + 60, "role": "Root"}, SECRET
            ): "'role' claim",
            jwt.encode({"sub": "x", "exp": time.time() + 60}, None, algorithm="none"): "algorithm",
        }
        for bad, reason in cases.items():
            error = self.assertRaises(AuthError, validate_token, SECRET, bad)
            self.assertIn(reason, str(error))

    def test_secret_file_is_created_once(self):
        path = self.mktemp()
        from pathlib import Path

        first = load_or_create_secret(Path(path))
        self.assertGreaterEqual(len(first), 32)
        self.assertEqual(load_or_create_secret(Path(path)), first)
        self.assertEqual(Path(path).stat().st_mode & 0o777, 0o600)


class GateTests(unittest.TestCase):
    async def test_requests_before_authenticate_are_refused_and_have_no_effect(self):
        """The seed answered "Not authenticated" and then did the work anyway; not here."""
        server = await LiveServer(self, auth=True).start()
        client = await server.connect()
        digest = hash_program(PROGRAM)
        for frame in upload_frames(PROGRAM, corr_id=1):
            client.send(frame)
        reply = await client.next()
        self.assertEqual((reply["corr_id"], reply["successful"]), (1, False))
        self.assertIn("Not authenticated", reply["result"])
        requests = [
            {"type": "query", "corr_id": 2, "subject": "program_exists", "record": digest},
            {"type": "launch_instance", "corr_id": 3, "program_hash": digest, "arguments": []},
            {
                "type": "launch_server_instance",
                "corr_id": 4,
                "port": 9000,
                "program_hash": digest,
                "arguments": [],
            },
            {
                "type": "attach_remote_service",
                "corr_id": 5,
                "endpoint": "e",
                "service_type": "l4m",
                "service_name": "n",
            },
        ]
        for request in requests:
            reply = await client.request(request)
            self.assertFalse(reply["successful"])
            self.assertTrue(reply["result"].startswith("Not authenticated"), reply)
        client.send({"type": "signal_instance", "instance_id": "x", "message": "m"})
        event = await client.next()
        self.assertEqual(event["type"], "server_event")
        self.assertIn("Not authenticated (signal_instance refused)", event["message"])
        self.assertEqual(server.runtime.programs, {})
        self.assertEqual(server.runtime.all_instances, [])
        self.assertEqual(server.runtime.attached, [])

    async def test_authenticate_then_work(self):
        server = await LiveServer(self, auth=True).start()
        client = await server.connect()
        reply = await client.request({"type": "authenticate", "corr_id": 1, "token": "garbage"})
        self.assertEqual(reply["successful"], False)
        self.assertTrue(reply["result"].startswith("Invalid token: malformed token"), reply)
        reply = await client.request(
            {"type": "authenticate", "corr_id": 2, "token": token(subject="bob")}
        )
        self.assertEqual((reply["successful"], reply["result"]), (True, "bob"))
        reply = await client.request({"type": "authenticate", "corr_id": 3, "token": token()})
        self.assertEqual((reply["successful"], reply["result"]), (True, "Already authenticated"))
        reply = await client.request(
            {"type": "query", "corr_id": 4, "subject": "program_exists", "record": "0" * 64}
        )
        self.assertEqual((reply["successful"], reply["result"]), (True, "false"))

    async def test_attach_needs_admin(self):
        server = await LiveServer(self, auth=True).start()
        attach = {
            "type": "attach_remote_service",
            "corr_id": 2,
            "endpoint": "tcp://h:1",
            "service_type": "l4m",
            "service_name": "w",
        }
        user = await server.connect()
        await user.request({"type": "authenticate", "corr_id": 1, "token": token("User")})
        reply = await user.request(attach)
        self.assertEqual(reply["result"], "attach_remote_service requires a token with role Admin")
        admin = await server.connect()
        await admin.request({"type": "authenticate", "corr_id": 1, "token": token("Admin")})
        reply = await admin.request(attach)
        self.assertEqual((reply["successful"], reply["result"]), (True, "attached w"))
        self.assertEqual(server.runtime.attached, [("tcp://h:1", "l4m", "w")])

    async def test_kv_export_admin_queries_need_admin(self):
        server = await LiveServer(self, auth=True).start()
        listing = {"type": "query", "corr_id": 2, "subject": "kv_exports", "record": ""}
        remove = {
            "type": "query",
            "corr_id": 3,
            "subject": "kv_unexport",
            "record": json.dumps({"model": "m", "name": "pinned"}),
        }
        user = await server.connect()
        await user.request({"type": "authenticate", "corr_id": 1, "token": token("User")})
        for request in (listing, remove):
            reply = await user.request(request)
            self.assertEqual(
                (reply["successful"], reply["result"]),
                (False, f"query {request['subject']} requires a token with role Admin"),
            )
        self.assertEqual(server.runtime.exports, ["pinned"])
        admin = await server.connect()
        await admin.request({"type": "authenticate", "corr_id": 1, "token": token("Admin")})
        reply = await admin.request(listing)
        self.assertEqual(
            json.loads(reply["result"]), [{"model": "m", "name": "pinned", "pages": 2}]
        )
        reply = await admin.request(remove)
        self.assertEqual((reply["successful"], reply["result"]), (True, "removed"))
        self.assertEqual(server.runtime.exports, [])
        reply = await admin.request(remove)
        self.assertEqual(reply["result"], "kv_unexport: model 'm' has no export named 'pinned'")
        reply = await admin.request({**remove, "record": "nope"})
        self.assertIn("the record must be JSON", reply["result"])

    async def test_instance_quotas_per_connection_and_per_user(self):
        server = await LiveServer(
            self, auth=True, max_instances_per_connection=2, max_instances_per_user=3
        ).start()

        async def session(subject):
            client = await server.connect()
            await client.request(
                {"type": "authenticate", "corr_id": 1, "token": token(subject=subject)}
            )
            return client

        async def try_launch(client, digest, corr_id):
            return await client.request(
                {"type": "launch_instance", "corr_id": corr_id, "program_hash": digest,
                 "arguments": []}
            )  # fmt: skip

        a1, a2, b = await session("alice"), await session("alice"), await session("bob")
        digest = (await upload(a1, PROGRAM))["result"]
        first = await launch(a1, digest, corr_id=2)
        await launch(a1, digest, corr_id=3)
        reply = await try_launch(a1, digest, 4)
        self.assertEqual(
            (reply["successful"], reply["result"]),
            (False, "instance quota reached: this connection runs 2 instances "
                    "(max_instances_per_connection = 2)"),
        )  # fmt: skip
        await launch(a2, digest, corr_id=5)  # alice's third
        reply = await try_launch(a2, digest, 6)
        self.assertEqual(
            reply["result"],
            "instance quota reached: user 'alice' runs 3 instances (max_instances_per_user = 3)",
        )
        await launch(b, digest, corr_id=7)  # bob, the neighbour, is not held back by alice
        a1.send({"type": "terminate_instance", "instance_id": first})
        self.assertEqual((await a1.next())["event"], "terminated")
        await launch(a2, digest, corr_id=8)  # a slot came back
        self.assertEqual(len(server.runtime.instances), 4)
