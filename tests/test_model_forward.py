"""Our forward pass equals Hugging Face's LlamaForCausalLM on the same weights (issue 3, points 4 and 6).

Every check runs the real engine on a tiny random model loaded from a
safetensors folder and compares full next-token distributions (dist_size =
vocabulary) with transformers computing the same sequence from scratch.
"""

from __future__ import annotations

import os
import random
import tempfile

import torch
from twisted.trial.unittest import SkipTest, TestCase

from pie.engine.batch import CopyKv, EmbedText, Forward, ForwardItem, GetDistributions, MaskKv
from pie.engine.engine import create_engine
from pie.engine.loaders import load_model
from pie.interfaces import PieError
from tests.model_fixtures import dense, hf_probs, tiny_model, write_tiny_model

PS = 16
ATOL = 2e-5
_MODELS: dict = {}


def model(**overrides):
    """(LoadedModel, HF reference), built once per configuration."""
    key = repr(sorted(overrides.items()))
    if key not in _MODELS:
        folder = tempfile.TemporaryDirectory()
        _MODELS[key] = (*tiny_model(folder.name, **overrides), folder)
    return _MODELS[key][:2]


def engine(loaded, **options):
    options = (
        dict(device="cpu", dtype="float32", num_pages=32, num_embeds=64, page_size=PS) | options
    )
    return create_engine(loaded, dist_size=loaded.config.vocab_size, **options)


def item(pages, total, tokens, positions, **kw) -> ForwardItem:
    """A ForwardItem whose context holds `total` slots after the new tokens are written."""
    assert len(pages) == (total + PS - 1) // PS
    return ForwardItem(
        pages=list(pages),
        last_page_len=total - PS * (len(pages) - 1),
        positions=list(positions),
        tokens=list(tokens),
        **kw,
    )


class TestCase_(TestCase):
    def assertSameDistribution(self, ours, reference_probs, vocab):
        diff = (dense(ours, vocab) - reference_probs).abs().max().item()
        self.assertLess(diff, ATOL, f"max |Δp| = {diff}")


class ForwardMatchesHuggingFace(TestCase_):
    def setUp(self):
        self.loaded, self.ref = model()
        self.vocab = self.loaded.config.vocab_size
        self.rng = random.Random(1)

    def tokens(self, n):
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def test_prefill_on_shuffled_pages(self):
        """37 tokens over pages 9, 2, 14: every output row equals HF's."""
        eng = engine(self.loaded)
        toks = self.tokens(37)
        [out] = eng.run(
            Forward([item([9, 2, 14], 37, toks, range(37), output_indices=list(range(37)))])
        )
        ref = hf_probs(self.ref, toks)
        for i in range(37):
            self.assertSameDistribution(out[i], ref[i], self.vocab)

    def test_chunked_prefill_then_batched_decode(self):
        """Two sequences of different lengths prefilled in chunks, then decoded together."""
        eng = engine(self.loaded)
        a, b = self.tokens(20), self.tokens(5)
        pages_a, pages_b = [5, 30], [17]
        eng.run(Forward([item(pages_a[:1], 7, a[:7], range(7))]))
        [out_a, out_b] = eng.run(
            Forward(
                [
                    item(pages_a, 20, a[7:], range(7, 20), output_indices=[12]),
                    item(pages_b, 5, b, range(5), output_indices=[4]),
                ]
            )
        )
        for _ in range(14):  # A crosses into a third page on the way
            a.append(max(range(self.vocab), key=dense(out_a[0], self.vocab).__getitem__))
            b.append(self.rng.randrange(self.vocab))
            if len(a) > PS * len(pages_a):
                pages_a.append(11)
            if len(b) > PS * len(pages_b):
                pages_b.append(0)
            out_a, out_b = eng.run(
                Forward(
                    [
                        item(pages_a, len(a), a[-1:], [len(a) - 1], output_indices=[0]),
                        item(pages_b, len(b), b[-1:], [len(b) - 1], output_indices=[0]),
                    ]
                )
            )
            self.assertSameDistribution(out_a[0], hf_probs(self.ref, a)[-1], self.vocab)
            self.assertSameDistribution(out_b[0], hf_probs(self.ref, b)[-1], self.vocab)

    def test_single_sequence_decode_on_a_run_of_pages_and_on_shuffled_pages(self):
        """One sequence decoded alone: on consecutive pages attention reads views of the
        cache for every layer at once, on shuffled pages it gathers them; both equal HF at
        every step, across page boundaries, also with a prefill item in the same batch."""
        for pages in ([3, 4, 5], [12, 1, 7]):
            eng = engine(self.loaded)
            toks = self.tokens(14)
            eng.run(Forward([item(pages[:1], 14, toks, range(14))]))
            other = self.tokens(5)
            for step in range(22):
                toks.append(self.rng.randrange(self.vocab))
                used = pages[: (len(toks) + PS - 1) // PS]
                decode = item(used, len(toks), toks[-1:], [len(toks) - 1], output_indices=[0])
                batch = [decode]
                if step == 10:  # a prompt arrives meanwhile
                    batch.append(item([20], 5, other, range(5), output_indices=[4]))
                outs = eng.run(Forward(batch))
                self.assertSameDistribution(outs[0][0], hf_probs(self.ref, toks)[-1], self.vocab)
                if step == 10:
                    self.assertSameDistribution(
                        outs[1][0], hf_probs(self.ref, other)[-1], self.vocab
                    )

    def test_many_prompts_in_one_pass(self):
        """Similar prompts share a padded attention call, a long one goes alone: all equal HF."""
        eng = engine(self.loaded)
        prompts = [self.tokens(10), self.tokens(12), self.tokens(12), self.tokens(40)]
        pages = [[0], [1], [2], [3, 4, 5]]
        masks = [[], [], [[i + 1] for i in range(5)] + [[3, 2, i - 4] for i in range(5, 12)], []]
        items = [
            item(pg, len(p), p, range(len(p)), masks=m, output_indices=list(range(len(p))))
            for pg, p, m in zip(pages, prompts, masks, strict=True)
        ]
        outs = eng.run(Forward(items))
        for i in (0, 1, 3):
            ref = hf_probs(self.ref, prompts[i])
            for row, got in enumerate(outs[i]):
                self.assertSameDistribution(got, ref[row], self.vocab)
        p = prompts[2]  # tokens 3, 4 hidden from tokens 5.. = HF without them, same positions
        ref = hf_probs(self.ref, p[:3] + p[5:], [0, 1, 2] + list(range(5, 12)))
        self.assertSameDistribution(outs[2][11], ref[-1], self.vocab)

    def test_fork_shares_prefix_pages(self):
        """A fork keeps the shared full page and copies the partial one (CopyKv)."""
        eng = engine(self.loaded)
        prefix = self.tokens(20)
        eng.run(Forward([item([4, 11], 20, prefix, range(20))]))
        eng.run(CopyKv(src=11, dst=7, src_offset=0, dst_offset=0, size=4))
        a_new, b_new = self.tokens(15), self.tokens(1)
        out_a, out_b = eng.run(
            Forward(
                [
                    item([4, 11, 3], 35, a_new, range(20, 35), output_indices=[14]),
                    item([4, 7], 21, b_new, [20], output_indices=[0]),
                ]
            )
        )
        self.assertSameDistribution(out_a[0], hf_probs(self.ref, prefix + a_new)[-1], self.vocab)
        self.assertSameDistribution(out_b[0], hf_probs(self.ref, prefix + b_new)[-1], self.vocab)

    def test_masked_tokens_equal_removed_tokens(self):
        """Tokens 5 and 6 hidden from every later token (BRLE) = a sequence without them, same positions."""
        eng = engine(self.loaded)
        toks = self.tokens(24)
        masks = [[i + 1] for i in range(7)] + [[5, 2, i + 1 - 7] for i in range(7, 24)]
        [out] = eng.run(
            Forward([item([8, 1], 24, toks, range(24), masks=masks, output_indices=[23])])
        )
        kept = [t for i, t in enumerate(toks) if i not in (5, 6)]
        kept_pos = [i for i in range(24) if i not in (5, 6)]
        self.assertSameDistribution(out[0], hf_probs(self.ref, kept, kept_pos)[-1], self.vocab)
        # a decode step keeps the mask (the batched decode path)
        new = self.tokens(1)
        [out] = eng.run(
            Forward([item([8, 1], 25, new, [24], masks=[[5, 2, 18]], output_indices=[0])])
        )
        ref = hf_probs(self.ref, kept + new, kept_pos + [24])[-1]
        self.assertSameDistribution(out[0], ref, self.vocab)

    def test_tree_mask_branches_in_one_pass(self):
        """Two 2-token branches at the same positions, each blind to the other."""
        eng = engine(self.loaded)
        ctx, a, b = self.tokens(10), self.tokens(2), self.tokens(2)
        eng.run(Forward([item([6], 10, ctx, range(10))]))
        masks = [[11], [12], [10, 2, 1], [10, 2, 2]]
        [out] = eng.run(
            Forward(
                [item([6], 14, a + b, [10, 11, 10, 11], masks=masks, output_indices=[0, 1, 2, 3])]
            )
        )
        ref_a, ref_b = hf_probs(self.ref, ctx + a), hf_probs(self.ref, ctx + b)
        for got, want in zip(out, [ref_a[10], ref_a[11], ref_b[10], ref_b[11]], strict=True):
            self.assertSameDistribution(got, want, self.vocab)

    def test_position_gaps(self):
        eng = engine(self.loaded)
        toks = self.tokens(20)
        positions = list(range(10)) + list(range(40, 50))
        [out] = eng.run(Forward([item([0, 1], 20, toks, positions, output_indices=[9, 19])]))
        ref = hf_probs(self.ref, toks, positions)
        self.assertSameDistribution(out[0], ref[9], self.vocab)
        self.assertSameDistribution(out[1], ref[19], self.vocab)

    def test_dropped_middle_page(self):
        """Freeing a page from the middle: attention over the remaining pages = HF without those tokens.

        The third page's tokens are kept blind to the second page, so after dropping
        it the cache holds exactly what HF computes without those tokens.
        """
        eng = engine(self.loaded)
        toks = self.tokens(48)
        masks = [[i + 1] for i in range(32)] + [[16, 16, i + 1 - 32] for i in range(32, 48)]
        eng.run(Forward([item([3, 4, 5], 48, toks, range(48), masks=masks)]))
        new = self.tokens(1)
        [out] = eng.run(Forward([item([3, 5, 9], 33, new, [48], output_indices=[0])]))
        kept = toks[:16] + toks[32:] + new
        ref = hf_probs(self.ref, kept, list(range(16)) + list(range(32, 49)))[-1]
        self.assertSameDistribution(out[0], ref, self.vocab)


class OtherArchitectures(TestCase_):
    def test_llama3_rope_scaling_and_tied_head(self):
        loaded, ref = model(
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        self.assertIsNotNone(loaded.config.rope_scaling)
        self.assertNotIn("lm_head.weight", loaded.weights)
        toks = list(range(3, 200, 7))
        positions = [p * 5 for p in range(len(toks))]  # reach past the original context
        n = len(toks)
        [out] = engine(loaded).run(
            Forward([item([0, 1], n, toks, positions, output_indices=[n - 1])])
        )
        self.assertSameDistribution(
            out[0], hf_probs(ref, toks, positions)[-1], loaded.config.vocab_size
        )

    def test_qwen2_biases(self):
        """Qwen2 = Llama with q/k/v biases: equal to transformers' Qwen2ForCausalLM."""
        folder = self.mktemp()
        os.makedirs(folder)
        reference = write_tiny_model(folder, architecture="qwen2")
        loaded = load_model(folder, dtype="float32")
        self.assertIn("model.layers.0.self_attn.q_proj.bias", loaded.weights)
        eng = engine(loaded)
        toks = [3, 77, 150, 9, 201, 45, 6, 88, 120, 13, 250, 31]
        [out] = eng.run(Forward([item([4], 12, toks, range(12), output_indices=[11])]))
        self.assertSameDistribution(out[0], hf_probs(reference, toks)[-1], loaded.config.vocab_size)
        [out] = eng.run(Forward([item([4], 13, [99], [12], output_indices=[0])]))
        self.assertSameDistribution(
            out[0], hf_probs(reference, toks + [99])[-1], loaded.config.vocab_size
        )

    def test_bfloat16_stays_close_to_float32(self):
        loaded, ref = model()
        toks = list(range(1, 60, 3))
        n = len(toks)
        [out] = engine(loaded, dtype="bfloat16").run(
            Forward([item([0, 1], n, toks, range(n), output_indices=[n - 1])])
        )
        diff = (dense(out[0], loaded.config.vocab_size) - hf_probs(ref, toks)[-1]).abs().max()
        self.assertLess(diff.item(), 0.05)


class EmbeddingPath(TestCase_):
    def setUp(self):
        self.loaded, self.ref = model()
        self.vocab = self.loaded.config.vocab_size

    def test_forward_with_embeds_and_mask_kv(self):
        """embed_text + forward(input/output embeds) + get_distributions; MaskKv hides a slot."""
        eng = engine(self.loaded)
        toks = [7, 99, 13, 250, 31, 2, 77, 5, 140, 61, 9, 200]
        eng.run(EmbedText(slots=list(range(12)), tokens=toks, positions=list(range(12))))
        eng.run(
            Forward(
                [
                    ForwardItem(
                        pages=[2],
                        last_page_len=12,
                        positions=[],
                        input_embeds=list(range(12)),
                        output_embeds=[40, 41],
                    )
                ]
            )
        )
        d40, d41 = eng.run(GetDistributions(slots=[40, 41]))
        ref = hf_probs(self.ref, toks)
        self.assertSameDistribution(d40, ref[10], self.vocab)
        self.assertSameDistribution(d41, ref[11], self.vocab)
        eng.run(MaskKv(page=2, mask=[True] * 11 + [False]))  # hide the last token from the next
        eng.run(EmbedText(slots=[12], tokens=[42], positions=[12]))
        eng.run(
            Forward(
                [
                    ForwardItem(
                        pages=[2],
                        last_page_len=13,
                        positions=[],
                        input_embeds=[12],
                        output_embeds=[50],
                    )
                ]
            )
        )
        [d50] = eng.run(GetDistributions(slots=[50]))
        kept = toks[:11] + [42]
        positions = list(range(11)) + [12]
        self.assertSameDistribution(d50, hf_probs(self.ref, kept, positions)[-1], self.vocab)

    def test_unfilled_slots_are_errors(self):
        eng = engine(self.loaded)
        with self.assertRaisesRegex(PieError, "never filled"):
            eng.run(
                Forward([ForwardItem(pages=[0], last_page_len=1, positions=[], input_embeds=[3])])
            )
        with self.assertRaisesRegex(PieError, "no distribution"):
            eng.run(GetDistributions(slots=[3]))


class Validation(TestCase):
    """Bad jobs fail with a clear PieError and leave the cache untouched."""

    def setUp(self):
        self.loaded, self.ref = model()
        self.eng = engine(self.loaded)

    def assertRejected(self, pattern, **changes):
        good = dict(
            pages=[0], last_page_len=3, positions=[0, 1, 2], tokens=[1, 2, 3], output_indices=[2]
        )
        with self.assertRaisesRegex(PieError, pattern):
            self.eng.run(Forward([ForwardItem(**(good | changes))]))

    def test_bad_items(self):
        self.assertRejected("out of range", pages=[32])
        self.assertRejected("last_page_len", last_page_len=17)
        self.assertRejected("do not fit", last_page_len=2)
        self.assertRejected("positions", positions=[0, 1])
        self.assertRejected("token id", tokens=[1, 2, 300])
        self.assertRejected("position out of range", positions=[0, 1, -1])
        self.assertRejected("masks for", masks=[[1]])
        self.assertRejected("covers 2 slots", masks=[[1], [2], [2]])
        self.assertRejected("attends to no slot", masks=[[1], [2], [0, 3]])
        self.assertRejected("output index", output_indices=[3])
        self.assertRejected("no new tokens", tokens=[], positions=[])
        self.assertRejected("either tokens or input_embeds", input_embeds=[0])
        with self.assertRaisesRegex(PieError, "does not fit"):
            self.eng.run(CopyKv(src=0, dst=1, src_offset=10, dst_offset=0, size=7))
        with self.assertRaisesRegex(PieError, "out of range"):
            self.eng.run(MaskKv(page=99, mask=[True]))

    def test_failed_job_leaves_the_cache_alone(self):
        toks = [5, 6, 7]
        self.eng.run(Forward([item([0], 3, toks, range(3))]))
        before = self.eng.cache.k.clone()
        self.assertRejected(
            "token id", pages=[0, 1], last_page_len=1, tokens=[1, 300], positions=[3, 4]
        )
        self.assertTrue(torch.equal(before, self.eng.cache.k))


class OnCuda(TestCase_):
    """The same checks on a GPU, when there is one (CI has none: skipped there)."""

    def setUp(self):
        if not torch.cuda.is_available():
            raise SkipTest("no CUDA device")
        self.loaded, self.ref = model()
        self.vocab = self.loaded.config.vocab_size

    def test_prefill_and_batched_decode_on_cuda(self):
        eng = engine(self.loaded, device="cuda")
        self.assertEqual(eng.cache.k.device.type, "cuda")
        a, b = list(range(40, 61)), list(range(100, 105))
        eng.run(Forward([item([3, 9], 21, a, range(21)), item([5], 5, b, range(5))]))
        a.append(7)
        out_a, out_b = eng.run(
            Forward(
                [
                    item([3, 9], 22, [7], [21], output_indices=[0]),
                    item([5], 6, [8], [5], masks=[[4, 1, 1]], output_indices=[0]),
                ]
            )
        )
        self.assertSameDistribution(out_a[0], hf_probs(self.ref, a)[-1], self.vocab)
        hidden_last = hf_probs(self.ref, b[:4] + [8], [0, 1, 2, 3, 5])[-1]  # b[4] masked out
        self.assertSameDistribution(out_b[0], hidden_last, self.vocab)
