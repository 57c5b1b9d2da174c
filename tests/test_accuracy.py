"""Accuracy of the default CPU path (dtype auto) against the float32 reference.

The default path: the int4 layers run pie's float32 kernels (exact; torch's bf16
int4 kernel where they do not build), one sequence's decode step is the fused call,
the LM head is int4 with its top 64 logits rescored exactly, and on CPUs with native
bf16 the many-row GEMMs run in bf16. Greedy
text in low precision drifts with any rounding and differs between CPUs, so
this compares next-token distributions position by position over a fixed
corpus (tests/fixtures/accuracy_corpus: the repo's docs, code and a chat, 2,100
positions), teacher-forced, by tolerance only, on any CPU (AVX2 or AVX512).

Bounds: top-1 agreement >= 97% overall and >= 99% where fp32's top token leads
the next by 0.1 or more (near-ties flip under any rounding: all-bf16 agrees on
96.9%), mean KL(fp32 || ours) < 0.02 nats, p99 KL < 0.1, the log-prob of
fp32's top token within 0.5. Measured on AMD EPYC (AVX512-BF16), SmolLM2-135M
Q4_1: see docs/benchmarks.md.
"""

from __future__ import annotations

import glob
import os
from unittest import mock

import pytest
import torch
from twisted.trial.unittest import SkipTest, TestCase

from pie.engine.batch import Forward, ForwardItem
from pie.engine.engine import Engine, create_engine
from pie.engine.loaders import load_model
from pie.engine.quant import Int4OrDenseLinear
from pie.interfaces import PieError
from pie.service.registry import default_model_path

pytestmark = pytest.mark.slow

PS = 16
TOKENS_PER_TEXT = 420
CLEAR_LEAD = 0.1  # fp32's top token leads the next by this much probability
CORPUS = os.path.join(os.path.dirname(__file__), "fixtures", "accuracy_corpus")
_CACHE: dict = {}


def corpus_and_reference():
    """The loaded model, the corpus token ids, and fp32 log-probs for every position (cached)."""
    if "loaded" not in _CACHE:
        try:
            path = default_model_path()
        except PieError as e:
            raise SkipTest(f"SmolLM2 is not in the model cache ({e})") from None
        loaded = load_model(path, dtype="float32")
        texts = corpus_text_ids(loaded.tokenizer)
        fp32 = create_engine(loaded, device="cpu", dtype="float32", num_pages=len(texts) * 32)
        _CACHE.update(loaded=loaded, texts=texts, reference=corpus_logprobs(fp32, texts, 210))
    return _CACHE["loaded"], _CACHE["texts"], _CACHE["reference"]


def corpus_text_ids(tokenizer, bos: int | None = None) -> list[list[int]]:
    """The first TOKENS_PER_TEXT token ids of each corpus text (after `bos`, where given)."""
    texts = []
    for name in sorted(glob.glob(os.path.join(CORPUS, "*"))):
        with open(name, encoding="utf-8") as f:
            ids = ([] if bos is None else [bos]) + tokenizer.tokenize(f.read())
        texts.append(ids[:TOKENS_PER_TEXT])
    return texts


def corpus_items(texts: list[list[int]], start: int, step: int) -> list[ForwardItem]:
    """Tokens start..start+step of every text (text i on its own pages), a row for each."""
    pages_per_text = (TOKENS_PER_TEXT + PS - 1) // PS
    items = []
    for i, ids in enumerate(texts):
        end = min(start + step, len(ids))
        pages = list(range(i * pages_per_text, i * pages_per_text + (end + PS - 1) // PS))
        items.append(
            ForwardItem(
                pages=pages,
                last_page_len=end - PS * (len(pages) - 1),
                positions=list(range(start, end)),
                tokens=ids[start:end],
                output_indices=list(range(end - start)),
            )
        )
    return items


def forward_logits(engine: Engine, items: list[ForwardItem]) -> list[torch.Tensor]:
    """Each item's float32 logits from one forward, as the model returns them before sampling."""
    captured: list[torch.Tensor] = []
    forward = engine.model.forward

    def spy(*args, **kwargs):
        logits = forward(*args, **kwargs)
        captured.append(logits.float())
        return logits

    engine.model.forward = spy
    try:
        engine.run(Forward(items))
    finally:
        engine.model.forward = forward
    [logits] = captured
    return list(logits.split([len(item.tokens) for item in items]))


def corpus_logprobs(engine: Engine, texts: list[list[int]], step: int) -> torch.Tensor:
    """[positions, vocab] fp32 log-probs of each text's next token, `step` new tokens per text
    per forward (all texts in one batch)."""
    per_text: list[list[torch.Tensor]] = [[] for _ in texts]
    for start in range(0, TOKENS_PER_TEXT, step):
        for i, logits in enumerate(forward_logits(engine, corpus_items(texts, start, step))):
            per_text[i].append(logits)
    return torch.log_softmax(torch.cat([t for parts in per_text for t in parts]), dim=-1)


def position_stats(reference: torch.Tensor, got: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position: KL(reference || got), top-1 agreement, whether the reference's top token
    leads clearly, and the error of got's log-prob of that token (inputs: log-probs)."""
    kl = (reference.exp() * (reference - got)).sum(dim=-1).clamp_min(0)
    top = reference.argmax(dim=-1, keepdim=True)
    first, second = reference.exp().topk(2, dim=-1).values.unbind(-1)
    return {
        "kl": kl,
        "agree": got.argmax(dim=-1) == top[:, 0],
        "clear": first - second >= CLEAR_LEAD,
        "top_err": (reference.gather(1, top) - got.gather(1, top)).abs()[:, 0],
    }


def summarise(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    agree, clear, kl = stats["agree"], stats["clear"], stats["kl"]
    return {
        "agree": agree.float().mean().item(),
        "agree_where_clear": agree[clear].float().mean().item(),
        "clear": clear.float().mean().item(),
        "mean_kl": kl.mean().item(),
        "p99_kl": kl.quantile(0.99).item(),
        "max_top_logprob_err": stats["top_err"].max().item(),
    }


def compare(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    return summarise(position_stats(reference, got))


class DefaultPathAccuracyTests(TestCase):
    """dtype auto vs float32 over the corpus: prefill-sized and decode-sized forwards."""

    def setUp(self):
        self.loaded, self.texts, self.reference = corpus_and_reference()
        self.assertGreaterEqual(self.reference.shape[0], 2000)

    def check(self, few_row_kernels: bool) -> dict[str, float]:
        engine = create_engine(
            self.loaded, device="cpu", dtype="auto", num_pages=len(self.texts) * 32
        )
        rows = 10**9 if few_row_kernels else 0
        with mock.patch.object(Int4OrDenseLinear, "MAX_INT4_ROWS", rows):
            got = corpus_logprobs(engine, self.texts, 105)
        stats = compare(self.reference, got)
        message = f"{engine.model.path_description()}, few-row kernels {few_row_kernels}: {stats}"
        print(message)
        self.assertGreaterEqual(stats["agree"], 0.97, message)
        self.assertGreaterEqual(stats["agree_where_clear"], 0.99, message)
        self.assertGreater(stats["clear"], 0.5, message)
        self.assertLess(stats["mean_kl"], 0.02, message)
        self.assertLess(stats["p99_kl"], 0.1, message)
        self.assertLess(stats["max_top_logprob_err"], 0.5, message)
        return stats

    def test_decode_kernels(self):
        """The int4 kernels and the rescored int4 head (what decode runs), on every row."""
        self.check(few_row_kernels=True)

    def test_fused_batch_1_decode(self):
        """One text at a time, a token per forward: the fused decode step (pie.engine.cpu_decode)
        where it runs, with the int4 head; top-1 agreement >= 99% on every position."""
        engine = create_engine(self.loaded, device="cpu", dtype="auto", num_pages=32)
        per_text = []
        for ids in self.texts:
            rows = []
            for start in range(len(ids)):
                [logits] = forward_logits(engine, corpus_items([ids], start, 1))
                rows.append(logits)
            per_text.append(torch.cat(rows))
        stats = compare(self.reference, torch.log_softmax(torch.cat(per_text), dim=-1))
        fused = engine.model.fused
        message = f"{engine.model.path_description()}, fused steps {fused and fused.steps}: {stats}"
        print(message)
        if fused is not None:
            self.assertEqual(fused.steps, self.reference.shape[0], "every step was fused")
        self.assertGreaterEqual(stats["agree"], 0.99 if fused else 0.97, message)
        self.assertGreaterEqual(stats["agree_where_clear"], 0.99, message)
        self.assertLess(stats["mean_kl"], 0.02, message)
        self.assertLess(stats["max_top_logprob_err"], 0.5, message)

    def test_prefill_gemms(self):
        """The dense GEMMs (bf16 or fp32 by CPU) and dense head that prefill runs."""
        self.check(few_row_kernels=False)
