"""Test doubles for the remote-worker tests: a fake IModelWorker and a loopback worker server."""

from __future__ import annotations

import os

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from zope.interface import implementer

from pie.engine import batch
from pie.engine.tokenizer import Tokenizer
from pie.interfaces import IModelWorker, PieError
from pie.remote import client, server

SECRET = b"s" * 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_tokenizer() -> Tokenizer:
    """A real pie Tokenizer over a word-level vocabulary 'a'..'h' plus one special token."""
    words = {c: i for i, c in enumerate("abcdefgh")}
    backend = HFTokenizer(models.WordLevel(dict(words, **{"<end>": 8}), unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<end>"])
    return Tokenizer(
        backend,
        byte_level=False,
        special_ids={8},
        chat_template="{{ messages }}",
        eos_token="<end>",
        eos_token_ids=[8],
    )


@implementer(IModelWorker)
class FakeWorker:
    """Deterministic answers computed from the job, so a remote answer can be compared."""

    def __init__(self, model_name: str = "fake-model"):
        self.info = batch.WorkerInfo(
            model_name=model_name,
            kv_page_size=16,
            dist_size=2,
            num_kv_pages=128,
            num_embeds=64,
            vocab_size=9,
            max_positions=2048,
            device="cpu",
            dtype="float32",
        )
        self.tokenizer = tiny_tokenizer()
        self.executed: list[object] = []
        self.parked: list[Deferred] = []  # jobs answered only when a test fires them

    def execute(self, job: object) -> Deferred:
        self.executed.append(job)
        if isinstance(job, batch.Query):
            if job.text == "park":
                self.parked.append(Deferred())
                return self.parked[-1]
            if job.text == "fail":
                return fail(PieError("page 99 is not allocated"))
            if job.text == "crash":
                return fail(ZeroDivisionError("division by zero"))
            return succeed("pong" if job.text == "ping" else f"echo {job.text}")
        if isinstance(job, batch.Forward):
            return succeed([self._outputs(item) for item in job.items])
        if isinstance(job, batch.GetDistributions):
            return succeed([([slot, slot + 1], [0.75, 0.25]) for slot in job.slots])
        return succeed(None)

    @staticmethod
    def _outputs(item: batch.ForwardItem) -> list:
        if item.sampling is not None:
            return [item.tokens[i] + 1 for i in item.output_indices]
        return [
            ([item.tokens[i] + 1, item.tokens[i] + 2], [0.625, 0.375]) for i in item.output_indices
        ]

    def close(self) -> Deferred:
        return succeed(None)


async def listen_worker(worker: object, secret: bytes = SECRET, name: str = "w-test", clock=None):
    """Serve `worker` on a loopback port; (factory, port, 'ws://127.0.0.1:N')."""
    factory = server.WorkerServerFactory(worker, secret, name, clock=clock)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return factory, port, f"ws://127.0.0.1:{port.getHost().port}"


def start_worker_process(
    model: str,
    token_file: str,
    *extra: str,
    listen: str = "tcp:0:interface=127.0.0.1",
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> client.WorkerProcess:
    """A real `pie worker` on the CPU in fp32 with 64 KV pages (one torch thread)."""
    args = ["--model", model, "--listen", listen, "--token-file", token_file]
    args += ["--device", "cpu", "--dtype", "float32", "--num-pages", "64", *extra]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    return client.spawn_worker(reactor, args, env=env, prefix=prefix)
