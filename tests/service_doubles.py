"""A fake IModelWorker for model-service tests: records jobs and answers them like a tiny model.

Its "model" is a pure function of what a token attends to: the distribution
of an output row is derived from the (token, position) pairs of every slot
the row attends to (its BRLE row, or causal). So sharing pages, copying them
or recomputing them gives the same distribution exactly when the service put
the same tokens in the same slots, which is what the tests check.

Jobs are answered at once (auto=True) or held until the test calls
answer_next(), to observe batching while a job is in flight.
"""

from __future__ import annotations

import hashlib

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from pie.engine.batch import CopyKv, EmbedText, Forward, GetDistributions, MaskKv, Query, WorkerInfo
from pie.interfaces import IModelWorker, PieError


def fake_distribution(
    context: list[tuple[int, int]], size: int, vocab: int
) -> tuple[list[int], list[float]]:
    """A deterministic top-k for a row that attends to `context` ((token, position) pairs in slot order)."""
    digest = hashlib.blake2b(repr(context).encode(), digest_size=8).digest()
    start = int.from_bytes(digest, "little")
    ids = [(start + 7 * k) % vocab for k in range(size)]
    probs = [round(0.5 / (k + 1), 6) for k in range(size)]
    return ids, probs


def brle_row(runs: list[int]) -> list[bool]:
    row: list[bool] = []
    for i, run in enumerate(runs):
        row.extend([i % 2 == 0] * run)
    return row


@implementer(IModelWorker)
class FakeWorker:
    def __init__(
        self,
        num_pages: int = 16,
        num_embeds: int = 8,
        page_size: int = 4,
        dist_size: int = 3,
        vocab_size: int = 100,
        auto: bool = True,
    ) -> None:
        self.info = WorkerInfo(
            model_name="fake-model",
            kv_page_size=page_size,
            dist_size=dist_size,
            num_kv_pages=num_pages,
            num_embeds=num_embeds,
            vocab_size=vocab_size,
            max_positions=4096,
            device="cpu",
            dtype="float32",
        )
        self.tokenizer = object()
        self.auto = auto
        self.jobs: list = []  # every job received, in order
        self.held: list[tuple[object, Deferred]] = []
        self.fail_next: str | None = None
        self.kv: dict[tuple[int, int], tuple[int, int]] = {}  # (page, slot) -> (token, position)
        self.embeds: dict[int, object] = {}  # slot -> (token, position) or a stored distribution

    def execute(self, job: object) -> Deferred:
        self.jobs.append(job)
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            return fail(PieError(message))
        if self.auto:
            return succeed(self.run(job))
        d = Deferred()
        self.held.append((job, d))
        return d

    def answer_next(self) -> None:
        job, d = self.held.pop(0)
        d.callback(self.run(job))

    def close(self) -> Deferred:
        return succeed(None)

    def jobs_of(self, cls) -> list:
        return [j for j in self.jobs if isinstance(j, cls)]

    # ------------------------------------------------------------------ the fake model

    def run(self, job: object) -> object:
        if isinstance(job, Forward):
            return [self._item(item) for item in job.items]
        if isinstance(job, EmbedText):
            for slot, token, position in zip(job.slots, job.tokens, job.positions, strict=True):
                self.embeds[slot] = (token, position)
            return None
        if isinstance(job, GetDistributions):
            return [self.embeds[slot] for slot in job.slots]
        if isinstance(job, CopyKv):
            for i in range(job.size):
                value = self.kv.get((job.src, job.src_offset + i))
                self.kv[(job.dst, job.dst_offset + i)] = value
            return None
        if isinstance(job, MaskKv):
            return None
        if isinstance(job, Query):
            if job.text.startswith("bad"):
                raise PieError(f"unknown worker query {job.text!r}")
            return "pong" if job.text == "ping" else f"echo {job.text}"
        raise AssertionError(f"unexpected job {job!r}")

    def _item(self, item) -> list:
        ps = self.info.kv_page_size
        total = ps * (len(item.pages) - 1) + item.last_page_len
        if item.input_embeds:
            written = [self.embeds[s] for s in item.input_embeds]
        else:
            written = list(zip(item.tokens, item.positions, strict=True))
        start = total - len(written)
        for i, value in enumerate(written):
            flat = start + i
            self.kv[(item.pages[flat // ps], flat % ps)] = value
        context = [self.kv.get((item.pages[f // ps], f % ps)) for f in range(total)]

        def dist(row: int):
            seen = start + row + 1
            attend = brle_row(item.masks[row]) if item.masks else [True] * seen
            return fake_distribution(
                [c for c, a in zip(context[:seen], attend, strict=True) if a],
                self.info.dist_size,
                self.info.vocab_size,
            )

        if item.output_embeds:
            rows = range(len(written) - len(item.output_embeds), len(written))
            for slot, row in zip(item.output_embeds, rows, strict=True):
                self.embeds[slot] = dist(row)
        if item.sampling is not None:  # the fast path: greedy on the fake distribution
            return [dist(i)[0][0] for i in item.output_indices]
        return [dist(i) for i in item.output_indices]
