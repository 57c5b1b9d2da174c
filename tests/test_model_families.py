"""Model families beyond Llama equal their transformers classes on tiny random weights (issue 11).

Gemma 2 (Gemma 3's layout without q/k norms, with soft-capped attention and head logits, also from GGUF), Gemma 3 (sliding-window layers interleaved with global ones, q/k norms,
sandwich norms, (1 + w) RMSNorm weights, scaled embeddings, GeGLU, separate
local RoPE base, tied head), Qwen3 (q/k norms) and Mistral (sliding window on
every layer), each saved by transformers as safetensors and loaded through
pie's loader. Contexts are longer than the window so the window is exercised
on the prefill and the decode paths, and combined with inferlets' BRLE masks.
"""

from __future__ import annotations

import random
import tempfile

import numpy as np
import torch
from twisted.trial.unittest import TestCase

from pie.engine.batch import Forward, ForwardItem
from pie.engine.engine import create_engine
from pie.engine.hf_reference import hf_model
from pie.engine.loaders import load_model
from pie.interfaces import PieError
from tests.model_fixtures import dense, hf_probs, tiny_model, write_gguf

PS = 16
ATOL = 2e-5
WINDOW = 8
GEMMA3 = dict(
    architecture="gemma3_text",
    num_hidden_layers=3,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    sliding_window=WINDOW,
    query_pre_attn_scalar=24,
    tie_word_embeddings=True,
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
)
_MODELS: dict = {}


def model(**overrides):
    key = repr(sorted(overrides.items()))
    if key not in _MODELS:
        folder = tempfile.TemporaryDirectory()
        _MODELS[key] = (*tiny_model(folder.name, **overrides), folder)
    return _MODELS[key][:2]


def item(pages, total, tokens, positions, **kw) -> ForwardItem:
    return ForwardItem(
        pages=list(pages),
        last_page_len=total - PS * (len(pages) - 1),
        positions=list(positions),
        tokens=list(tokens),
        **kw,
    )


class Family(TestCase):
    overrides: dict = {}

    def setUp(self):
        self.loaded, self.ref = model(**self.overrides)
        self.vocab = self.loaded.config.vocab_size
        self.rng = random.Random(2)
        self.engine = create_engine(
            self.loaded,
            device="cpu",
            dtype="float32",
            num_pages=32,
            num_embeds=64,
            page_size=PS,
            dist_size=self.vocab,
        )

    def tokens(self, n):
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def assertSameDistribution(self, ours, reference_probs):
        diff = (dense(ours, self.vocab) - reference_probs).abs().max().item()
        self.assertLess(diff, ATOL, f"max |Δp| = {diff}")

    def check_prefill_on_shuffled_pages(self):
        toks = self.tokens(37)
        [out] = self.engine.run(
            Forward([item([9, 2, 14], 37, toks, range(37), output_indices=list(range(37)))])
        )
        ref = hf_probs(self.ref, toks)
        for i in range(37):
            self.assertSameDistribution(out[i], ref[i])

    def check_chunked_prefill_then_batched_decode(self):
        a, b = self.tokens(20), self.tokens(5)
        pages_a, pages_b = [5, 30], [17]
        self.engine.run(Forward([item(pages_a[:1], 7, a[:7], range(7))]))
        out_a, out_b = self.engine.run(
            Forward(
                [
                    item(pages_a, 20, a[7:], range(7, 20), output_indices=[12]),
                    item(pages_b, 5, b, range(5), output_indices=[4]),
                ]
            )
        )
        self.assertSameDistribution(out_a[0], hf_probs(self.ref, a)[-1])
        for _ in range(14):  # B grows past the window, A crosses into a third page
            a.append(self.rng.randrange(self.vocab))
            b.append(self.rng.randrange(self.vocab))
            if len(a) > PS * len(pages_a):
                pages_a.append(11)
            if len(b) > PS * len(pages_b):
                pages_b.append(0)
            out_a, out_b = self.engine.run(
                Forward(
                    [
                        item(pages_a, len(a), a[-1:], [len(a) - 1], output_indices=[0]),
                        item(pages_b, len(b), b[-1:], [len(b) - 1], output_indices=[0]),
                    ]
                )
            )
            self.assertSameDistribution(out_a[0], hf_probs(self.ref, a)[-1])
            self.assertSameDistribution(out_b[0], hf_probs(self.ref, b)[-1])


class Gemma3(Family):
    overrides = GEMMA3

    def test_config_from_transformers(self):
        c = self.loaded.config
        self.assertEqual(
            (c.model_type, c.sliding_window, c.rope_theta, c.rope_local_theta),
            ("gemma3_text", WINDOW, 100000.0, 1000.0),
        )
        self.assertEqual([c.is_sliding(i) for i in range(3)], [True, False, True])
        self.assertEqual(
            (c.norm_offset, c.embed_scale, c.hidden_act), (1.0, 8.0, "gelu_pytorch_tanh")
        )

    def test_prefill_longer_than_the_window_on_shuffled_pages(self):
        self.check_prefill_on_shuffled_pages()

    def test_chunked_prefill_then_batched_decode_past_the_window(self):
        self.check_chunked_prefill_then_batched_decode()

    def test_brle_mask_intersects_the_window(self):
        """Tokens 5, 6 hidden from later tokens: each local layer sees mask ∩ window.

        The reference is transformers given those two masks explicitly (one per layer type).
        """
        n = 24
        toks = self.tokens(n)
        masks = [[i + 1] for i in range(7)] + [[5, 2, i + 1 - 7] for i in range(7, n)]
        [out] = self.engine.run(
            Forward([item([8, 1], n, toks, range(n), masks=masks, output_indices=list(range(n)))])
        )
        full = np.tril(np.ones((n, n), dtype=bool))
        full[7:, 5:7] = False
        cols, rows = np.arange(n)[None, :], np.arange(n)[:, None]
        local = full & (cols > rows - WINDOW)
        self.assertFalse((local == full).all())  # the window does hide something here
        mapping = {
            "full_attention": self.reference_mask(full),
            "sliding_attention": self.reference_mask(local),
        }
        with torch.no_grad():
            logits = self.ref(torch.tensor([toks]), attention_mask=mapping).logits[0]
        ref = torch.softmax(logits, dim=-1)
        for i in range(n):
            self.assertSameDistribution(out[i], ref[i])
        # a decode step with its mask: the batched decode path windows it too
        new = self.tokens(1)
        [out] = self.engine.run(
            Forward([item([8, 1], n + 1, new, [n], masks=[[5, 2, n - 6]], output_indices=[0])])
        )
        row = np.ones(n + 1, dtype=bool)
        row[5:7] = False
        row_local = row & (np.arange(n + 1) > n - WINDOW)
        grown_full = np.zeros((n + 1, n + 1), dtype=bool)
        grown_full[:n, :n], grown_full[n] = full, row
        grown_local = np.zeros((n + 1, n + 1), dtype=bool)
        grown_local[:n, :n], grown_local[n] = local, row_local
        mapping = {
            "full_attention": self.reference_mask(grown_full),
            "sliding_attention": self.reference_mask(grown_local),
        }
        with torch.no_grad():
            logits = self.ref(torch.tensor([toks + new]), attention_mask=mapping).logits[0]
        self.assertSameDistribution(out[0], torch.softmax(logits[-1], dim=-1))

    def reference_mask(self, allowed: np.ndarray) -> torch.Tensor:
        """A mask as transformers' sdpa attention takes it: bool, True = attend."""
        return torch.from_numpy(allowed)[None, None]

    def test_mask_with_nothing_inside_the_window_is_refused_before_the_cache(self):
        toks = self.tokens(20)
        self.engine.run(Forward([item([3, 4], 20, toks, range(20))]))
        with self.assertRaisesRegex(PieError, "within the sliding window"):
            self.engine.run(Forward([item([3, 4], 21, self.tokens(1), [20], masks=[[3, 18]])]))
        self.assertFalse(self.engine.cache.slot_valid[4, 4])  # the job left no trace
        new = self.tokens(1)
        [out] = self.engine.run(Forward([item([3, 4], 21, new, [20], output_indices=[0])]))
        self.assertSameDistribution(out[0], hf_probs(self.ref, toks + new)[-1])


class Qwen3(Family):
    overrides = dict(architecture="qwen3")

    def test_prefill_on_shuffled_pages(self):
        self.check_prefill_on_shuffled_pages()

    def test_chunked_prefill_then_batched_decode(self):
        self.check_chunked_prefill_then_batched_decode()


class Mistral(Family):
    overrides = dict(architecture="mistral", sliding_window=WINDOW)

    def test_prefill_longer_than_the_window_on_shuffled_pages(self):
        self.check_prefill_on_shuffled_pages()

    def test_chunked_prefill_then_batched_decode_past_the_window(self):
        self.check_chunked_prefill_then_batched_decode()


class RopeScalings(TestCase):
    """linear and YaRN (with its attention factor) equal transformers past the original context."""

    def check(self, rope_scaling: dict):
        loaded, ref = model(rope_scaling=rope_scaling)
        self.assertEqual(loaded.config.rope_scaling["rope_type"], rope_scaling["rope_type"])
        engine = create_engine(
            loaded, device="cpu", dtype="float32", num_pages=8, page_size=PS, dist_size=300
        )
        toks = list(range(3, 200, 7))
        positions = [p * 5 for p in range(len(toks))]  # up to 140, past the original 64
        n = len(toks)
        [out] = engine.run(Forward([item([0, 1], n, toks, positions, output_indices=[n - 1])]))
        diff = (dense(out[0], 300) - hf_probs(ref, toks, positions)[-1]).abs().max().item()
        self.assertLess(diff, ATOL)

    def test_linear(self):
        self.check({"rope_type": "linear", "factor": 4.0})

    def test_yarn(self):
        self.check({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})

    def test_yarn_attention_factor_matters(self):
        """The factor on cos/sin is not 1 here, so the equality above covers it."""
        from pie.engine.llama import rope_attention_factor

        loaded, _ = model(
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        )
        self.assertGreater(rope_attention_factor(loaded.config), 1.1)


PHI3 = dict(architecture="phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2)


class Phi3(Family):
    """Fused qkv_proj and gate_up_proj, sliding window on every layer."""

    overrides = dict(PHI3, sliding_window=WINDOW)

    def test_prefill_longer_than_the_window_on_shuffled_pages(self):
        self.check_prefill_on_shuffled_pages()

    def test_chunked_prefill_then_batched_decode_past_the_window(self):
        self.check_chunked_prefill_then_batched_decode()


class LongRope(TestCase):
    """Phi-3's LongRoPE: short factors within the original context, long ones past it."""

    def test_short_and_long_factors(self):
        rng = random.Random(5)
        scaling = {
            "rope_type": "longrope",
            "short_factor": [round(rng.uniform(1, 2), 3) for _ in range(8)],
            "long_factor": [round(rng.uniform(2, 8), 3) for _ in range(8)],
            "original_max_position_embeddings": 64,
        }
        loaded, ref = model(**PHI3, rope_scaling=scaling, original_max_position_embeddings=64)
        self.assertEqual(loaded.config.rope_scaling["original_max_position_embeddings"], 64)
        engine = create_engine(
            loaded, device="cpu", dtype="float32", num_pages=8, page_size=PS, dist_size=300
        )
        toks = list(range(3, 200, 7))
        n = len(toks)
        for stride in (1, 5):  # largest position 28 (short factors), then 140 (long ones)
            positions = [p * stride for p in range(n)]
            [out] = engine.run(Forward([item([0, 1], n, toks, positions, output_indices=[n - 1])]))
            diff = (dense(out[0], 300) - hf_probs(ref, toks, positions)[-1]).abs().max().item()
            self.assertLess(diff, ATOL, f"stride {stride}")


GEMMA2 = dict(
    architecture="gemma2",
    num_hidden_layers=3,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    sliding_window=WINDOW,
    query_pre_attn_scalar=24,
    attn_logit_softcapping=2.0,  # small, so the cap bends the tiny model's scores
    final_logit_softcapping=3.0,
    tie_word_embeddings=True,
)


class Gemma2(Gemma3):
    """Gemma 2: Gemma 3's sandwich norms and local/global layers, no q/k norms, and
    logits soft-capped in attention and at the head. Its tests are Gemma 3's (windows,
    BRLE masks, shuffled pages) plus the caps."""

    overrides = GEMMA2

    def reference_mask(self, allowed: np.ndarray) -> torch.Tensor:
        """Gemma 2's reference runs eager attention, which adds the mask: 0 / -inf."""
        return torch.zeros(allowed.shape).masked_fill(~torch.from_numpy(allowed), -torch.inf)[
            None, None
        ]

    def test_config_from_transformers(self):
        c = self.loaded.config
        self.assertEqual(
            (c.model_type, c.qk_norm, c.attn_logit_softcapping, c.final_logit_softcapping),
            ("gemma2", False, 2.0, 3.0),
        )
        self.assertEqual([c.is_sliding(i) for i in range(3)], [True, False, True])

    def test_softcap_changes_the_answer(self):
        """The cap is not a no-op on this model: without it the distributions differ."""
        toks = self.tokens(20)
        [out] = self.engine.run(Forward([item([3, 4], 20, toks, range(20), output_indices=[19])]))
        uncapped, _ = model(**{**GEMMA2, "attn_logit_softcapping": None})
        engine = create_engine(
            uncapped,
            device="cpu",
            dtype="float32",
            num_pages=8,
            page_size=PS,
            dist_size=self.vocab,
        )
        [other] = engine.run(Forward([item([3, 4], 20, toks, range(20), output_indices=[19])]))
        diff = (dense(out[0], self.vocab) - dense(other[0], self.vocab)).abs().max().item()
        self.assertGreater(diff, 1e-3)

    def test_gguf_as_llama_cpp_writes_it(self):
        """Gemma 2 from a GGUF (norms stored as 1 + w, caps and window in the metadata,
        query scale from head_dim as llama.cpp has it) equals transformers on its weights."""
        source, _ = model(**{**GEMMA2, "query_pre_attn_scalar": 16})  # head_dim
        path = self.mktemp() + ".gguf"
        write_gguf(path, source, arch="gemma2")
        loaded = load_model(path, dtype="float32")
        c = loaded.config
        self.assertEqual(
            (c.model_type, c.sliding_window, c.attn_logit_softcapping, c.query_pre_attn_scalar),
            ("gemma2", WINDOW, 2.0, 16),
        )
        self.assertEqual([c.is_sliding(i) for i in range(3)], [True, False, True])
        engine = create_engine(
            loaded, device="cpu", dtype="float32", num_pages=8, page_size=PS, dist_size=self.vocab
        )
        toks = self.tokens(20)
        [out] = engine.run(Forward([item([6, 2], 20, toks, range(20), output_indices=[19])]))
        self.assertSameDistribution(out[0], hf_probs(hf_model(loaded), toks)[-1])
