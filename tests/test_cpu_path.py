"""`dtype auto` on CPU: the path chosen from (faked) CPU flags, the head, threads, reporting."""

from __future__ import annotations

import os
from unittest import mock

import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from twisted.trial.unittest import SkipTest, TestCase

from pie.engine import cpu_kernels, cpu_path
from pie.engine.cpu_path import CpuPath, choose_cpu_path
from pie.engine.engine import create_engine
from pie.engine.quant import (
    Int4OrDenseLinear,
    Int8Groups,
    Q4_1Weight,
    RescoredHead,
    int4_kernel_name,
    parse_q8_0,
)
from tests.model_fixtures import tiny_model

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512 | {"amx_tile", "amx_bf16"}


class ChoiceTests(TestCase):
    def test_quantized_weights_run_int4_in_an_fp32_model_on_every_x86_cpu(self):
        for flags in (AVX2, AVX512, AVX512_BF16, AMX):
            path = choose_cpu_path(flags, quantized=True, int4_bf16_works=True)
            self.assertEqual((path.dtype, path.weight_kernel), (torch.float32, "int4"))

    def test_pies_fp32_kernels_take_the_int4_layers_where_they_build(self):
        for flags in (AVX2, AVX512, AVX512_BF16, AMX):
            for torch_int4 in (True, False):
                path = choose_cpu_path(flags, True, torch_int4, fp32_kernels=True)
                self.assertEqual((path.dtype, path.weight_kernel), (torch.float32, "int4-fp32"))
        self.assertEqual(choose_cpu_path(AVX2, False, True, True).weight_kernel, "dense")

    def test_onednn_capped_at_avx2_hides_the_avx512_and_amx_flags(self):
        cpuinfo = "processor: 0\nflags\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16\n"
        with mock.patch("builtins.open", mock.mock_open(read_data=cpuinfo)):
            with mock.patch.dict(os.environ, {"ONEDNN_MAX_CPU_ISA": ""}):
                self.assertIn("avx512_bf16", cpu_path.cpu_flags())
            with mock.patch.dict(os.environ, {"ONEDNN_MAX_CPU_ISA": "avx2"}):
                flags = cpu_path.cpu_flags()
        self.assertEqual(flags, {"fpu", "avx2", "fma"})
        self.assertEqual(choose_cpu_path(flags, True, True).dense_dtype, torch.float32)

    def test_many_row_gemms_in_bf16_only_where_the_cpu_has_it(self):
        for flags, dense in (
            (AVX2, torch.float32),
            (AVX512, torch.float32),
            (AVX512_BF16, torch.bfloat16),
            (AMX, torch.bfloat16),
        ):
            self.assertEqual(choose_cpu_path(flags, True, True).dense_dtype, dense)

    def test_without_the_kernel_or_quantized_weights_dense_in_the_native_dtype(self):
        self.assertEqual(choose_cpu_path(AVX2, True, False), CpuPath(*[torch.float32] * 2, "dense"))
        self.assertEqual(
            choose_cpu_path(AVX2, False, True), CpuPath(torch.float32, torch.float32, "dense")
        )
        self.assertEqual(
            choose_cpu_path(AVX512_BF16, False, False),
            CpuPath(torch.bfloat16, torch.bfloat16, "dense"),
        )

    def test_the_kernel_probe_passes_on_this_machine(self):
        """The real probe (x86 CI machines have AVX2 at least)."""
        self.assertTrue(cpu_path.int4_bf16_works())

    def test_threads_follow_the_affinity_mask(self):
        with mock.patch.object(os, "sched_getaffinity", return_value={0, 3, 5}):
            self.assertEqual(cpu_path.usable_cores(), 3)


class EngineTests(TestCase):
    """create_engine(dtype auto) on a tiny Q4_1 model, with the CPU's flags faked."""

    def setUp(self):
        self.loaded, _ = tiny_model(
            self.mktemp(),
            hidden_size=64,
            intermediate_size=128,
            vocab_size=320,
            tie_word_embeddings=True,
        )
        # as from a GGUF file: Q4_1 blocks, and the dense weights their dequantization
        weights = self.loaded.weights
        for name in [n for n in weights if n.endswith("proj.weight")]:
            self.loaded.quantized[name] = Q4_1Weight.from_dense(weights[name].numpy())
            weights[name] = torch.from_numpy(self.loaded.quantized[name].dequantize())

    def engine(self, flags: frozenset[str]):
        with mock.patch.object(cpu_path, "cpu_flags", return_value=flags):
            with mock.patch("pie.engine.loaders.cpu_flags", return_value=flags):
                return create_engine(self.loaded, device="cpu", dtype="auto", num_pages=8)

    def test_avx2_runs_int4_and_fp32_prefill_gemms(self):
        engine = self.engine(AVX2)
        kernel = int4_kernel_name()  # "int4-fp32" where pie's kernels build
        self.assertEqual(
            engine.info.compute,
            {
                "dtype": "float32",
                "weight_kernel": kernel,
                "head": kernel,
                "dense_dtype": "float32",
                "decode_step": "fused" if cpu_kernels.available() else "layers",
                "threads": str(cpu_path.usable_cores()),
            },
        )
        self.assertIs(engine.model.head.dense.weight, engine.model.embed)
        self.assertEqual(engine.model.embed.dtype, torch.float32)
        self.assertEqual(engine.model.layers[0].qkv.dense.weight.dtype, torch.float32)

    def test_without_pies_kernels_torchs_int4_runs_and_is_reported(self):
        with mock.patch.object(cpu_kernels, "available", return_value=False):
            engine = self.engine(AVX2)
        compute = engine.info.compute
        self.assertEqual((compute["weight_kernel"], compute["head"]), ("int4", "int4"))
        self.assertIsNone(engine.model.layers[0].qkv.int4.fp32)

    def test_with_pies_kernels_few_rows_are_the_exact_float32_product(self):
        if not cpu_kernels.available():
            raise SkipTest("no compiled kernels here")
        with mock.patch.dict(os.environ, {"PIE_CPU_KERNELS": "fp32"}):
            engine = self.engine(AVX2)
        self.assertEqual(engine.info.compute["weight_kernel"], "int4-fp32")
        name = "model.layers.0.mlp.down_proj.weight"
        x = torch.randn(3, self.loaded.weights[name].shape[1])
        want = x @ self.loaded.weights[name].T
        torch.testing.assert_close(engine.model.layers[0].down(x), want, rtol=1e-5, atol=1e-5)

    def test_by_default_vnni_cpus_run_int4_x8_and_report_it(self):
        if not cpu_kernels.available() or not cpu_kernels.library().pie_int4_x8():
            raise SkipTest("no x8 kernel here (no AVX2)")
        engine = self.engine(AVX2)
        self.assertEqual(engine.info.compute["weight_kernel"], "int4-x8")
        down = engine.model.layers[0].down.int4.fp32
        self.assertTrue(down.x8)
        name = "model.layers.0.mlp.down_proj.weight"
        x = torch.randn(3, self.loaded.weights[name].shape[1])
        torch.testing.assert_close(
            down.matmul(x), x @ self.loaded.weights[name].T, rtol=1e-3, atol=1e-3
        )

    def test_native_bf16_keeps_bf16_dense_copies(self):
        engine = self.engine(AVX512_BF16)
        self.assertEqual(engine.info.compute["dense_dtype"], "bfloat16")
        self.assertEqual(engine.model.layers[0].qkv.dense.weight.dtype, torch.bfloat16)
        x = torch.randn(Int4OrDenseLinear.MAX_INT4_ROWS + 1, 64)
        self.assertEqual(engine.model.layers[0].qkv(x).dtype, torch.float32)

    def test_bf16_many_row_head_rescores_its_top_logits_exactly(self):
        """bf16 logits flip near-ties: the top ones of the bf16 head come from the exact weight."""
        engine = self.engine(AVX512_BF16)
        head = engine.model.head.dense
        self.assertIsInstance(head, RescoredHead)
        self.assertEqual(head.fast.weight.dtype, torch.bfloat16)
        x = torch.randn(Int4OrDenseLinear.MAX_INT4_ROWS + 1, self.loaded.config.hidden_size)
        want = x @ self.loaded.weights["model.embed_tokens.weight"].T
        got = engine.model.head(x)
        top = got.topk(head.k // 2, dim=-1).indices  # well inside the rescored set
        torch.testing.assert_close(got.gather(1, top), want.gather(1, top), rtol=1e-5, atol=1e-5)
        rounded = x.bfloat16().float() @ head.fast.weight.float().T
        self.assertGreater((rounded.gather(1, top) - want.gather(1, top)).abs().max(), 1e-4)

    def test_memory_counts_each_storage_once_and_the_dense_copies_apart(self):
        def dense_layer_bytes(engine) -> int:
            linears = [(y.qkv, y.o, y.gate_up, y.down) for y in engine.model.layers]
            return sum(x.dense.weight.nbytes for four in linears for x in four)

        avx2, native = self.engine(AVX2), self.engine(AVX512_BF16)
        # AVX2: the head's dense GEMM runs on the exact (tied) weight itself, no copy
        self.assertEqual(avx2.info.memory["dense_copies"], dense_layer_bytes(avx2))
        head_copy = native.model.head.dense.fast.weight.nbytes
        self.assertEqual(native.info.memory["dense_copies"], dense_layer_bytes(native) + head_copy)
        rest = [e.info.memory["weights"] - e.info.memory["dense_copies"] for e in (avx2, native)]
        self.assertEqual(rest[0], rest[1], "int4, embedding and norms are the same on both")
        self.assertGreater(rest[0], native.model.embed.nbytes, "the tied embedding counts once")
        self.assertLess(rest[0], 2 * native.model.embed.nbytes)
        self.assertEqual(native.info.memory["kv_pool"], native.cache.bytes)

    def test_a_q8_0_embedding_is_kept_as_q8_0_where_a_dense_head_copy_exists(self):
        """As from a GGUF file whose tied embedding is Q8_0 (SmolLM2's): the lookup and the
        head's rescored logits read its rows, to the bit what the float32 weight gives."""
        name = "model.embed_tokens.weight"
        raw = quantize(self.loaded.weights[name].numpy(), GGMLQuantizationType.Q8_0)
        dense = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0))
        self.loaded.weights[name] = dense
        float32 = self.engine(AVX512_BF16)
        self.loaded.rows[name] = parse_q8_0(raw, *dense.shape)
        by_rows, avx2 = self.engine(AVX512_BF16), self.engine(AVX2)
        self.assertIsInstance(by_rows.model.embed, Int8Groups)
        self.assertIsInstance(avx2.model.embed, torch.Tensor, "its dense head needs all of it")
        tokens = torch.tensor([[1, 5], [7, 319]])
        self.assertTrue(torch.equal(by_rows.model.embed[tokens], dense[tokens]))
        self.assertTrue(torch.equal(by_rows.model.embed_tokens(tokens[0]), dense[tokens[0]]))
        x = torch.randn(3, self.loaded.config.hidden_size)
        self.assertTrue(torch.equal(by_rows.model.head(x), float32.model.head(x)))
        saved = float32.info.memory["weights"] - by_rows.info.memory["weights"]
        self.assertEqual(saved, dense.nbytes - dense.numel() - dense.numel() // 32 * 4)

    def test_int4_head_rescores_its_top_logits_and_the_embedding_is_exact(self):
        engine = self.engine(AVX2)
        head = engine.model.head
        self.assertIsInstance(head, Int4OrDenseLinear)
        x = torch.randn(3, self.loaded.config.hidden_size)
        want = x @ self.loaded.weights["model.embed_tokens.weight"].T
        got = head(x)
        self.assertLess((got - want).norm() / want.norm(), 0.1)  # int4: close
        top = want.topk(8, dim=-1).indices  # inside the rescored 64
        torch.testing.assert_close(got.gather(1, top), want.gather(1, top))  # top: exact
        self.assertTrue(torch.equal(want.argmax(-1), got.argmax(-1)))
        tokens = torch.tensor([1, 5, 7])
        self.assertTrue(
            torch.equal(
                engine.model.embed_tokens(tokens),
                self.loaded.weights["model.embed_tokens.weight"][tokens],
            )
        )

    def test_many_rows_on_avx2_agree_with_few_rows(self):
        """The fp32 dense GEMM (many rows) and the int4 kernel (few) give close outputs."""
        engine = self.engine(AVX2)
        layer = engine.model.layers[0].gate_up
        x = torch.randn(Int4OrDenseLinear.MAX_INT4_ROWS + 2, 64)
        many = layer(x)
        few = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
        self.assertEqual(few.dtype, torch.float32)
        self.assertLess((many - few).abs().max().item(), 0.05 * many.abs().max().item() + 0.02)
