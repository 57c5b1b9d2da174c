"""Batch-1 decode step time, this checkout against a baseline git revision, in one process.

    PYTHONPATH=. .venv/bin/python bench/decode_step.py [--baseline main] [--context 300]
        [--steps 400] [--threads 2] [--profile]

Why one process: the machine is shared, so two runs minutes apart see different
loads. The engine modules this work changes (kv_cache, attention, llama, engine)
are loaded a second time from `git show BASELINE:...` under another package name,
and both engines (same loaded weights, default CPU path of `dtype auto`) serve a
single sequence of --context tokens; their decode steps then alternate, one each,
--steps times, and the medians are compared.

Besides the real model (the default, SmolLM2-135M), a *skeleton* runs: the same
layer count and op sequence with tiny dimensions (hidden 64), whose step time is
almost all per-op Python and dispatch overhead rather than kernel work, so the
two figures split a step into kernels vs overhead. --profile prints torch.profiler's
table of one step of each side (the profiler inflates small ops: read the counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import torch

from pie.engine.batch import Forward, ForwardItem, Sampling
from pie.engine.llama import LlamaConfig
from pie.engine.loaders import LoadedModel, load_model
from pie.engine.quant import Q4_1Weight
from pie.service.registry import default_model_path

PAGE = 16
REPLACED = ("kv_cache", "attention", "llama", "engine")  # modules loaded again from BASELINE


def baseline_engine_module(rev: str) -> types.ModuleType:
    """pie.engine.engine as of `rev`, with its REPLACED siblings also as of `rev`."""
    package = types.ModuleType("_pie_baseline")
    package.__path__ = []
    sys.modules["_pie_baseline"] = package
    module = None
    for name in REPLACED:
        source = subprocess.run(
            ["git", "show", f"{rev}:pie/engine/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for other in REPLACED:
            source = source.replace(
                f"from pie.engine.{other} import", f"from _pie_baseline.{other} import"
            )
        spec = importlib.util.spec_from_loader(f"_pie_baseline.{name}", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        exec(compile(source, f"{rev}:pie/engine/{name}.py", "exec"), module.__dict__)
    return module


def skeleton(layers: int = 30, seed: int = 0) -> LoadedModel:
    """A random model with SmolLM2's layer count and tiny dimensions, int4 like the real one."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    g = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(256, 64, generator=g) * 0.1,
        "model.norm.weight": torch.ones(64),
    }
    quantized = {}
    shapes = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(64)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(64)
        names = {p + f"self_attn.{x}_proj.weight": s for x, s in shapes.items()}
        names.update({p + f"mlp.{x}_proj.weight": (128, 64) for x in ("gate", "up")})
        names[p + "mlp.down_proj.weight"] = (64, 128)
        for name, shape in names.items():
            w = torch.randn(*shape, generator=g) * 0.1
            quantized[name] = Q4_1Weight.from_dense(w.numpy())
            weights[name] = torch.from_numpy(quantized[name].dequantize())
    return LoadedModel("skeleton", "", "random", config, weights, None, quantized)


def prefilled(module: types.ModuleType, loaded: LoadedModel, context: int):
    """An engine (module.create_engine, dtype auto) holding one sequence of `context` tokens,
    and the Forward of its next decode step (which rewrites the same slot each time)."""
    engine = module.create_engine(loaded, device="cpu", dtype="auto", num_pages=context // PAGE + 2)
    vocab = loaded.config.vocab_size
    tokens = [(7 * i + 1) % vocab for i in range(context)]
    pages = list(range(context // PAGE + 2))

    def item(total: int, new: list[int], positions) -> ForwardItem:
        used = pages[: -(-total // PAGE)]
        return ForwardItem(
            pages=used,
            last_page_len=total - PAGE * (len(used) - 1),
            positions=list(positions),
            tokens=new,
            output_indices=[len(new) - 1],
            sampling=Sampling(),
        )

    engine.run(Forward([item(context, tokens, range(context))]))
    return engine, Forward([item(context + 1, [5], [context])])


def ab(sides: dict, steps: int) -> dict[str, float]:
    """Median step ms of each side, their steps interleaved."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for engine, step in sides.values():
        for _ in range(10):
            engine.run(step)
    for _ in range(steps):
        for name, (engine, step) in sides.items():
            start = time.perf_counter()
            engine.run(step)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def same_logits(sides: dict) -> float:
    """Max |difference| of the two sides' next-token distributions at the step."""
    dists = []
    for engine, step in sides.values():
        probe = Forward([dataclasses.replace(step.items[0], sampling=None)])
        [[(ids, probs)]] = engine.run(probe)
        dense = np.zeros(engine.model.config.vocab_size)
        dense[ids] = probs
        dists.append(dense)
    return float(np.abs(dists[0] - dists[1]).max())


def profile(engine, step) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            engine.run(step)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--baseline", default="main", help="git revision to compare against")
    parser.add_argument("--context", type=int, default=300, help="tokens in the KV cache")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    from pie.engine import engine as current

    base = baseline_engine_module(args.baseline)
    loaded = load_model(args.model or default_model_path(), dtype=torch.float32)
    for label, model in (("model", loaded), ("skeleton", skeleton())):
        sides = {
            args.baseline: prefilled(base, model, args.context),
            "this": prefilled(current, model, args.context),
        }
        torch.set_num_threads(args.threads)  # create_engine sets it from the affinity mask
        diff = same_logits(sides)
        medians = ab(sides, args.steps)
        a, b = medians[args.baseline], medians["this"]
        print(
            f"{label:8s} context {args.context}, threads {args.threads}, {args.steps} steps each: "
            f"{args.baseline} {a:.2f} ms, this {b:.2f} ms ({a / b:.2f}x), max |dp| {diff:.1e}",
            flush=True,
        )
        if args.profile:
            for name, (engine, step) in sides.items():
                print(f"--- {label}, {name}")
                profile(engine, step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
