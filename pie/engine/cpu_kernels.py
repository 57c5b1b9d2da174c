"""Weight-only quantized matmuls with float32 activations on the CPU (the contract).

Why: torch 2.13's int4 CPU kernel is fast only with bf16 inputs and rounds its
inputs, outputs and scales to bf16, which costs next-token agreement with the
fp32 reference (98.7% vs the issue's 99%), and it has no kernel for GGUF's
8-bit-per-weight group formats (Q8_0, Q5_0, Q6_K), which therefore run dense.
These functions keep the file's integers and float32 group scales and compute
in float32.

`available()` says whether a compiled kernel runs here; where it does not, the
callers keep their torch paths. The reference forms below define the results.
"""

from __future__ import annotations

import torch


def available() -> bool:
    """Whether compiled kernels run on this machine (none yet: callers keep their torch paths)."""
    return False


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
