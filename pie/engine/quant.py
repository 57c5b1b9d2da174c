"""Linear layers: dense weights, GGUF Q4_1/Q4_K blocks run by an int4 CPU kernel
(pie's float32 one, pie.engine.cpu_kernels, where it builds; else torch's), or
GGUF's 5-to-8-bit formats as int8 groups (Int8Groups) run by pie.engine.cpu_kernels.

Why int4: on a CPU a decode step is bound by the matmul kernels, and Q4_1
maps *losslessly* onto `aten._weight_int4pack_mm_for_cpu`: Q4_1 stores
w = d*q + m per block of 32 (q in 0..15), the kernel computes
w = (q - 8)*scale + zero per group of 32, so scale = d and zero = m + 8d.
The kernel wants 2-D activations; the model always feeds it [tokens, features].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pie.engine import cpu_kernels
from pie.engine.cpu_kernels import Int4Packed

Q4_1_GROUP = 32


@dataclass
class Q4_1Weight:
    """A [out, in] weight kept in Q4_1 form: w[n, k] = d[n, k//32] * q[n, k] + m[n, k//32]."""

    q: np.ndarray  # uint8 [out, in], values 0..15
    d: np.ndarray  # float32 [out, in // 32]
    m: np.ndarray  # float32 [out, in // 32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        """The float32 weight (equal to gguf's own dequantization)."""
        out, inp = self.q.shape
        blocks = self.q.reshape(out, inp // Q4_1_GROUP, Q4_1_GROUP).astype(np.float32)
        w = blocks * self.d[:, :, None] + self.m[:, :, None]
        return w.reshape(out, inp)

    def permute_rows(self, order: np.ndarray) -> Q4_1Weight:
        return Q4_1Weight(self.q[order], self.d[order], self.m[order])

    @staticmethod
    def from_dense(w: np.ndarray) -> Q4_1Weight:
        """Round a float [out, in] weight to Q4_1 (per-32 min/max), as llama.cpp's quantizer does."""
        out, inp = w.shape
        blocks = w.reshape(out, inp // Q4_1_GROUP, Q4_1_GROUP).astype(np.float32)
        lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
        d = (hi - lo) / 15.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        q = np.clip(np.rint((blocks - lo[:, :, None]) * inv[:, :, None]), 0, 15)
        return Q4_1Weight(q.astype(np.uint8).reshape(out, inp), d, lo)

    @staticmethod
    def concat(parts: list[Q4_1Weight]) -> Q4_1Weight:
        return Q4_1Weight(
            np.concatenate([p.q for p in parts]),
            np.concatenate([p.d for p in parts]),
            np.concatenate([p.m for p in parts]),
        )


def parse_q4_1(raw: np.ndarray, out_features: int, in_features: int) -> Q4_1Weight:
    """Split GGUF Q4_1 bytes (blocks of fp16 d, fp16 m, 16 bytes of nibbles) into arrays.

    Within a block, byte j holds element j in its low nibble and element j+16
    in its high nibble (ggml's layout).
    """
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)
    groups = in_features // Q4_1_GROUP
    return Q4_1Weight(
        q.reshape(out_features, in_features),
        d.reshape(out_features, groups),
        m.reshape(out_features, groups),
    )


Q4_K_BLOCK_BYTES = 144  # fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles


def parse_q4_k(raw: np.ndarray, out_features: int, in_features: int) -> Q4_1Weight:
    """GGUF Q4_K super-blocks as the same Q4_1 form, losslessly.

    A Q4_K super-block of 256 weights holds eight sub-blocks of 32, each with a 6-bit
    scale s and min m: w = (d*s)*q - (dmin*m). That is Q4_1 per group of 32 with
    d' = d*s and m' = -dmin*m, so the int4 kernel runs Q4_K_M files (Gemma 3 270M's
    weights) as it runs Q4_1. In a super-block, 32 bytes of nibbles hold sub-block 2i
    in their low nibbles and 2i+1 in their high ones.
    """
    from gguf.quants import Q4_K

    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, Q4_K_BLOCK_BYTES)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    scales, mins = Q4_K.get_scale_min(blocks[:, 4:16])
    nibbles = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (nibbles & 0x0F).reshape(out_features, in_features)
    groups = in_features // Q4_1_GROUP
    return Q4_1Weight(
        q,
        (d * scales.astype(np.float32)).reshape(out_features, groups),
        -(dmin * mins.astype(np.float32)).reshape(out_features, groups),
    )


Q8_0_BLOCK_BYTES = 34  # fp16 d, 32 int8
Q5_0_BLOCK_BYTES = 22  # fp16 d, 4 bytes of fifth bits, 16 of nibbles
Q5_K_BLOCK_BYTES = 176  # fp16 d, fp16 dmin, 12 of scales/mins, 32 of fifth bits, 128 of nibbles
Q6_K_BLOCK_BYTES = 210  # 128 of low nibbles, 64 of high 2 bits, 16 int8 scales, fp16 d
QK_K = 256  # weights per K-quant super-block


@dataclass
class Int8Groups:
    """A [rows, cols] weight as int8 with float32 scales (and mins) per group of g columns:
    w[n, k] = scales[n, k // g] * q[n, k] (+ mins[n, k // g]).

    Why: GGUF's 5-to-8-bit formats are all this form, losslessly: Q8_0 (g 32, q = the
    int8), Q5_0 (g 32, q - 16), Q6_K (g 16, scale d * the 6-bit's int8 scale, q - 32),
    Q5_K and Q4_K (g 32, with a min: d*s*q - dmin*m). Kept so, such a weight is read at
    about 1 byte per weight instead of 4: by rows (the embedding lookup, the LM head's
    rescored top logits: indexing), or by cpu_kernels.int8_group_matmul (Int8GroupLinear).
    Indexing gives what gguf's dequantization gives, to the bit: q and the scales widened
    to float32, one float32 product (and one sum with the min; gguf subtracts dmin*m,
    the same in IEEE arithmetic), then a cast to `dtype`.
    """

    q: torch.Tensor  # int8 [rows, cols]
    scales: torch.Tensor  # float32 [rows, cols // g]
    mins: torch.Tensor | None = None  # float32 [rows, cols // g]; None: symmetric
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        q, s = self.q[index], self.scales[index]
        w = q.reshape(*q.shape[:-1], s.shape[-1], -1).to(torch.float32) * s[..., None]
        if self.mins is not None:
            w = w + self.mins[index][..., None]
        return w.flatten(-2).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        return self[torch.arange(self.q.shape[0])]

    def to(self, device: torch.device, dtype: torch.dtype) -> Int8Groups:
        mins = None if self.mins is None else self.mins.to(device)
        return Int8Groups(self.q.to(device), self.scales.to(device), mins, dtype)

    def permute_rows(self, order: np.ndarray) -> Int8Groups:
        index = torch.from_numpy(order)
        mins = None if self.mins is None else self.mins[index]
        return Int8Groups(self.q[index], self.scales[index], mins, self.dtype)

    def regroup(self, group: int) -> Int8Groups:
        """The same weight with groups of `group` (a divisor of this one's): scales repeated."""
        times = self.group // group
        mins = None if self.mins is None else self.mins.repeat_interleave(times, dim=1)
        return Int8Groups(self.q, self.scales.repeat_interleave(times, dim=1), mins, self.dtype)

    @staticmethod
    def from_q4_1(weight: Q4_1Weight) -> Int8Groups:
        """Q4_1 (and Q4_K) blocks as int8 groups of 32: q 0..15 fits int8, d and m as they are."""
        return Int8Groups(
            torch.from_numpy(weight.q.astype(np.int8)),
            torch.from_numpy(weight.d),
            torch.from_numpy(weight.m),
        )

    @staticmethod
    def concat(parts: list[Int8Groups]) -> Int8Groups:
        """Parts stacked by rows, in the smallest group size among them; a part without mins
        gets zero mins where another has them (s*q + 0 is s*q)."""
        group = min(p.group for p in parts)
        parts = [p.regroup(group) for p in parts]
        mins = None
        if any(p.mins is not None for p in parts):
            mins = torch.cat(
                [torch.zeros_like(p.scales) if p.mins is None else p.mins for p in parts]
            )
        return Int8Groups(
            torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), mins
        )


def _blocks(raw: np.ndarray, size: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1, size)


def _fp16(columns: np.ndarray) -> np.ndarray:
    return columns.copy().view(np.float16).astype(np.float32)


def _groups(q: np.ndarray, scales: np.ndarray, mins, rows: int, cols: int) -> Int8Groups:
    width = scales.size // rows

    def tensor(a: np.ndarray, columns: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).reshape(rows, columns))

    return Int8Groups(
        tensor(q, cols), tensor(scales, width), None if mins is None else tensor(mins, width)
    )


def parse_q8_0(raw: np.ndarray, rows: int, cols: int) -> Int8Groups:
    """GGUF Q8_0 bytes (blocks of fp16 d and 32 int8): w = d * q, groups of 32."""
    blocks = _blocks(raw, Q8_0_BLOCK_BYTES)
    return _groups(blocks[:, 2:].copy().view(np.int8), _fp16(blocks[:, 0:2]), None, rows, cols)


def parse_q5_0(raw: np.ndarray, rows: int, cols: int) -> Int8Groups:
    """GGUF Q5_0: w = d * (q - 16), q of 5 bits: element j's low 4 bits in byte j % 16 of the
    nibbles (low nibble for j < 16), its fifth in bit j of the little-endian uint32 qh."""
    blocks = _blocks(raw, Q5_0_BLOCK_BYTES)
    qh = blocks[:, 2:6].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)
    low = blocks[:, 6:, None] >> np.array([0, 4], np.uint8)
    low = (low & 0x0F).transpose(0, 2, 1).reshape(-1, 32)
    q = (low | ((qh & 1).astype(np.uint8) << 4)).astype(np.int8) - np.int8(16)
    return _groups(q, _fp16(blocks[:, 0:2]), None, rows, cols)


def parse_q5_k(raw: np.ndarray, rows: int, cols: int) -> Int8Groups:
    """GGUF Q5_K super-blocks of 256: eight groups of 32 with 6-bit scale s and min m,
    w = (d*s) * q - dmin*m, q of 5 bits (nibbles as Q4_K's, fifth bit i of group i in qh)."""
    from gguf.quants import Q4_K

    blocks = _blocks(raw, Q5_K_BLOCK_BYTES)
    d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])
    s, m = Q4_K.get_scale_min(blocks[:, 4:16])
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    low = blocks[:, 48:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = ((low & 0x0F).reshape(-1, 8, 32) | ((qh & 1) << 4)).astype(np.int8)
    return _groups(q, d * s.astype(np.float32), -(dmin * m.astype(np.float32)), rows, cols)


def parse_q6_k(raw: np.ndarray, rows: int, cols: int) -> Int8Groups:
    """GGUF Q6_K super-blocks of 256: sixteen groups of 16 with int8 scales s,
    w = (d*s) * (q - 32), q of 6 bits (low nibbles and high pairs as ggml lays them out)."""
    blocks = _blocks(raw, Q6_K_BLOCK_BYTES)
    low = blocks[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    low = (low & 0x0F).reshape(-1, 8, 32)
    high = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        1, 1, 4, 1
    )
    high = (high & 0x03).reshape(-1, 8, 32)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    scales = _fp16(blocks[:, 208:210]) * blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    return _groups(q, scales, None, rows, cols)


class DenseLinear:
    """y = x @ W^T (+ b) with a dense weight on the model's device and dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        # a GEMM in the weight's dtype (bf16 copies for many rows, or fp32 for bf16 activations
        # on CPUs without native bf16: pie.engine.cpu_path); the bias is in the model's dtype
        y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear:
    """y = x @ W^T with W kept at 4 bits: pie's float32-activation kernel where it runs
    (pie.engine.cpu_kernels: exact float32 arithmetic on the file's q, d and m), else
    packed for torch's CPU int4 weight-only kernel (bf16 inputs, outputs and scales)."""

    def __init__(self, weight: Q4_1Weight, dtype: torch.dtype):
        out, inp = weight.shape
        if inp % Q4_1_GROUP:
            raise ValueError(f"int4 weights need in_features divisible by 32, got {inp}")
        self.out_features = out
        self.fp32: Int4Packed | None = None
        if cpu_kernels.available():  # one packed copy: bf16 activations widen to it too
            self.fp32 = Int4Packed.from_q4_1(
                torch.from_numpy(weight.q), torch.from_numpy(weight.d), torch.from_numpy(weight.m)
            )
            self.kernel = "int4-fp32"
            return
        self.kernel = "int4"
        q = torch.from_numpy(weight.q.astype(np.int32))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        scale = torch.from_numpy(weight.d)
        zero = torch.from_numpy(weight.m) + 8.0 * scale
        # [in/32, out, 2] as the kernel expects
        self.scales_zeros = (
            torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 is not None:
            if x.dtype == torch.float32:
                return self.fp32.matmul(x)
            return self.fp32.matmul(x.to(torch.float32)).to(x.dtype)
        if x.dtype == self.scales_zeros.dtype:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, Q4_1_GROUP, self.scales_zeros
            )
        # an fp32 model: only the kernel's own inputs and outputs round to bf16
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(self.scales_zeros.dtype), self.packed, Q4_1_GROUP, self.scales_zeros
        )
        return y.to(x.dtype)


class Int8Linear:
    """y = x @ W^T with W rounded to int8 per output row, for torch's int8 weight-only kernel."""

    def __init__(self, weight: torch.Tensor):
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scale.to(weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.scales.dtype:
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scales)
        return torch.ops.aten._weight_int8pack_mm(x.to(self.scales.dtype), self.q, self.scales).to(
            x.dtype
        )


class Int8GroupLinear:
    """y = x @ W^T with W as Int8Groups, by cpu_kernels.int8_group_matmul in float32.

    Measured (Gemma 3 270M, batch-1 decode, 1 thread, Xeon with AMX, interleaved in one
    process on a shared machine): 49.1 ms per step with these linears dense float32, 38.7
    with this kernel.

    Why: Gemma 3 270M's Q4_K_M file holds 45 of its 72 linears as Q5_0/Q8_0/Q6_K, which
    torch has no kernel for; as dense float32 they read 4 bytes a weight. The kernel reads
    the int8 and the scales; a min per group (Q4_K, Q5_K) adds sum_g(x) * min, a
    [rows, K/g] x [K/g, out] product (1/g of the weight).
    """

    def __init__(self, weight: Int8Groups):
        self.packed = cpu_kernels.Int8Packed(weight.q, weight.scales)
        self.group = weight.group
        self.mins = None if weight.mins is None else weight.mins.T.contiguous()  # [K/g, out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        y = self.packed.matmul(x32)
        if self.mins is not None:
            sums = x32.reshape(x32.shape[0], -1, self.group).sum(dim=-1)
            y = torch.addmm(y, sums, self.mins)
        return y.to(x.dtype)


class Int4OrDenseLinear:
    """int4 (or int8 groups, Int8GroupLinear) for few rows (decode), dense bf16 for many
    (prefill, big batches).

    The CPU int4 kernel dequantizes as it goes, so its cost grows with the
    number of rows; past about a dozen rows oneDNN's dense bf16 GEMM wins
    (measured on AVX512-BF16: 0.13 vs 0.32 ms per layer at 1 row, 0.70 vs
    0.58 ms at 16). Keeping both costs the dense copy's memory.
    """

    MAX_INT4_ROWS = 10

    def __init__(
        self,
        int4: Int4Linear | Int8GroupLinear | RescoredHead,
        dense: DenseLinear | RescoredHead,
    ):
        self.int4 = int4
        self.dense = dense

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.MAX_INT4_ROWS:
            return self.dense(x)
        y = self.int4(x)
        return y if self.dense.bias is None else y + self.dense.bias


def int4_kernel_name() -> str:
    """What Int4Linear runs on this machine: "int4-x8" (pie's kernel with two-int8
    activations, AVX512-VNNI or AVX2), "int4-fp32" (pie's, float32 activations) or "int4" (torch's)."""
    if not cpu_kernels.available():
        return "int4"
    return (
        "int4-x8" if cpu_kernels.library().pie_int4_x8() and cpu_kernels.use_x8() else "int4-fp32"
    )


def int4_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """The int4 kernel is worth it on CPU with bf16 activations (fp32 int4 is slower than dense)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def quantized_head(
    weight: torch.Tensor,
    q4: Q4_1Weight | None,
    dense: torch.Tensor,
    exact: torch.Tensor | Int8Groups | None = None,
) -> Int4OrDenseLinear | DenseLinear:
    """The LM head: for few rows int4 per group of 32 with the top logits rescored from
    `exact` (default `weight`; RescoredHead), for many rows the dense GEMM on `dense`.

    Measured for SmolLM2's tied head (49152 x 576, Q8_0 in the file) at one row,
    2 threads: int4 1.4 ms, int8 per row 3.0 ms, dense bf16 7.2 ms (Xeon,
    AVX512-BF16). Next-token agreement with the exact head over
    tests/test_accuracy.py's corpus: int4 alone 86.5%, int8 alone 96.2%, either
    rescored the same as the exact head (98.2%), mean KL int4 8.6e-3, int8 6.6e-4.
    int4 rescored is taken: the fastest, with a bounded KL.

    Where `dense` is a rounded (bf16) copy, the many-row head is rescored too:
    bf16 logits are ~0.06 apart near 16, enough to flip near-ties (agreement with
    the exact head over that corpus: 96.9% unrescored, 98.9% rescored; AMX Xeon).
    """
    out, inp = weight.shape
    exact = weight if exact is None else exact
    many_rows = DenseLinear(dense)
    if dense.dtype != weight.dtype:
        many_rows = RescoredHead(many_rows, exact)
    if out % 16 or inp % Q4_1_GROUP:  # the kernel packs 16 rows by groups of 32
        return many_rows
    if q4 is None:
        q4 = Q4_1Weight.from_dense(weight.float().cpu().numpy())
    fast = RescoredHead(Int4Linear(q4, torch.bfloat16), exact)
    return Int4OrDenseLinear(fast, many_rows)


class RescoredHead:
    """An approximate LM head whose top `k` logits per row are recomputed exactly.

    Why: the head reads vocab x hidden weights, the most of any matmul in a
    small model's decode step, so a quantized copy saves the most time; but
    int8 per-row scales move the logits that matter (the top ones) enough to
    flip near-ties. The quantized product finds the candidates, and the exact
    weight rows of those `k` give their logits (a k x hidden gather).
    """

    bias = None  # LM heads have none

    def __init__(
        self,
        fast: Int8Linear | Int4Linear | DenseLinear,
        weight: torch.Tensor | Int8Groups,
        k: int = 64,
    ):
        self.fast = fast
        self.weight = weight
        self.k = k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fast(x)
        top = logits.topk(self.k, dim=-1).indices
        rows = self.weight[top].to(torch.float32)  # [n, k, hidden]
        exact = torch.bmm(rows, x.to(torch.float32)[:, :, None])[:, :, 0]
        return logits.scatter_(1, top, exact.to(logits.dtype))
