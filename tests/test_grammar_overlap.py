"""Fast-path grammar masks overlap the forward pass (issue 13, point 3), on the real engine
thread with a tiny random-weight Llama: each step's mask is computed on a grammar thread
while the engine runs that step's forward pass, and joined before sampling."""

from __future__ import annotations

import threading

from twisted.trial.unittest import TestCase

from pie.engine.loaders import load_model
from pie.runtime.grammar import Vocabulary, allows
from pie.service.local import start_worker
from pie.service.service import ModelService
from tests.model_fixtures import write_tiny_model
from tests.runtime_doubles import CharTokenizer

MEET = 30.0  # seconds a side waits for the other before the test fails (no sleeps)


class Rendezvous:
    """Both sides of one step: the mask computation and the forward pass each announce that
    they have started and wait for the other, so a step passes only when the two are in
    flight at the same time (computing the mask before dispatching would wait in vain)."""

    def __init__(self) -> None:
        self.mask_started = threading.Event()
        self.forward_started = threading.Event()
        self.met: list[tuple[str, bool]] = []

    def around_mask(self, compute):
        self.mask_started.set()
        self.met.append(("mask saw forward", self.forward_started.wait(MEET)))
        return compute()

    def around_forward(self, forward):
        self.forward_started.set()
        self.met.append(("forward saw mask", self.mask_started.wait(MEET)))
        try:
            return forward()
        finally:
            self.mask_started.clear()
            self.forward_started.clear()


class _Inner:
    """An llguidance matcher whose mask computation meets the forward pass."""

    def __init__(self, inner, meeting: Rendezvous) -> None:
        self._inner, self._meeting = inner, meeting

    def compute_bitmask(self):
        return self._meeting.around_mask(self._inner.compute_bitmask)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class OverlapTests(TestCase):
    def setUp(self):
        folder = self.mktemp()
        write_tiny_model(folder)
        self.worker = start_worker(
            load_model(folder, dtype="float32"), device="cpu", dtype="float32",
            page_size=4, num_pages=8, num_embeds=8, dist_size=8, name="tiny",
        )  # fmt: skip
        self.addCleanup(self.worker.close)
        self.meeting = Rendezvous()
        model = self.worker.engine.model
        plain = model.forward
        model.forward = lambda *a, **k: self.meeting.around_forward(lambda: plain(*a, **k))
        self.service = ModelService(self.worker)

    async def test_each_mask_is_computed_while_its_forward_pass_runs(self):
        vocab = Vocabulary(CharTokenizer(), self.worker.info.vocab_size)
        matcher = vocab.matcher("regex", "[a-c]{3}")
        matcher._inner = _Inner(matcher._inner, self.meeting)
        queue = self.service.create_queue("a")
        self.service.submit("a", queue, "allocate_kv_pages", [0, 1])
        out = await self.service.submit(
            "a", queue, "generate", 3, [0], [3, 4, 5], [0, 1, 2], [1], 1.0, 0, 1.0, 7, 4, [],
            matcher,
        )  # fmt: skip
        self.assertEqual(len(out), 3, out)  # three letters: then the grammar has stopped
        self.assertTrue(all(chr(t) in "abc" for t in out), out)
        self.assertTrue(matcher.is_stopped())
        self.assertEqual(len(self.meeting.met), 6)  # both sides of three steps
        self.assertTrue(all(ok for _, ok in self.meeting.met), self.meeting.met)

    def test_the_other_methods_wait_for_a_mask_in_flight(self):
        vocab = Vocabulary(CharTokenizer(), 128)
        matcher = vocab.matcher("regex", "ab")
        release = threading.Event()
        matcher._inner = _Inner(matcher._inner, Rendezvous())
        matcher._inner._meeting.forward_started = release
        soon = matcher.allowed_soon()
        self.assertFalse(soon.done())  # the grammar thread waits for `release`
        release.set()
        self.assertTrue(matcher.consume([ord("a")]))  # joins the mask first, then checks it
        self.assertTrue(soon.done())
        self.assertTrue(allows(soon.result(), ord("a")))
        self.assertFalse(allows(matcher.allowed(), ord("a")))
