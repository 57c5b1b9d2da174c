"""µs per call of the few-row weight kernels at SmolLM2-135M's shapes, side by side.

Usage: PYTHONPATH=$PWD python bench/cpu_kernels.py [--rows 1] [--reps 200] [--decode]

torch int4 (bf16 in and out, what Int4Linear ran before), pie's int4 with float32
activations (pie.engine.cpu_kernels), dense float32 (F.linear) and pie's int8
groups of 32, interleaved in one process (the figures are noisy on a shared machine).
--decode adds batch-1 decode tokens/s of SmolLM2 on the default CPU path (dtype auto)
with pie's kernels and without them (torch's int4, as with `cpu_kernels = "off"`),
two engines in one process, runs interleaved.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pie.engine import cpu_kernels
from pie.engine.cpu_kernels import Int4Packed, Int8Packed

SHAPES = {  # name: (out N, in K)
    "qkv 576->960": (960, 576),
    "o 576->576": (576, 576),
    "gate_up 576->3072": (3072, 576),
    "down 1536->576": (576, 1536),
    "head 576->49152": (49152, 576),
}


def per_call_us(fn, x: torch.Tensor, reps: int) -> float:
    for _ in range(5):
        fn(x)
    best = float("inf")
    for _ in range(5):  # best of 5 batches of reps/5: the least disturbed
        t = time.perf_counter()
        for _ in range(max(1, reps // 5)):
            fn(x)
        best = min(best, (time.perf_counter() - t) / max(1, reps // 5))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    ap.add_argument("--decode", action="store_true", help="also batch-1 decode, on vs off")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert cpu_kernels.available(), "the compiled kernels do not run here"
    print(f"threads {torch.get_num_threads()}, rows {args.rows}; µs per call")
    cols = ("torch int4 bf16", "pie int4 fp32", "dense fp32", "pie int8/32 fp32")
    print(f"{'shape':20}" + "".join(f"{c:>18}" for c in cols) + f"{'dense/pie4':>12}")
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        # float16 scales, as in a Q4_1 file (packed as float16)
        d = (torch.rand(n, k // 32, generator=g) / 100).half().float()
        m = (torch.randn(n, k // 32, generator=g) / 100).half().float()
        w = cpu_kernels.int4_group_matmul(torch.eye(k), q, d, m).T.contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        sz = torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().bfloat16()
        p4 = Int4Packed.from_q4_1(q, d, m)
        p8 = Int8Packed(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), d)
        x = torch.randn(args.rows, k, generator=g)

        def torch_int4(x, packed=packed, sz=sz):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz).float()

        fns = (torch_int4, p4.matmul, lambda x, w=w: F.linear(x, w), p8.matmul)
        us = [per_call_us(f, x, args.reps if n < 10000 else args.reps // 4) for f in fns]
        print(f"{name:20}" + "".join(f"{u:18.1f}" for u in us) + f"{us[2] / us[1]:12.2f}")
    if args.decode:
        decode_ab()


def decode_ab(new: int = 48, repeats: int = 5) -> None:
    """Batch-1 decode tok/s, pie's kernels on and off, interleaved (best of `repeats`)."""
    from unittest import mock

    from bench.decode import ours, prompts
    from pie.engine.engine import create_engine
    from pie.engine.loaders import load_model
    from pie.service.registry import default_model_path

    loaded = load_model(default_model_path(), dtype=torch.float32)

    threads = torch.get_num_threads()

    def engine():  # at this process's torch threads (create_engine would take every core)
        with mock.patch("pie.engine.engine.usable_cores", return_value=threads):
            return create_engine(loaded, device="cpu", dtype="auto", num_pages=16)

    on = engine()
    with mock.patch.object(cpu_kernels, "available", return_value=False):
        off = engine()
    batch = prompts(loaded.tokenizer, 1, 32)
    best = {"on": 0.0, "off": 0.0}
    for _ in range(repeats):
        for name, e in (("on", on), ("off", off)):
            best[name] = max(best[name], ours(e, batch, new))
    kernels = on.info.compute["weight_kernel"], off.info.compute["weight_kernel"]
    print(f"batch-1 decode tok/s: {kernels[0]} {best['on']:.1f}, {kernels[1]} {best['off']:.1f}")
    print(f"ratio {best['on'] / best['off']:.2f} (threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
