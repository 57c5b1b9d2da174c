"""Model loaders: plugins, safetensors folders, GGUF files written here with the `gguf` package
(Q/K permuted as llama.cpp's converter does, MLP weights in Q4_1) (issue 3, point 1)."""

from __future__ import annotations

import os
import tempfile
from unittest import mock

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from twisted.trial.unittest import TestCase

from pie.engine import cpu_kernels
from pie.engine.batch import Forward, ForwardItem
from pie.engine.engine import create_engine
from pie.engine.hf_reference import hf_model
from pie.engine.loaders import load_model
from pie.engine.quant import (
    DenseLinear,
    Int4Linear,
    Int4OrDenseLinear,
    Int8GroupLinear,
    Int8Groups,
    parse_q4_k,
    parse_q5_0,
    parse_q5_k,
    parse_q6_k,
    parse_q8_0,
)
from pie.interfaces import IModelLoader, PieError
from pie.runtime.chat_template import render_for
from pie.service.servicetypes import model_loaders
from tests.model_fixtures import (
    dense,
    hf_probs,
    random_k_quant,
    random_q4_k,
    write_gguf,
    write_tiny_model,
)

_FOLDER = tempfile.TemporaryDirectory()
write_tiny_model(_FOLDER.name, tie_word_embeddings=True, seed=3)


class Plugins(TestCase):
    def test_builtin_loaders_are_plugins(self):
        found = model_loaders()
        self.assertLessEqual({"gguf", "safetensors"}, set(found))
        for loader in found.values():
            self.assertTrue(IModelLoader.providedBy(loader))
        self.assertTrue(found["safetensors"].can_load(_FOLDER.name))
        self.assertFalse(found["gguf"].can_load(_FOLDER.name))

    def test_unknown_paths(self):
        with self.assertRaisesRegex(PieError, "does not exist"):
            load_model(os.path.join(_FOLDER.name, "missing"))
        junk = self.mktemp()
        with open(junk, "w") as f:
            f.write("not a model")
        with self.assertRaisesRegex(PieError, "no model loader"):
            load_model(junk)


class GGUFLoading(TestCase):
    def setUp(self):
        self.source = load_model(_FOLDER.name, dtype="float32")
        self.path = os.path.join(self.mktemp() + ".gguf")
        write_gguf(self.path, self.source)
        self.loaded = load_model(self.path, dtype="float32")

    def test_weights_come_back_in_hugging_face_order(self):
        for name in (
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.embed_tokens.weight",
            "model.norm.weight",
        ):
            self.assertTrue(torch.equal(self.loaded.weights[name], self.source.weights[name]), name)
        self.assertTrue(self.loaded.config.tie_word_embeddings)
        self.assertNotIn("lm_head.weight", self.loaded.weights)
        gate = "model.layers.0.mlp.gate_proj.weight"
        self.assertLess(
            (self.loaded.weights[gate] - self.source.weights[gate]).abs().max().item(), 0.2
        )

    def test_q4_1_blocks_are_lossless_for_the_int4_kernel(self):
        name = "model.layers.1.mlp.down_proj.weight"
        q4 = self.loaded.quantized[name]
        dense_w = self.loaded.weights[name]
        self.assertTrue(np.array_equal(q4.dequantize(), dense_w.numpy()))
        x = torch.randn(5, dense_w.shape[1])
        with mock.patch.dict(os.environ, {"PIE_CPU_KERNELS": "fp32"}):  # the exact product
            got = Int4Linear(q4, torch.float32)(x)
        self.assertLess((got - x @ dense_w.T).abs().max().item(), 1e-4)

    def test_q4_k_blocks_are_lossless_for_the_int4_kernel(self):
        """Q4_K (Gemma 3 270M's format) becomes the same Q4_1 form, equal to gguf's own
        dequantization to the last bit, and the int4 engine runs it."""
        raw = random_q4_k(96, 512, seed=1)
        ours = parse_q4_k(raw, 96, 512).dequantize()
        self.assertTrue(np.array_equal(ours, dequantize(raw, Q.Q4_K).reshape(96, 512)))
        folder = self.mktemp()
        write_tiny_model(
            folder, hidden_size=256, intermediate_size=256, tie_word_embeddings=True, seed=4
        )  # rows of 256: K-quant super-blocks
        path = self.mktemp() + ".gguf"
        write_gguf(path, load_model(folder, dtype="float32"), mlp=Q.Q4_K)
        loaded = load_model(path, dtype="float32")
        name = "model.layers.0.mlp.up_proj.weight"
        self.assertTrue(
            np.array_equal(loaded.quantized[name].dequantize(), loaded.weights[name].numpy())
        )
        engine = create_engine(loaded, device="cpu", dtype="bfloat16", num_pages=4, dist_size=8)
        self.assertTrue(engine.model.int4)

    def test_int8_group_formats_equal_gguf_dequantization(self):
        """Q8_0, Q5_0 (from weights), Q5_K, Q6_K (random blocks) as int8 groups: the same
        float32 bits as gguf's own dequantization, with the group size and mins of the format."""
        rng = np.random.default_rng(3)
        weight = rng.normal(0, 0.05, size=(48, 512)).astype(np.float32)
        cases = [
            (Q.Q8_0, parse_q8_0, quantize(weight, Q.Q8_0), 32, False),
            (Q.Q5_0, parse_q5_0, quantize(weight, Q.Q5_0), 32, False),
            (Q.Q5_K, parse_q5_k, random_k_quant(Q.Q5_K, 48, 512, seed=5), 32, True),
            (Q.Q6_K, parse_q6_k, random_k_quant(Q.Q6_K, 48, 512, seed=6), 16, False),
        ]
        for qtype, parse, raw, group, has_mins in cases:
            groups = parse(raw, 48, 512)
            want = dequantize(raw, qtype).reshape(48, 512)
            got = groups.dequantize().numpy()
            self.assertTrue(np.array_equal(got.view(np.uint32), want.view(np.uint32)), qtype)
            self.assertEqual((groups.group, groups.mins is not None), (group, has_mins), qtype)
            self.assertEqual(groups.q.dtype, torch.int8)
            rows = torch.tensor([[3, 0], [47, 3]])
            self.assertTrue(torch.equal(groups[rows], torch.from_numpy(want)[rows]), qtype)

    def test_fused_parts_of_mixed_formats_are_one_exact_int8_group_weight(self):
        """Q4_K (as int8 groups, exactly), Q6_K (groups of 16) and Q8_0 stacked: groups of 16,
        zero mins for the parts without; the product, by the reference kernel, is x @ W^T."""
        q4k = random_q4_k(32, 256, seed=7)
        q6k = random_k_quant(Q.Q6_K, 16, 256, seed=8)
        q8 = quantize(np.random.default_rng(9).normal(size=(16, 256)).astype(np.float32), Q.Q8_0)
        fused = Int8Groups.concat(
            [
                Int8Groups.from_q4_1(parse_q4_k(q4k, 32, 256)),
                parse_q6_k(q6k, 16, 256),
                parse_q8_0(q8, 16, 256),
            ]
        )
        want = np.concatenate(
            [
                dequantize(q4k, Q.Q4_K).reshape(32, 256),
                dequantize(q6k, Q.Q6_K).reshape(16, 256),
                dequantize(q8, Q.Q8_0).reshape(16, 256),
            ]
        )
        self.assertEqual(fused.group, 16)
        self.assertTrue(np.array_equal(fused.dequantize().numpy(), want))
        x = torch.randn(3, 256)
        got = Int8GroupLinear(fused)(x)
        self.assertLess((got - x @ torch.from_numpy(want).T).abs().max().item(), 1e-4)

    def test_int8_group_linears_run_where_the_kernel_is_available(self):
        """A GGUF whose fused gate/up mixes Q4_K and Q6_K and whose down is Q5_0: with
        cpu_kernels available they run as int8 groups for few rows (the fp32 dense engine's
        distribution within 1e-5), the dense copy for many; without it, dense as before."""
        folder = self.mktemp()
        write_tiny_model(
            folder,
            hidden_size=256,
            intermediate_size=256,
            tie_word_embeddings=True,
            seed=4,
            head_dim=64,  # what a llama GGUF without key_length implies
        )
        path = self.mktemp() + ".gguf"
        mlp = {"mlp.gate_proj": Q.Q4_K, "mlp.up_proj": Q.Q6_K, "mlp.down_proj": Q.Q5_0}
        write_gguf(path, load_model(folder, dtype="float32"), mlp=mlp)
        loaded = load_model(path, dtype="float32")
        self.assertEqual(
            sorted(loaded.rows), sorted(n for n in loaded.weights if "up_" in n or "down" in n)
        )

        def engine(available: bool):
            with mock.patch.object(cpu_kernels, "available", return_value=available):
                return create_engine(
                    loaded,
                    device="cpu",
                    dtype="float32",
                    use_int4=True,
                    num_pages=4,
                    dist_size=loaded.config.vocab_size,
                )

        kernels, without = engine(True), engine(False)
        layer = kernels.model.layers[0]
        self.assertIsInstance(layer.gate_up, Int4OrDenseLinear)
        self.assertIsInstance(layer.gate_up.int4, Int8GroupLinear)
        self.assertIsInstance(layer.down.int4, Int8GroupLinear)
        self.assertIsInstance(without.model.layers[0].gate_up, DenseLinear)
        toks = [5, 17, 230, 99]
        item = ForwardItem(
            pages=[0], last_page_len=4, positions=[0, 1, 2, 3], tokens=toks, output_indices=[3]
        )
        vocab = loaded.config.vocab_size
        [[got]], [[want]] = kernels.run(Forward([item])), without.run(Forward([item]))
        self.assertLess((dense(got, vocab) - dense(want, vocab)).abs().max().item(), 1e-5)
        many = torch.randn(Int4OrDenseLinear.MAX_INT4_ROWS + 1, 256)
        with mock.patch.object(Int8GroupLinear, "__call__", side_effect=AssertionError):
            layer.down(many)  # many rows: the dense copy

    def test_tokenizer_from_metadata(self):
        ours, theirs = self.loaded.tokenizer, self.source.tokenizer
        text = "the other <|im_start|>thing<|im_end|> 42 ünïcode"
        self.assertEqual(ours.tokenize(text), theirs.tokenize(text))
        self.assertEqual(ours.detokenize(ours.tokenize(text)), text)
        self.assertIn(theirs.tokenize("<|im_end|>")[0], ours.eos_token_ids)
        self.assertEqual(
            render_for(ours, [{"role": "user", "content": "hi"}], add_generation_prompt=True),
            "<|im_start|>hi<|im_end|>",
        )

    def test_forward_equals_hugging_face_on_the_gguf_weights(self):
        reference = hf_model(self.loaded)
        toks = [5, 17, 230, 99, 4, 61, 7, 250, 18, 33]
        engine = create_engine(
            self.loaded,
            device="cpu",
            dtype="float32",
            num_pages=4,
            dist_size=self.loaded.config.vocab_size,
        )
        [out] = engine.run(
            Forward(
                [
                    ForwardItem(
                        pages=[2],
                        last_page_len=10,
                        positions=list(range(10)),
                        tokens=toks,
                        output_indices=[9],
                    )
                ]
            )
        )
        diff = (
            (dense(out[0], self.loaded.config.vocab_size) - hf_probs(reference, toks)[-1])
            .abs()
            .max()
        )
        self.assertLess(diff.item(), 2e-5)

    def test_int4_engine_tracks_the_dense_one(self):
        engine = create_engine(
            self.loaded, device="cpu", dtype="bfloat16", num_pages=4, dist_size=8
        )
        self.assertTrue(engine.model.int4)
        toks = [5, 17, 230, 99]
        [out] = engine.run(
            Forward(
                [
                    ForwardItem(
                        pages=[0],
                        last_page_len=4,
                        positions=[0, 1, 2, 3],
                        tokens=toks,
                        output_indices=[3],
                    )
                ]
            )
        )
        reference = hf_probs(hf_model(self.loaded), toks)[-1]
        self.assertLess(abs(out[0][1][0] - reference[out[0][0][0]].item()), 0.05)
