"""Which CPU path `dtype auto` takes, from the CPU it finds (kept apart so it is testable).

Batch-1 decode on a CPU is bound by reading weights, so bytes per step decide
it: the path keeps GGUF's Q4_1 weights at 4 bits. Where gcc builds pie's own
kernel (pie.engine.cpu_kernels: float32 activations, within ~10% of torch's
per call at one row; batch-1 decode 0.77-0.83x of torch's int4 on the AMX Xeon,
bench/cpu_kernels.py --decode) it runs them ("int4-fp32": the exact float32
product, next-token agreement 100% vs 98.7%; "int4-x8" with AVX512-VNNI or AVX2:
activations as two int8 halves, 99.95%, ~2.8x faster at 8 rows); else torch's int4 weight-only kernel, which is fast only with bf16 inputs
(with fp32 ones it takes a slow path, ~10x). Its x86 code has AVX512 and AVX2
versions, so the int4 path serves every x86 CPU where a probe of the kernel
gives the right answer.

The model itself stays float32 there (residual stream, norms, attention, KV
cache): only each kernel's input and output round to bf16. Measured on
SmolLM2-135M over tests/test_accuracy.py's corpus: all-bf16 agrees with the fp32
reference on 96.9% of next tokens (mean KL 1.1e-3), this mixed path on 98.2%
(KL 3e-4); and fp32 attention and norms are fast on every CPU.

What differs by CPU is the dense GEMM used for many rows (prefill, big
batches): with native bf16 (AVX512-BF16, AMX) oneDNN's bf16 GEMM is the fastest;
without it bf16 GEMM is emulated (measured with oneDNN capped at AVX2: 17 ms vs
3.4 ms fp32 for 256 x 576 x 1536), so those rows run in fp32 there.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class CpuPath:
    """dtype: the model's (activations, KV cache); dense_dtype: the many-row GEMMs;
    weight_kernel: the few-row linears and LM head ("int4-fp32": pie's compiled kernel,
    float32 in and out; "int4": torch's, bf16 in and out; or "dense")."""

    dtype: torch.dtype
    dense_dtype: torch.dtype
    weight_kernel: str  # "int4-fp32", "int4" or "dense"

    def describe(self) -> dict[str, str]:
        return {k: str(v).removeprefix("torch.") for k, v in asdict(self).items()}


def choose_cpu_path(
    flags: frozenset[str], quantized: bool, int4_bf16_works: bool, fp32_kernels: bool = False
) -> CpuPath:
    """The fastest path meeting tests/test_accuracy.py's bounds on a CPU with these flags;
    `fp32_kernels`: pie.engine.cpu_kernels built and passed its probe here."""
    native = bool(flags & NATIVE_BF16_FLAGS)
    dense = torch.bfloat16 if native else torch.float32
    if quantized and fp32_kernels:
        return CpuPath(torch.float32, dense, "int4-fp32")
    if quantized and int4_bf16_works:
        return CpuPath(torch.float32, dense, "int4")
    return CpuPath(dense, dense, "dense")


AVX2_LEVEL_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"})


def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (empty where there is none), less avx512*/amx* where
    ONEDNN_MAX_CPU_ISA caps oneDNN at AVX2 or below: its bf16 GEMM is then emulated (~5x
    slower than fp32), so the path must not count on native bf16."""
    flags: frozenset[str] = frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in AVX2_LEVEL_ISAS:
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
    return flags


@functools.cache
def int4_bf16_works() -> bool:
    """Whether this torch build's int4 CPU kernel runs here and gives the right product."""
    try:
        q = torch.arange(64 * 64, dtype=torch.int32).reshape(64, 64) % 16
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        scales_zeros = torch.stack(
            [torch.full((2, 64), 0.5), torch.full((2, 64), 0.25)], dim=-1
        ).to(torch.bfloat16)
        x = torch.linspace(-1, 1, 64).reshape(1, 64).to(torch.bfloat16)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    want = x.float() @ ((q.float() - 8) * 0.5 + 0.25).T
    return bool(torch.allclose(got.float(), want, atol=0.1, rtol=0.02))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), which torch's threads follow."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
