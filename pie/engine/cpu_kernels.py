"""Weight-only quantized matmuls on the CPU: float32 activations, or for int4 weights two
int8 halves of them (the x8 kernel, its error bounded; the contract).

Why: torch 2.13's int4 CPU kernel is fast only with bf16 inputs and rounds its
inputs, outputs and scales to bf16, which costs next-token agreement with the
fp32 reference (98.7% vs the issue's 99%), and it has no kernel for GGUF's
8-bit-per-weight group formats (Q8_0, Q5_0, Q6_K), which therefore run dense.
These functions keep the file's integers and float32 group scales and compute
in float32.

The kernels are C (cpu_kernels.c, next to this file), built at first use with
gcc -march=native (or $PIE_CPU_MARCH) into $PIE_HOME/kernels/<key>/ (key: the source, the flags, the
compiler's version and the CPU's flags) and loaded with ctypes. Where gcc is
missing, the build or its probe fails, or PIE_CPU_KERNELS=off (the `cpu_kernels`
setting), `available()` is False and the callers keep their torch paths. The
reference forms below define the results.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-std=gnu11")


def march() -> str:
    """gcc's -march: native, or $PIE_CPU_MARCH (e.g. x86-64-v3 builds the AVX2 code, so one
    machine can test and time what an AVX2-only CPU runs)."""
    return os.environ.get("PIE_CPU_MARCH") or "native"


BUILD_TIMEOUT_S = 60


def int8_group_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y[m, n] = sum_k x[m, k] * scales[n, k // g] * q[n, k], g = K // scales.shape[1].

    x: float32 [M, K]; q: int8 [N, K]; scales: float32 [N, K // g] (g = 16 or 32).
    """
    n, k = q.shape
    g = k // scales.shape[1]
    w = (q.reshape(n, -1, g).to(torch.float32) * scales[:, :, None]).reshape(n, k)
    return x @ w.T


def int4_group_matmul(
    x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """y[m, n] = sum_k x[m, k] * (d[n, k // 32] * q[n, k] + m[n, k // 32]) (Q4_1's form).

    x: float32 [M, K]; q: uint8 [N, K] with values 0..15; d, m: float32 [N, K // 32].
    A compiled kernel may take q packed; its packing is its own.
    """
    n, k = q.shape
    w = q.reshape(n, -1, 32).to(torch.float32) * d[:, :, None] + m[:, :, None]
    return x @ w.reshape(n, k).T


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [M, K] as the x8 kernel takes it, per group of 32: two int8 halves and a
    scale, x ~= scale * (hi + lo / 256) (|error| <= scale / 512 but where lo is clamped
    to 127: scale / 256). Returns hi, lo int8 [M, K] and scale float32 [M, K // 32]."""
    g = x.reshape(x.shape[0], -1, 32)
    top = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    t = g * inv
    hi = torch.round(t)
    lo = torch.round((t - hi) * 256.0).clamp(-127, 127)
    as_int8 = [a.to(torch.int8).reshape(x.shape) for a in (hi, lo)]
    return as_int8[0], as_int8[1], (top / 127.0)[..., 0]


def int4_x8_matmul(
    x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """int4_group_matmul with x as quantize_activations gives it in the d * q term (the min
    term keeps the exact sums of x): the x8 kernel's results (AVX512-VNNI or AVX2)."""
    hi, lo, sx = quantize_activations(x)
    n, k = q.shape
    groups = (hi.to(torch.float32) + lo.to(torch.float32) / 256.0).reshape(x.shape[0], -1, 32)
    xr = (groups * sx[..., None]).reshape(x.shape)
    sums = x.reshape(x.shape[0], -1, 32).sum(dim=-1)
    w = q.reshape(n, -1, 32).to(torch.float32) * d[:, :, None]
    return xr @ w.reshape(n, k).T + sums @ m.T


def cache_root() -> Path:
    """$PIE_HOME/kernels (PIE_HOME as pie.config's `home` default: else ~/.cache/pie)."""
    home = os.environ.get("PIE_HOME") or str(Path.home() / ".cache" / "pie")
    return Path(home) / "kernels"


def build_key(compiler: str) -> str:
    """What the built library depends on: source, flags, compiler version, CPU flags."""
    from pie.engine.cpu_path import cpu_flags

    version = subprocess.run(
        [compiler, "-dumpfullversion", "-dumpversion"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=True,
    ).stdout.strip()
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (*CFLAGS, march(), version, platform.machine(), *sorted(cpu_flags())):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:20]


def library_path() -> Path | None:
    """The built library for this machine, building it if absent (None: no compiler or it failed).

    Concurrent processes each build into a temporary file and os.replace it into place,
    so a reader never sees a partial library.
    """
    compiler = os.environ.get("CC") or shutil.which("gcc")
    if not compiler:
        return None
    try:
        target = cache_root() / build_key(compiler) / "libpie_cpu_kernels.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run(
                [compiler, *CFLAGS, f"-march={march()}", "-o", tmp, str(SOURCE)],
                capture_output=True,
                timeout=BUILD_TIMEOUT_S,
                check=True,
            )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.SubprocessError):
        return None
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.pie_int4_matmul.argtypes = [p, long, i, i, p, p, p, i, p, i]
    lib.pie_int4_matmul.restype = i
    lib.pie_int4x8_matmul.argtypes = [p, long, i, i, p, p, p, i, p, i]
    lib.pie_int4x8_matmul.restype = i
    lib.pie_int4_x8.argtypes = []
    lib.pie_int4_x8.restype = i
    lib.pie_int8_matmul.argtypes = [p, long, i, i, p, p, i, i, p, i]
    lib.pie_int8_matmul.restype = i
    lib.pie_decode_attention.argtypes = [
        p,
        p,
        p,
        long,
        p,
        i,
        i,
        p,
        p,
        i,
        i,
        i,
        i,
        ctypes.c_float,
        p,
        i,
    ]
    lib.pie_decode_attention.restype = i
    lib.pie_decode_step.argtypes = [p, p, p, i]
    lib.pie_decode_step.restype = i
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, once probed against the reference forms (None where they don't run)."""
    if os.environ.get("PIE_CPU_KERNELS", "auto") == "off":
        return None
    path = library_path()
    if path is None:
        return None
    try:
        lib = _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError):
        return None
    return lib if _probe(lib) else None


def _probe(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 96, generator=g)
    q4 = torch.randint(0, 16, (48, 96), dtype=torch.uint8, generator=g)
    d, m = torch.rand(48, 3, generator=g), torch.randn(48, 3, generator=g)
    q8 = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    s = torch.rand(40, 6, generator=g)
    ok = True
    for n in (40, 48):  # 40 rows: the float32 layout; 48 (16 | N): x8 with AVX512-VNNI or AVX2
        packed = Int4Packed.from_q4_1(q4[:n], d[:n], m[:n], lib=lib)
        want = (int4_x8_matmul if packed.x8 else int4_group_matmul)(x, q4[:n], d[:n], m[:n])
        ok = ok and torch.allclose(packed.matmul(x, lib=lib), want, rtol=1e-4, atol=1e-4)
    got8 = Int8Packed(q8, s).matmul(x, lib=lib)
    return ok and torch.allclose(got8, int8_group_matmul(x, q8, s), rtol=1e-4, atol=1e-3)


def use_x8() -> bool:
    """Whether int4 weights may take the x8 kernel (int8 activations): the `cpu_kernels`
    setting auto (the default); fp32 keeps every activation in float32."""
    return os.environ.get("PIE_CPU_KERNELS", "auto") == "auto"


def available() -> bool:
    """Whether the compiled kernels run on this machine (else callers keep their torch paths)."""
    return library() is not None


def _activations(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"need float32 activations [M, {k}], got {x.dtype} {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


class Int4Packed:
    """A Q4_1 weight [N, K] packed for pie_int4_matmul: per group of 32, 16 bytes with
    element j in the low nibble of byte j and j + 16 in its high one (ggml's Q4_1 order),
    d and m float32 [N, K // 32]; or, where `x8`, for pie_int4x8_matmul (int8
    activations, AVX512-VNNI or AVX2; its layout is described in cpu_kernels.c)."""

    def __init__(self, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, x8: bool = False):
        self.packed, self.d, self.m, self.x8 = packed, d, m, x8
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2

    @staticmethod
    def from_q4_1(
        q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, lib: ctypes.CDLL | None = None
    ) -> Int4Packed:
        """From q uint8 [N, K] (0..15) and float32 d, m [N, K // 32] (int4_group_matmul's);
        in the x8 layout where `lib` (default: the loaded kernels) has it and 16 | N."""
        n, k = q.shape
        if k % 32 or d.shape != (n, k // 32) or m.shape != d.shape:
            raise ValueError(f"Q4_1 needs K % 32 == 0 and d, m [N, K/32]: {q.shape}, {d.shape}")
        lib = lib or library()
        q, d, m = q.to(torch.uint8), d.to(torch.float32), m.to(torch.float32)
        if lib is not None and lib.pie_int4_x8() and n % 16 == 0 and use_x8():
            # [blocks, 16, G, half, part, 4] -> [blocks, G, part, 16, 4, half]
            blocks = q.reshape(n // 16, 16, k // 32, 2, 4, 4).permute(0, 2, 4, 1, 5, 3)
            packed = (blocks[..., 0] | (blocks[..., 1] << 4)).contiguous()

            def per_block(a: torch.Tensor) -> torch.Tensor:
                return a.reshape(n // 16, 16, k // 32).transpose(1, 2).contiguous()

            return Int4Packed(packed.reshape(n, k // 2), per_block(d), per_block(m), x8=True)
        blocks = q.reshape(n, k // 32, 2, 16)
        packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        return Int4Packed(packed, d.contiguous(), m.contiguous())

    def matmul(self, x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
        """x float32 [M, K] -> [M, N], as int4_group_matmul on the unpacked weight."""
        lib = lib or library()
        x = _activations(x, self.in_features)
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        status = (lib.pie_int4x8_matmul if self.x8 else lib.pie_int4_matmul)(
            x.data_ptr(),
            x.stride(0),
            x.shape[0],
            self.in_features,
            self.packed.data_ptr(),
            self.d.data_ptr(),
            self.m.data_ptr(),
            self.out_features,
            y.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise MemoryError("pie_int4_matmul: no memory for its row sums")
        return y


class Int8Packed:
    """An int8 weight [N, K] with float32 scales per group of 16 or 32 (int8_group_matmul's)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        n, k = q.shape
        if q.dtype != torch.int8 or scales.shape[0] != n or k % scales.shape[1]:
            raise ValueError(f"need int8 q [N, K] and scales [N, K/g]: {q.shape}, {scales.shape}")
        self.group = k // scales.shape[1]
        if self.group not in (16, 32):
            raise ValueError(f"groups of 16 or 32 only, got {self.group}")
        self.q, self.scales = q.contiguous(), scales.to(torch.float32).contiguous()
        self.out_features, self.in_features = n, k

    def matmul(self, x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
        """x float32 [M, K] -> [M, N], as int8_group_matmul."""
        lib = lib or library()
        x = _activations(x, self.in_features)
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        status = lib.pie_int8_matmul(
            x.data_ptr(),
            x.stride(0),
            x.shape[0],
            self.in_features,
            self.q.data_ptr(),
            self.scales.data_ptr(),
            self.group,
            self.out_features,
            y.data_ptr(),
            torch.get_num_threads(),
        )
        assert status == 0
        return y


def paged_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pages: torch.Tensor,
    lens: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Decode attention read straight from the paged cache (no gather), float32.

    q [B, hq, dim]: one query row per item; k, v: one layer's cache [kv_heads, pages,
    page_size, dim], contiguous; pages int64 [B, P]: each item's pages in order (padded);
    lens int32 [B]: its context slots; mask bool [B, P * page_size] (True = attend) or None.
    Returns [B, hq, dim]. Why: on CPU the gather of B items' pages and SDPA cost ~8 ms of
    a 34 ms batch-8 SmolLM2 step (30 layers); this reads each slot once where it lives.
    """
    b, hq, dim = q.shape
    heads, num_pages, page_size, _ = k.shape
    q = q.contiguous()
    pages = pages.contiguous()
    lens = lens.to(torch.int32).contiguous()
    mask = None if mask is None else mask.reshape(b, -1).to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    status = library().pie_decode_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        num_pages * page_size * dim,
        pages.data_ptr(),
        pages.shape[1],
        page_size,
        lens.data_ptr(),
        None if mask is None else mask.data_ptr(),
        b,
        hq,
        heads,
        dim,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("pie_decode_attention: no memory for its scores")
    return out
