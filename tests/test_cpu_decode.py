"""The fused batch-1 decode step (pie.engine.cpu_decode) equals the torch path, every family.

Each family's tiny random model is quantized as a GGUF file would be (Q4_1 linears, and
for Gemma 3 Q8_0 and groups of 16 as int8 groups, one with mins), then two engines on the
same weights decode the same sequence, one step each: the fused step and the layer loop
(pie's float32 kernels both). Pages are shuffled, positions have a gap, and some steps
carry a BRLE mask; next-token distributions and the K/V written must agree.
"""

from __future__ import annotations

import os
import random
import tempfile
from unittest import mock

import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from twisted.trial.unittest import SkipTest, TestCase

from pie.engine import cpu_kernels
from pie.engine.batch import Forward, ForwardItem
from pie.engine.cpu_decode import INT4X8, MAX_ITEMS
from pie.engine.engine import create_engine
from pie.engine.quant import Int8Groups, Q4_1Weight, parse_q8_0
from tests.model_fixtures import dense, tiny_model
from tests.test_model_families import GEMMA2, GEMMA3

PS = 16
ATOL = 2e-5


def quantized_like_gguf(loaded, int8: tuple[str, ...] = ()) -> None:
    """Linears as Q4_1 blocks (names ending in one of `int8`: Q8_0, or int8 groups of 16
    for down_proj), the dense weights their dequantization."""
    g = torch.Generator().manual_seed(3)
    for name in [n for n in loaded.weights if n.endswith("proj.weight")]:
        w = loaded.weights[name]
        if not name.endswith(int8):
            loaded.quantized[name] = Q4_1Weight.from_dense(w.numpy())
            loaded.weights[name] = torch.from_numpy(loaded.quantized[name].dequantize())
        elif name.endswith("down_proj.weight"):  # Q6_K's shape: groups of 16
            q = torch.randint(-32, 32, w.shape, dtype=torch.int8, generator=g)
            scales = torch.rand(w.shape[0], w.shape[1] // 16, generator=g) / 50
            loaded.rows[name] = Int8Groups(q, scales)
            loaded.weights[name] = loaded.rows[name].dequantize()
        else:
            raw = quantize(w.numpy(), GGMLQuantizationType.Q8_0)
            loaded.rows[name] = parse_q8_0(raw, *w.shape)
            loaded.weights[name] = loaded.rows[name].dequantize()


class FusedEqualsLayerLoop(TestCase):
    """Llama; the subclasses the other families."""

    overrides: dict = {}
    int8: tuple[str, ...] = ()
    kernels = "fp32"  # float32 activations: the two paths agree to rounding (x8: a test below)
    atol = ATOL  # on next-token probabilities
    cache_tol = 1e-4  # on the K/V written

    def setUp(self):
        if not cpu_kernels.available():
            raise SkipTest("no compiled kernels here")
        patcher = mock.patch.dict(os.environ, {"PIE_CPU_KERNELS": self.kernels})
        patcher.start()
        self.addCleanup(patcher.stop)
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.loaded, _ = tiny_model(folder.name, **self.overrides)
        quantized_like_gguf(self.loaded, self.int8)
        self.fused, self.loop = (
            create_engine(self.loaded, device="cpu", dtype="auto", num_pages=32, page_size=PS)
            for _ in range(2)
        )
        self.assertIsNotNone(self.fused.model.fused, "this model takes the fused step")
        self.loop.model.fused = None
        self.vocab = self.loaded.config.vocab_size
        self.rng = random.Random(5)

    def run_both(self, items: list[ForwardItem]):
        outs = [e.run(Forward(items)) for e in (self.fused, self.loop)]
        for a, b in zip(*outs, strict=True):
            diff = (dense(a[0], self.vocab) - dense(b[0], self.vocab)).abs().max().item()
            self.assertLess(diff, self.atol, f"max |Δp| = {diff}")

    def prefill(self, pages: list[int], n: int) -> tuple[list[int], list[int]]:
        tokens = [self.rng.randrange(self.vocab) for _ in range(n)]
        item = ForwardItem(
            pages=pages[: -(-n // PS)], last_page_len=n - PS * (-(-n // PS) - 1),
            positions=list(range(n)), tokens=tokens,
        )  # fmt: skip
        for e in (self.fused, self.loop):
            e.run(Forward([item]))
        return tokens, list(range(n))

    def decode_item(self, pages, tokens, positions, gap=1, masks=()) -> ForwardItem:
        tokens.append(self.rng.randrange(self.vocab))
        positions.append(positions[-1] + gap)
        total = len(tokens)
        used = pages[: -(-total // PS)]
        return ForwardItem(
            pages=used,
            last_page_len=total - PS * (len(used) - 1),
            positions=positions[-1:],
            tokens=tokens[-1:],
            output_indices=[0],
            masks=[list(m) for m in masks],
        )

    def assertSameCaches(self, pages: list[int]):
        for a, b in (
            (self.fused.cache.k, self.loop.cache.k),
            (self.fused.cache.v, self.loop.cache.v),
        ):
            tol = self.cache_tol
            torch.testing.assert_close(a[:, :, pages], b[:, :, pages], rtol=tol, atol=tol)

    def test_one_sequence_on_shuffled_pages_with_a_gap_and_masks(self):
        pages = [9, 2, 14, 30]
        tokens, positions = self.prefill(pages, 21)
        before = self.fused.model.fused.steps
        for step in range(24):
            total = len(tokens) + 1  # BRLE: attend all but slots 4..9 (the new token too)
            masks = [[4, 6, total - 10]] if step % 3 == 2 else []
            item = self.decode_item(pages, tokens, positions, 7 if step == 3 else 1, masks)
            self.run_both([item])
        self.assertEqual(self.fused.model.fused.steps - before, 24, "every step was fused")
        self.assertSameCaches(pages)

    def test_several_sequences_of_different_lengths_in_one_step(self):
        runs = [([3, 17, 8], 5), ([25, 1], 19), ([12, 6, 20], 30)]
        seqs = [(pages, *self.prefill(pages, n)) for pages, n in runs]
        before = self.fused.model.fused.steps
        for step in range(6):
            items = []
            for j, (pages, tokens, positions) in enumerate(seqs):
                total = len(tokens) + 1
                masks = [[2, 1, total - 3]] if j == step % 3 else []
                items.append(self.decode_item(pages, tokens, positions, masks=masks))
            self.run_both(items)
        self.assertEqual(self.fused.model.fused.steps - before, 6)
        self.assertSameCaches([p for pages, _ in runs for p in pages])

    def test_prefill_in_the_batch_or_too_many_items_take_the_layer_loop(self):
        before = self.fused.model.fused.steps
        pages = [[2 * i, 2 * i + 1] for i in range(MAX_ITEMS + 3)]
        seqs = [(p, *self.prefill(p, 3)) for p in pages]
        mixed = [self.decode_item(*seqs[0]), self.decode_item(*seqs[1])]
        mixed[1].tokens, mixed[1].positions = [7, 8], [3, 4]  # two new tokens: not decode
        mixed[1].last_page_len += 1
        self.fused.run(Forward(mixed))
        self.fused.run(Forward([self.decode_item(*s) for s in seqs[2:]]))
        self.assertEqual(self.fused.model.fused.steps, before)


class Qwen2(FusedEqualsLayerLoop):
    overrides = {"architecture": "qwen2"}  # q/k/v biases


class Qwen3(FusedEqualsLayerLoop):
    overrides = {"architecture": "qwen3"}  # q/k norms


class Mistral(FusedEqualsLayerLoop):
    overrides = {"architecture": "mistral", "sliding_window": 8}


class Gemma3(FusedEqualsLayerLoop):
    """Sliding and global layers, GeGLU, sandwich norms; gate Q4_1 + up Q8_0 as int8 groups
    with mins, down as groups of 16."""

    overrides = GEMMA3
    int8 = ("up_proj.weight", "down_proj.weight")


class LlamaX8(FusedEqualsLayerLoop):
    """The default with AVX512-VNNI or AVX2: int4 linears take int8 activations (the x8 kernel) in the
    fused step and the layer loop alike. Their inputs differ by float32 rounding, which
    can move an activation across an int8 rounding boundary: the distributions agree
    to a looser bound (the real model's accuracy: tests/test_accuracy.py)."""

    kernels = "auto"
    atol = 5e-3
    cache_tol = 1e-2

    def setUp(self):
        super().setUp()
        if not cpu_kernels.library().pie_int4_x8():
            raise SkipTest("no x8 kernel here (no AVX2)")
        kinds = {layer.qkv.kind for layer in self.fused.model.fused._layers}
        self.assertEqual(kinds, {INT4X8}, "the fused step takes the x8 kernel")


class NotFused(TestCase):
    def test_soft_capped_attention_keeps_the_layer_loop(self):
        if not cpu_kernels.available():
            raise SkipTest("no compiled kernels here")
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        loaded, _ = tiny_model(folder.name, **GEMMA2)
        quantized_like_gguf(loaded)
        engine = create_engine(loaded, device="cpu", dtype="auto", num_pages=8, page_size=PS)
        self.assertIsNone(engine.model.fused)

    def test_off_keeps_the_layer_loop(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        loaded, _ = tiny_model(folder.name)
        quantized_like_gguf(loaded)
        with mock.patch.dict(os.environ, {"PIE_CPU_KERNELS": "off"}):
            cpu_kernels.library.cache_clear()
            self.addCleanup(cpu_kernels.library.cache_clear)
            engine = create_engine(loaded, device="cpu", dtype="auto", num_pages=8, page_size=PS)
        self.assertIsNone(engine.model.fused)
        compute = engine.info.compute
        self.assertEqual((compute["weight_kernel"], compute["decode_step"]), ("int4", "layers"))
