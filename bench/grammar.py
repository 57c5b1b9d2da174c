"""Cost of grammar-constrained decoding: constrained vs unconstrained decode steps at batch B.

    PYTHONPATH=. .venv/bin/python bench/grammar.py [--batch 8] [--tokens 48] [--repeats 3]

B streams each run one `generate` call through the real ModelService and the
SmolLM2 worker thread (greedy, the same prompt per stream but its own pages),
once without a grammar and once under a JSON Schema whose strings and array
keep the grammar open for all --tokens steps (at least 40 items), so both runs decode the same
number of steps. A constrained step includes everything the feature adds: the
host computes each stream's mask (pie.runtime.grammar, llguidance) on grammar
threads while the engine runs the step's forward pass, the engine joins the
masks before sampling and masks the full-vocabulary logits, and the sampled
token advances the matcher.
Prints ms per decode step for both and their ratio (best of --repeats each,
runs alternating).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from twisted.internet import defer, task

from pie.engine.batch import Sampling, layout_of
from pie.engine.sampling import sample
from pie.runtime.grammar import Vocabulary
from pie.service.local import load_worker
from pie.service.registry import default_model_path
from pie.service.service import ModelService

SCHEMA = {
    "type": "object",
    "properties": {
        "notes": {"type": "array", "items": {"type": "string"}, "minItems": 40},
        "kind": {"enum": ["cat", "dog"]},
    },
    "required": ["notes", "kind"],
    "additionalProperties": False,
}
PROMPT = "Write notes about animals as JSON: "


async def run(service: ModelService, vocab: Vocabulary | None, batch: int, tokens: int) -> float:
    """Seconds per decode step of one batch of generate calls (prefill not timed)."""
    prompt = service.tokenizer.tokenize(PROMPT)
    page = service.kv_page_size
    n = len(prompt)
    pages = -(-(n + tokens) // page)
    streams = []
    for b in range(batch):
        inst = f"bench{b}"
        q = service.create_queue(inst)
        service.submit(inst, q, "allocate_kv_pages", list(range(pages)))
        matcher = vocab.matcher("json_schema", json.dumps(SCHEMA)) if vocab else None
        streams.append((inst, q, matcher))

    def generate(inst, q, matcher, filled: int, new: list[int], count: int):
        used, last = layout_of(page, filled + len(new))
        every = list(range(pages))
        positions = list(range(filled, filled + len(new)))
        return service.submit(
            inst, q, "generate", last, every[:used], new, positions, every[used:],
            0.0, 0, 1.0, None, count, [], matcher,
        )  # fmt: skip

    # prefill and the first token, outside the timed part
    firsts = await defer.gatherResults([generate(i, q, m, 0, prompt, 1) for i, q, m in streams])
    start = time.perf_counter()
    outs = await defer.gatherResults(
        [
            generate(i, q, m, n, first, tokens)
            for (i, q, m), first in zip(streams, firsts, strict=True)
        ]
    )
    seconds = time.perf_counter() - start
    for inst, _, _ in streams:
        service.destroy_instance(inst)
    steps = max(len(out) for out in outs)
    if min(len(out) for out in outs) != tokens:
        raise SystemExit(f"a stream stopped early: {[len(o) for o in outs]} of {tokens} steps")
    return seconds / steps


def added_cost(vocab: Vocabulary, tokenizer, batch: int, repeats: int = 50) -> tuple[float, float]:
    """(host mask ms, engine masking ms) per step for `batch` rows, measured in isolation
    (steady figures on a shared machine, where whole-step timings are noisy)."""
    prefix = tokenizer.tokenize('{"notes": ["a cat", "a do')
    matchers = [vocab.matcher("json_schema", json.dumps(SCHEMA)) for _ in range(batch)]
    for m in matchers:
        assert m.consume(prefix)
    began = time.perf_counter()
    for _ in range(repeats):
        for m in matchers:
            m._mask = None  # (recompute, as after each consumed token)
            m.allowed()
    host = (time.perf_counter() - began) / repeats
    logits = torch.randn(batch, vocab.size)
    masked = [Sampling(allowed=m.allowed()) for m in matchers]
    plain = [Sampling() for _ in matchers]
    gen = torch.Generator()
    began = time.perf_counter()
    for _ in range(repeats):
        sample(logits, masked, gen)
    with_mask = (time.perf_counter() - began) / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        sample(logits, plain, gen)
    without = (time.perf_counter() - began) / repeats
    return host * 1000, (with_mask - without) * 1000


async def main(reactor, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    worker = load_worker(args.model or default_model_path(), dtype=args.dtype, reactor=reactor)
    service = ModelService(worker, reactor=reactor)
    size = (service.status() or {}).get("vocab_size") or service.info.vocab_size
    began = time.perf_counter()
    vocab = Vocabulary(service.tokenizer, size)
    print(f"token table for llguidance: {time.perf_counter() - began:.2f} s (once per model)")
    await run(service, vocab, args.batch, 4)  # warm up both paths
    await run(service, None, args.batch, 4)
    plain, constrained = [], []
    for _ in range(args.repeats):
        plain.append(await run(service, None, args.batch, args.tokens))
        constrained.append(await run(service, vocab, args.batch, args.tokens))
    p, c = min(plain), min(constrained)
    print(f"batch {args.batch}, {args.tokens} steps, dtype {args.dtype}, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(f"unconstrained: {p * 1000:.1f} ms/step   constrained: {c * 1000:.1f} ms/step")
    print(f"ratio constrained/unconstrained: {c / p:.3f}")
    host, engine = added_cost(vocab, service.tokenizer, args.batch)
    print(f"added per step, in isolation: host masks {host:.2f} ms, engine masking {engine:.2f} ms")
    await service.close()


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])
