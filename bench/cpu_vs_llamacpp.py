"""CPU serving: our engine vs llama-cpp-python on the same GGUF, prompts, threads and greedy decoding.

    PYTHONPATH=. .venv/bin/python bench/cpu_vs_llamacpp.py [--threads 2] [--new 128] [--streams 8]

Three figures, sides interleaved in one run (best of --repeats each):
- serving: --streams concurrent completions of --new tokens each through our
  model service (ModelService.generate: batched steps, greedy sampling in the
  worker) vs llama-cpp-python serving the same prompts one after another.
  Total generated tokens / wall time, prefill included (target >= 2.0x).
- batch-1 decode tokens/s: ours (one generation; (new-1) tokens over the time
  of a full generation minus that of a 1-token one) vs llama.cpp (time from
  the first token to the last) (target >= 1.0x).
- prefill: seconds to the first token of a --prefill (2,000) token prompt
  (target <= 1.0x llama.cpp's).
Before each run the bench waits up to --quiet-wait seconds for other processes
to leave the CPU (bench/decode.py's wait_for_quiet) and prints the load it saw:
on a shared 2-core machine llama.cpp's spinning OpenMP threads slow down by 10x
or more as soon as anything else runs, so only quiet runs are comparable.
Both sides get the same token ids (our tokenizer), run greedy, and never stop
early (no EOS check: exactly --new tokens each).

llama-cpp-python lives in its own virtual environment, /work/main/.bench-venv
(ignored by git, never a dependency of pie). If it is missing this script makes
it (`python -m venv .bench-venv && .bench-venv/bin/pip install llama-cpp-python`,
a source build of several minutes) and runs llama.cpp there, in a child process
that loads the model once and answers JSON requests on stdin/stdout.

--avx2 runs both sides as an AVX2-only CPU would, on this one: pie's kernels built with
PIE_CPU_MARCH=x86-64-v3, torch and oneDNN capped at AVX2 (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA: so `dtype auto` takes what it takes there), and llama.cpp from
.bench-venv-avx2, built with GGML_NATIVE=OFF GGML_AVX2=ON GGML_AVX512=OFF.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_VENV = os.path.join(ROOT, ".bench-venv")
AVX2_VENV = os.path.join(ROOT, ".bench-venv-avx2")
AVX2_ENV = {
    "PIE_CPU_MARCH": "x86-64-v3",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
AVX2_CMAKE = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
)
TOPICS = [
    "the ocean", "a lighthouse", "mountains", "a small robot", "the moon", "a library",
    "winter", "a train journey", "bees", "a city at night", "volcanoes", "a garden",
]  # fmt: skip


# --------------------------------------------------------------------------- the llama.cpp side


def llama_child(model: str, threads: int) -> None:
    """Runs in .bench-venv: serve requests {"prompts": [[ids]], "new": n} one JSON line each."""
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                n_batch=512, verbose=False)  # fmt: skip
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        stamps, outputs = [], []
        for prompt in request["prompts"]:  # one after another, as a single-stream server
            llm.reset()  # no prefix reuse from the previous request: every prompt is prefilled
            out = []
            for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
                out.append(token)
                stamps.append(time.perf_counter())
                if len(out) == request["new"]:
                    break
            outputs.append(out)
        seconds = time.perf_counter() - start
        first, last = stamps[0], stamps[-1]
        answer = {"seconds": seconds, "outputs": outputs, "decode_seconds": last - first}
        print(json.dumps(answer), flush=True)


class LlamaCpp:
    """The child process running llama.cpp in .bench-venv."""

    def __init__(self, model: str, threads: int, venv: str = BENCH_VENV) -> None:
        python = os.path.join(venv, "bin", "python")
        if not _has_llama_cpp(python):
            _make_bench_venv(venv)
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--llama-child", "--model", model,
             "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._read()

    def run(self, prompts: list[list[int]], new: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new": new}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp child process ended")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _has_llama_cpp(python: str) -> bool:
    if not os.path.exists(python):
        return False
    return subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def _make_bench_venv(venv: str) -> None:
    print(f"making {venv} with llama-cpp-python (a source build: minutes)", flush=True)
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = dict(os.environ, CMAKE_ARGS=AVX2_CMAKE) if venv == AVX2_VENV else None
    install = [python, "-m", "pip", "install", "--no-cache-dir", "llama-cpp-python==0.3.36"]
    subprocess.run(install, check=True, env=env)


def llama_version(venv: str = BENCH_VENV) -> str:
    python = os.path.join(venv, "bin", "python")
    probe = "import llama_cpp; print(llama_cpp.__version__)"
    return subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- our side


async def ours(service, prompts: list[list[int]], new: int) -> float:
    """Seconds for our model service to generate `new` tokens after each prompt, concurrently."""
    from twisted.internet import defer

    from pie.engine.batch import layout_of

    ps = service.kv_page_size
    runs = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        inst = f"bench-{i}-{time.monotonic_ns()}"
        q = service.create_queue(inst)
        pages = list(range(-(-(len(prompt) + new) // ps)))
        service.submit(inst, q, "allocate_kv_pages", pages)
        used, last = layout_of(ps, len(prompt))
        d = service.submit(
            inst, q, "generate", last, pages[:used], prompt, list(range(len(prompt))),
            pages[used:], 0.0, 0, 1.0, None, new, [],
        )  # fmt: skip
        d.addBoth(lambda result, inst=inst: (service.destroy_instance(inst), result)[1])
        runs.append(d)
    outputs = await defer.gatherResults(runs, consumeErrors=True)
    if any(len(o) != new for o in outputs):
        raise RuntimeError("a generation stopped early")
    return time.perf_counter() - start


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    from pie.runtime.chat_template import render

    out = []
    for i in range(n):
        request = f"Tell me a long story about {TOPICS[i % 12]}."
        if not tokenizer.chat_template:  # a base model (Gemma 3 270M): the plain text, after BOS
            bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
            out.append(bos + tokenizer.tokenize(request))
            continue
        text = render(
            tokenizer.chat_template,
            [{"role": "user", "content": request}],
            add_generation_prompt=True,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
        )
        out.append(tokenizer.tokenize(text))
    return out


def prefill_prompt(tokenizer, length: int) -> list[int]:
    """`length` token ids of repeated plain text (the same ids for both sides)."""
    words = " ".join(f"{t} is a fine subject for a story." for t in TOPICS)
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.tokenize(words + " ")
    return ids[:length]


async def run(reactor, opts) -> None:
    import torch
    from twisted.internet import threads

    from bench.decode import wait_for_quiet
    from pie.service.local import load_worker
    from pie.service.registry import default_model_path
    from pie.service.service import ModelService

    model = opts.model or default_model_path()
    worker = load_worker(model, device="cpu", num_pages=512)
    torch.set_num_threads(opts.threads)  # after the load: the engine sets the affinity count
    service = ModelService(worker, reactor=reactor)
    venv = AVX2_VENV if opts.avx2 else BENCH_VENV
    llama = LlamaCpp(model, opts.threads, venv)
    print(
        f"model {model}"
        + (f" (as an AVX2-only CPU: {AVX2_ENV}, llama.cpp {AVX2_CMAKE})" if opts.avx2 else "")
    )
    print(
        f"threads {opts.threads} (both sides), torch {torch.__version__}, "
        f"llama-cpp-python {llama_version(venv)}, ours {worker.info.dtype} on {worker.info.device}, "
        f"compute {getattr(worker.info, 'compute', {})}"
    )
    prompts = prompts_for(worker.tokenizer, opts.streams)
    print(f"{opts.streams} prompts of {[len(p) for p in prompts]} tokens, {opts.new} new each")
    await ours(service, prompts, 8)  # warm up both (llama.cpp's first calls are slow)
    for _ in range(2):
        await threads.deferToThread(llama.run, prompts, 8)
    serve_ours = serve_llama = decode_ours = decode_llama = 0.0
    total = opts.streams * opts.new
    loads: list[float] = []

    async def quiet() -> None:  # llama.cpp's spinning threads collapse when cores are shared
        loads.append(await threads.deferToThread(wait_for_quiet, opts.quiet_wait))

    for r in range(opts.repeats):
        await quiet()
        seconds = await ours(service, prompts, opts.new)
        await quiet()
        answer = await threads.deferToThread(llama.run, prompts, opts.new)
        row = [total / seconds, total / answer["seconds"]]
        await quiet()
        full = await ours(service, prompts[:1], opts.new)
        first = await ours(service, prompts[:1], 1)
        await quiet()
        answer = await threads.deferToThread(llama.run, prompts[:1], opts.new)
        row += [(opts.new - 1) / (full - first), (opts.new - 1) / answer["decode_seconds"]]
        print("  repeat {}: serving {:.1f} vs {:.1f} tok/s, batch-1 decode {:.1f} vs {:.1f} tok/s"
              " (other load before the runs: {})".format(
                  r + 1, *row, " ".join(f"{x:.2f}" for x in loads[-4:])), flush=True)  # fmt: skip
        serve_ours, serve_llama = max(serve_ours, row[0]), max(serve_llama, row[1])
        decode_ours, decode_llama = max(decode_ours, row[2]), max(decode_llama, row[3])
    long_prompt = prefill_prompt(worker.tokenizer, opts.prefill)
    prefill_ours = prefill_llama = float("inf")
    for _ in range(opts.repeats):
        await quiet()
        prefill_ours = min(prefill_ours, await ours(service, [long_prompt], 1))
        await quiet()
        answer = await threads.deferToThread(llama.run, [long_prompt], 1)
        prefill_llama = min(prefill_llama, answer["seconds"])
    print(f"{'':28} {'ours':>8} {'llama.cpp':>10} {'ratio':>7} {'target':>7}")
    print(
        f"{f'prefill {len(long_prompt)} tokens, s':28} {prefill_ours:8.2f} {prefill_llama:10.2f} "
        f"{prefill_ours / prefill_llama:7.2f} {'<= 1.0':>7}"
    )
    print(
        f"{f'{opts.streams} streams, total tok/s':28} {serve_ours:8.1f} {serve_llama:10.1f} "
        f"{serve_ours / serve_llama:7.2f} {'>= 2.0':>7}"
    )
    print(
        f"{'batch-1 decode tok/s':28} {decode_ours:8.1f} {decode_llama:10.1f} "
        f"{decode_ours / decode_llama:7.2f} {'>= 1.0':>7}"
    )
    llama.close()
    await worker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=2000, help="tokens of the prefill prompt")
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0,
        help="before each run wait up to this many seconds for other load to leave the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--avx2", action="store_true", help="both sides as on an AVX2-only CPU (see above)"
    )
    parser.add_argument("--llama-child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.llama_child:
        llama_child(opts.model, opts.threads)
        return 0
    if opts.avx2:  # before torch is imported: it reads these once
        os.environ.update(AVX2_ENV)
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(run(reactor, opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
