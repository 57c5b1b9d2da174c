"""Decode throughput: our engine's own decode loop vs Hugging Face `generate`, same model and machine.

    PYTHONPATH=. .venv/bin/python bench/decode.py [--model PATH] [--batch 1 8 32]

For each batch size B, B distinct prompts of --prompt tokens are prefilled and
then decoded greedily for --new tokens, one step at a time:
- ours: worker Forward jobs (the engine the worker thread runs), B items per
  job, greedy sampling on the device, pages of 16 slots;
- HF: LlamaForCausalLM.generate (sdpa, DynamicCache) on the same weights,
  dequantized, in the same activation dtype.
Decode tokens/s counts the tokens after the first one (the first comes out of
prefill) over the time from the first token to the last. Both sides use the
same torch thread count. The runs alternate between the two sides and the
best of --repeats is kept for each (other load on a shared machine only slows);
before each run the bench waits up to --quiet-wait seconds for other processes
to leave the CPU, and prints the mean load (in cores) it saw from them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from pie.engine.batch import Forward, ForwardItem, Sampling
from pie.engine.engine import Engine, create_engine
from pie.engine.hf_reference import hf_model
from pie.engine.loaders import load_model, resolve_dtype
from pie.service.registry import default_model_path

PAGE = 16
TEXT = (
    "Licensed under the Apache License, Version 2.0 (the License); you may not use this file "
    "except in compliance with the License. You may obtain a copy of the License at http://www."
    "apache.org/licenses/LICENSE-2.0. Unless required by applicable law or agreed to in writing, "
    "software distributed under the License is distributed on an AS IS BASIS, WITHOUT WARRANTIES "
    "OR CONDITIONS OF ANY KIND, either express or implied. See the License for the specific "
    "language governing permissions and limitations under the License. "
) * 8


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    ids = tokenizer.tokenize(TEXT)
    return [ids[3 * b : 3 * b + length] for b in range(batch)]


def ours(engine: Engine, batch_prompts: list[list[int]], new: int) -> float:
    """Decode tokens/s of the engine's own loop."""
    pages, lengths, last = [], [], []
    free = iter(range(engine.cache.num_pages))
    greedy = Sampling()
    items = []
    for p in batch_prompts:
        seq_pages = [next(free) for _ in range((len(p) + new + PAGE - 1) // PAGE)]
        pages.append(seq_pages)
        n = len(p)
        used = seq_pages[: (n + PAGE - 1) // PAGE]
        items.append(
            ForwardItem(
                pages=used,
                last_page_len=n - PAGE * (len(used) - 1),
                positions=list(range(n)),
                tokens=p,
                output_indices=[n - 1],
                sampling=greedy,
            )
        )
        lengths.append(n)
    last = [r[0] for r in engine.run(Forward(items))]
    start = time.perf_counter()
    for _ in range(new - 1):
        items = []
        for b, seq_pages in enumerate(pages):
            lengths[b] += 1
            n = lengths[b]
            used = seq_pages[: (n + PAGE - 1) // PAGE]
            items.append(
                ForwardItem(
                    pages=used,
                    last_page_len=n - PAGE * (len(used) - 1),
                    positions=[n - 1],
                    tokens=[last[b]],
                    output_indices=[0],
                    sampling=greedy,
                )
            )
        last = [r[0] for r in engine.run(Forward(items))]
    return len(batch_prompts) * (new - 1) / (time.perf_counter() - start)


def busy_cores(interval: float = 0.5) -> float:
    """CPU cores in use over `interval` (by others: this process sleeps meanwhile)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_for_quiet(limit_s: float, threshold: float = 0.3) -> float:
    """On a shared machine, wait (up to limit_s) until others use < threshold cores."""
    deadline = time.monotonic() + limit_s
    load = busy_cores()
    while load > threshold and time.monotonic() < deadline:
        load = busy_cores()
    return load


class _Stamps:
    """A generate() streamer that notes when each step's tokens come out."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def huggingface(model, batch_prompts: list[list[int]], new: int) -> float:
    stamps = _Stamps()
    ids = torch.tensor(batch_prompts)
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            streamer=stamps,
            pad_token_id=0,
        )
    first, last = stamps.times[1], stamps.times[-1]  # times[0] is the prompt itself
    return len(batch_prompts) * (new - 1) / (last - first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--new", type=int, default=24, help="new tokens per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="activation dtype for both sides")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="seconds to wait for other CPU load to settle before each run",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    loaded = load_model(path, dtype=torch.float32)
    engine = create_engine(
        loaded,
        device="cpu",
        dtype=dtype,
        num_pages=max(args.batch) * ((args.prompt + args.new) // PAGE + 1),
    )
    reference = hf_model(loaded, dtype)
    print(f"model {loaded.name} ({path})")
    print(
        f"device cpu, threads {args.threads}, dtype {str(dtype)[6:]}, "
        f"ours int4={engine.model.int4}, prompt {args.prompt}, new {args.new}"
    )
    warm = prompts(loaded.tokenizer, 2, 8)
    ours(engine, warm, 4)
    huggingface(reference, warm, 4)
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ours/HF':>8} {'other load':>10}")
    for batch in args.batch:
        batch_prompts = prompts(loaded.tokenizer, batch, args.prompt)
        mine = theirs = 0.0
        loads = []
        for _ in range(args.repeats):  # interleaved, so load from elsewhere hits both sides
            loads.append(wait_for_quiet(args.quiet_wait))
            mine = max(mine, ours(engine, batch_prompts, args.new))
            loads.append(wait_for_quiet(args.quiet_wait))
            theirs = max(theirs, huggingface(reference, batch_prompts, args.new))
        foreign = sum(loads) / len(loads)
        print(
            f"{batch:5d} {mine:11.1f} {theirs:9.1f} {mine / theirs:8.2f} {foreign:9.2f}c",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
