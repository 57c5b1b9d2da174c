"""pie's compiled CPU kernels: equal to the reference forms (float32 activations, or int8
ones for the x8 kernel, whose error against float32 is bounded), the build cached under
$PIE_HOME, and the torch paths kept where they are not available."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import torch
from twisted.trial.unittest import SkipTest, TestCase

from pie.engine import cpu_kernels
from pie.engine.cpu_kernels import (
    Int4Packed,
    Int8Packed,
    int4_group_matmul,
    int4_x8_matmul,
    int8_group_matmul,
    quantize_activations,
)
from pie.engine.quant import Int4Linear, Q4_1Weight, int4_kernel_name

SHAPES = ((1, 32), (7, 96), (33, 608), (130, 1536))  # (N, K): odd N, K a few groups
X8_SHAPES = ((16, 32), (48, 96), (64, 608), (144, 1536))  # 16 | N: the x8 layout


def assert_matches(test: TestCase, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor):
    """Within float32 rounding of the reference: 1e-5 of sum |x_k w_k| (cancellation-proof)."""
    test.assertEqual(got.shape, want.shape)
    err = ((got - want).abs() / scale.clamp_min(1e-30)).max().item()
    test.assertLess(err, 1e-5)


def q4_1(n: int, k: int, g: torch.Generator):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    return q, torch.rand(n, k // 32, generator=g), torch.randn(n, k // 32, generator=g)


class KernelTests(TestCase):
    def setUp(self):
        if not cpu_kernels.available():
            raise SkipTest("no compiled kernels here (no gcc?)")
        self.g = torch.Generator().manual_seed(0)

    def test_int4_equals_the_reference_for_1_to_10_rows(self):
        for n, k in SHAPES:
            q, d, m = q4_1(n, k, self.g)
            packed = Int4Packed.from_q4_1(q, d, m)
            for rows in range(1, 11):
                x = torch.randn(rows, k, generator=self.g)
                scale = int4_group_matmul(x.abs(), q, d, m.abs())
                assert_matches(self, packed.matmul(x), int4_group_matmul(x, q, d, m), scale)

    def x8_or_skip(self) -> None:
        if not cpu_kernels.library().pie_int4_x8():
            raise SkipTest("no x8 kernel here (no AVX2): int4 weights keep the float32 kernel")

    def test_x8_equals_its_reference_for_1_to_10_rows(self):
        self.x8_or_skip()
        for n, k in X8_SHAPES:
            q, d, m = q4_1(n, k, self.g)
            packed = Int4Packed.from_q4_1(q, d, m)
            self.assertTrue(packed.x8)
            for rows in range(1, 11):
                x = torch.randn(rows, k, generator=self.g)
                scale = int4_group_matmul(x.abs(), q, d, m.abs())
                assert_matches(self, packed.matmul(x), int4_x8_matmul(x, q, d, m), scale)

    def test_x8_error_against_float32_is_within_its_rounding_of_the_activations(self):
        """|y_x8 - y_fp32| <= sum_k d q |x - x'|, x' the two-int8 x, <= sum_k d q sx / 256."""
        self.x8_or_skip()
        q, d, m = q4_1(144, 1536, self.g)
        x = torch.randn(8, 1536, generator=self.g) * torch.linspace(0.1, 5, 1536)
        x[:, ::97] *= 40  # outlier channels, as real activations have
        _, _, sx = quantize_activations(x)
        half_step = (sx / 256).repeat_interleave(32, dim=1)  # [8, K]
        w = q.reshape(144, -1, 32).float() * d[:, :, None]
        bound = half_step @ w.reshape(144, -1).T
        err = (Int4Packed.from_q4_1(q, d, m).matmul(x) - int4_group_matmul(x, q, d, m)).abs()
        self.assertTrue(bool((err <= bound * (1 + 1e-4) + 1e-4).all()), (err / bound).max())
        self.assertGreater(err.max().item(), 0, "x8 rounds the activations")

    def test_fp32_setting_or_n_not_a_multiple_of_16_keeps_the_float32_kernel(self):
        q, d, m = q4_1(48, 96, self.g)
        x = torch.randn(3, 96, generator=self.g)
        with mock.patch.dict(os.environ, {"PIE_CPU_KERNELS": "fp32"}):
            packed = Int4Packed.from_q4_1(q, d, m)
        self.assertFalse(packed.x8)
        scale = int4_group_matmul(x.abs(), q, d, m.abs())
        assert_matches(self, packed.matmul(x), int4_group_matmul(x, q, d, m), scale)
        self.assertFalse(Int4Packed.from_q4_1(q[:40], d[:40], m[:40]).x8)

    def test_int8_equals_the_reference_for_groups_of_16_and_32(self):
        for n, k in SHAPES:
            for group in (16, 32):
                q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=self.g)
                s = torch.rand(n, k // group, generator=self.g)
                packed = Int8Packed(q, s)
                for rows in range(1, 11):
                    x = torch.randn(rows, k, generator=self.g)
                    scale = int8_group_matmul(x.abs(), q.abs(), s)
                    assert_matches(self, packed.matmul(x), int8_group_matmul(x, q, s), scale)

    def test_strided_inputs_are_read_right_and_bad_ones_refused(self):
        q, d, m = q4_1(40, 64, self.g)
        packed = Int4Packed.from_q4_1(q, d, m)
        wide = torch.randn(3, 200, generator=self.g)
        rows = wide[:, 10:74]  # row stride 200
        columns = torch.randn(64, 3, generator=self.g).T  # column stride 3: copied
        for x in (rows, columns):
            want = int4_group_matmul(x.contiguous(), q, d, m)
            assert_matches(self, packed.matmul(x), want, int4_group_matmul(x.abs(), q, d, m.abs()))
        self.assertEqual(packed.matmul(torch.empty(0, 64)).shape, (0, 40))
        for bad in (torch.randn(2, 64).bfloat16(), torch.randn(2, 32), torch.randn(64)):
            with self.assertRaises(ValueError):
                packed.matmul(bad)
        with self.assertRaises(ValueError):
            Int8Packed(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 1))  # groups of 64

    def test_threads_split_the_rows_to_the_same_result(self):
        q, d, m = q4_1(257, 576, self.g)
        packed, x = Int4Packed.from_q4_1(q, d, m), torch.randn(2, 576, generator=self.g)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = packed.matmul(x)
            torch.set_num_threads(max(2, before))
            self.assertTrue(torch.equal(packed.matmul(x), one))
        finally:
            torch.set_num_threads(before)

    def test_int4_linear_runs_it_for_float32_and_bfloat16_activations(self):
        w = Q4_1Weight.from_dense(np.random.default_rng(0).standard_normal((48, 96), np.float32))
        layer = Int4Linear(w, torch.bfloat16)
        self.assertEqual(layer.kernel, "int4-fp32")  # pie's kernel; its packing says which
        self.assertEqual(int4_kernel_name(), "int4-x8" if layer.fp32.x8 else "int4-fp32")
        x = torch.randn(3, 96, generator=self.g)
        q, d, m = (torch.from_numpy(a) for a in (w.q, w.d, w.m))
        want = (int4_x8_matmul if layer.fp32.x8 else int4_group_matmul)(x, q, d, m)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
        self.assertEqual(layer(x.bfloat16()).dtype, torch.bfloat16)


class BuildTests(TestCase):
    def setUp(self):
        if cpu_kernels.library_path() is None:
            raise SkipTest("no gcc here")
        home = self.mktemp()
        patcher = mock.patch.dict(os.environ, {"PIE_HOME": home})
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_the_library_is_built_once_under_pie_home_and_reused(self):
        first = cpu_kernels.library_path()
        self.assertTrue(str(first).startswith(os.environ["PIE_HOME"]))
        stamp = first.stat().st_mtime_ns
        with mock.patch("subprocess.run", wraps=cpu_kernels.subprocess.run) as run:
            self.assertEqual(cpu_kernels.library_path(), first)
        compiles = [c for c in run.call_args_list if "-shared" in c.args[0]]
        self.assertEqual(compiles, [], "a cached library is not rebuilt")
        self.assertEqual(first.stat().st_mtime_ns, stamp)
        self.assertEqual(os.listdir(first.parent), [first.name], "no temporary files left")

    def test_the_key_changes_with_the_cpu_flags(self):
        first = cpu_kernels.library_path()
        with mock.patch("pie.engine.cpu_path.cpu_flags", return_value=frozenset({"sse2"})):
            self.assertNotEqual(cpu_kernels.build_key("gcc"), first.parent.name)

    def test_the_avx2_build_equals_the_references(self):
        """PIE_CPU_MARCH=x86-64-v3 builds the code an AVX2-only CPU runs (x8 on maddubs)."""
        with mock.patch.dict(os.environ, {"PIE_CPU_MARCH": "x86-64-v3"}):
            path = cpu_kernels.library_path()
        with mock.patch.dict(os.environ, {"PIE_CPU_MARCH": "native"}):
            self.assertNotEqual(path, cpu_kernels.library_path(), "its own key")
        lib = cpu_kernels._declare(cpu_kernels.ctypes.CDLL(str(path)))
        self.assertTrue(cpu_kernels._probe(lib))
        self.assertEqual(lib.pie_int4_x8(), 2)
        g = torch.Generator().manual_seed(3)
        for (n, k), x8 in [(shape, False) for shape in SHAPES] + [(s, True) for s in X8_SHAPES]:
            q, d, m = q4_1(n, k, g)
            with mock.patch.dict(os.environ, {"PIE_CPU_KERNELS": "auto"}):
                packed = Int4Packed.from_q4_1(q, d, m, lib=lib)
            self.assertEqual(packed.x8, x8)
            qi = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
            s = torch.rand(n, k // 32, generator=g)
            for rows in (1, 3, 4, 5, 8, 10):
                x = torch.randn(rows, k, generator=g)
                want = (int4_x8_matmul if x8 else int4_group_matmul)(x, q, d, m)
                scale = int4_group_matmul(x.abs(), q, d, m.abs())
                assert_matches(self, packed.matmul(x, lib=lib), want, scale)
                got, want = Int8Packed(qi, s).matmul(x, lib=lib), int8_group_matmul(x, qi, s)
                assert_matches(self, got, want, int8_group_matmul(x.abs(), qi.abs(), s))

    def test_no_compiler_or_a_failed_build_means_not_available(self):
        with mock.patch.dict(os.environ, {"CC": "/nonexistent/gcc"}):
            self.assertIsNone(cpu_kernels.library_path())
        with mock.patch.object(cpu_kernels, "SOURCE", cpu_kernels.Path(self.mktemp())):
            self.assertIsNone(cpu_kernels.library_path())


class FallbackTests(TestCase):
    def test_off_or_unavailable_keeps_torchs_int4_kernel(self):
        w = Q4_1Weight.from_dense(np.random.default_rng(1).standard_normal((32, 64), np.float32))
        x = torch.randn(2, 64)
        with mock.patch.object(cpu_kernels, "available", return_value=False):
            layer = Int4Linear(w, torch.bfloat16)
            self.assertEqual((layer.kernel, int4_kernel_name()), ("int4", "int4"))
        self.assertIsNone(layer.fp32)
        want = x @ torch.from_numpy(w.dequantize()).T
        self.assertLess(((layer(x) - want).norm() / want.norm()).item(), 0.02)  # bf16 rounding
        cpu_kernels.library.cache_clear()
        try:
            with mock.patch.dict(os.environ, {"PIE_CPU_KERNELS": "off"}):
                self.assertFalse(cpu_kernels.available())
        finally:
            cpu_kernels.library.cache_clear()
