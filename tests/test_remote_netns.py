"""Multi-host on one machine: a worker in its own network namespace, attached by its address
(issue 6, point 6).

The namespace gets one end of a veth pair; the test's (root) namespace the other, on a /30 of
10.231.0.0/16 picked from the test's pid so parallel runs do not collide. Needs root and
iproute2 (`apt-get install iproute2`); skipped, with the reason, where `ip netns add` is not
allowed (an unprivileged container, no CAP_NET_ADMIN, no `ip`).
"""

from __future__ import annotations

import os
import shutil

import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from pie.runtime.instances import NORMAL_FINISH
from tests.remote_case import PROMPT, RemoteWorkerCase
from tests.remote_helpers import start_worker_process

pytestmark = pytest.mark.slow


IP = shutil.which("ip") or "/usr/sbin/ip"


async def ip(*args: str) -> tuple[int, str]:
    out, err, code = await getProcessOutputAndValue(IP, args, env=dict(os.environ))
    return code, (out + err).decode().strip()


class NamespaceWorkerTests(RemoteWorkerCase):
    async def make_namespace(self) -> str:
        """A namespace with a veth link to this one; returns the worker-side address."""
        if not os.path.exists(IP):
            raise unittest.SkipTest("iproute2 is not installed (apt-get install iproute2)")
        tag = os.getpid() % 16384  # one /30 of 10.231.0.0/16 per tag
        namespace, outside, inside = f"pie-ns-{tag}", f"pieh{tag}", f"pien{tag}"
        prefix = f"10.231.{tag // 64}.{tag % 64 * 4}"
        host_ip, worker_ip = (prefix.rsplit(".", 1)[0] + f".{tag % 64 * 4 + n}" for n in (1, 2))
        code, output = await ip("netns", "add", namespace)
        if code != 0:
            raise unittest.SkipTest(
                f"network namespaces are not available here: ip netns add: {output}"
            )
        self.addCleanup(ip, "link", "del", outside)
        self.addCleanup(ip, "netns", "del", namespace)
        for args in (
            ("link", "add", outside, "type", "veth", "peer", "name", inside),
            ("link", "set", inside, "netns", namespace),
            ("addr", "add", f"{host_ip}/30", "dev", outside),
            ("link", "set", outside, "up"),
            ("netns", "exec", namespace, IP, "addr", "add", f"{worker_ip}/30", "dev", inside),
            ("netns", "exec", namespace, IP, "link", "set", inside, "up"),
            ("netns", "exec", namespace, IP, "link", "set", "lo", "up"),
        ):
            code, output = await ip(*args)
            self.assertEqual(code, 0, f"ip {' '.join(args)}: {output}")
        self.namespace = namespace
        return worker_ip

    async def test_worker_in_another_namespace_is_attached_by_its_address(self):
        """A worker that listens on its namespace's veth address serves an inferlet in this one."""
        worker_ip = await self.make_namespace()
        process = start_worker_process(
            self.model,
            self.token_file,
            listen=f"tcp:0:interface={worker_ip}",
            prefix=(IP, "netns", "exec", self.namespace),
        )
        self.addCleanup(process.stop, "KILL")
        url = await process.url
        self.assertTrue(url.startswith(f"ws://{worker_ip}:"), url)
        port = int(url.rsplit(":", 1)[1])

        with self.assertRaises(ConnectError):  # not this host's loopback: another network stack
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                Factory.forProtocol(Protocol)
            )

        text = await self.runtime.attach_remote_service(url, "l4m", "far")
        self.assertIn(f"Attached to L4M worker far at {url}", text)
        instance_id = await self.launch(PROMPT, "12")
        self.assertEqual(await self.owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(len(self.owner.messages(instance_id)[0].split(",")), 12)
        self.assertEqual(self.runtime.model_status()[0]["workers"][0]["endpoint"], url)

        await self.pool().detach("far")
        self.assertEqual(await process.stop(), 0)
