"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF): HF-equal logits, sensible greedy text,
a tokenizer that matches llama.cpp (issue 3, points 1 and 6). Skipped when the model is not cached."""

from __future__ import annotations

import pytest
import torch
from twisted.trial.unittest import SkipTest, TestCase

from pie.engine.batch import Forward, ForwardItem, Sampling
from pie.engine.engine import create_engine
from pie.engine.hf_reference import hf_model
from pie.engine.loaders import load_model
from pie.interfaces import PieError
from pie.runtime.chat_template import render_for
from pie.service.registry import default_model_path

pytestmark = pytest.mark.slow


PS = 16
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
_CACHE: dict = {}


def smollm2():
    if "loaded" not in _CACHE:
        try:
            path = default_model_path()
        except PieError as e:
            raise SkipTest(f"SmolLM2 is not in the model cache ({e})") from None
        _CACHE["loaded"] = load_model(path, dtype="float32")
    return _CACHE["loaded"]


def prefill_item(pages, ids, **kw) -> ForwardItem:
    n = len(ids)
    return ForwardItem(
        pages=pages,
        last_page_len=n - PS * (len(pages) - 1),
        positions=list(range(n)),
        tokens=ids,
        **kw,
    )


def greedy_text(engine, prompt_ids: list[int], limit: int = 24) -> str:
    """Decode greedily with the fast path (sampling on the worker) until <|im_end|>."""
    pages = list(range(8))
    n = len(prompt_ids)
    used = pages[: (n + PS - 1) // PS]
    [[token]] = engine.run(
        Forward([prefill_item(used, prompt_ids, output_indices=[n - 1], sampling=Sampling())])
    )
    out = []
    while token not in engine.tokenizer.eos_token_ids and len(out) < limit:
        out.append(token)
        n += 1
        used = pages[: (n + PS - 1) // PS]
        [[token]] = engine.run(
            Forward(
                [
                    ForwardItem(
                        pages=used,
                        last_page_len=n - PS * (len(used) - 1),
                        positions=[n - 1],
                        tokens=[token],
                        output_indices=[0],
                        sampling=Sampling(),
                    )
                ]
            )
        )
    return engine.tokenizer.detokenize(out)


class SmolLM2(TestCase):
    def setUp(self):
        self.loaded = smollm2()
        self.tok = self.loaded.tokenizer
        self.prompt = self.tok.tokenize(render_for(self.tok, FRANCE, add_generation_prompt=True))

    def test_logits_match_hugging_face(self):
        """Prefill on shuffled pages, then decode steps: top-64 ids and probabilities equal HF's."""
        reference = hf_model(self.loaded)
        engine = create_engine(self.loaded, device="cpu", dtype="float32", num_pages=16)
        ids = list(self.prompt)
        pages = [11, 3, 7]
        [[dist]] = engine.run(Forward([prefill_item(pages, ids, output_indices=[len(ids) - 1])]))
        for _ in range(4):
            with torch.no_grad():
                probs = torch.softmax(reference(torch.tensor([ids])).logits[0, -1].float(), -1)
            top = torch.topk(probs, 64)
            self.assertEqual(dist[0][:10], top.indices.tolist()[:10])
            diff = (torch.tensor(dist[1]) - top.values).abs().max().item()
            self.assertLess(diff, 1e-5)
            ids.append(dist[0][0])
            n = len(ids)
            [[dist]] = engine.run(
                Forward(
                    [
                        ForwardItem(
                            pages=pages,
                            last_page_len=n - 32,
                            positions=[n - 1],
                            tokens=[ids[-1]],
                            output_indices=[0],
                        )
                    ]
                )
            )

    def test_greedy_answer_mentions_paris(self):
        engine = create_engine(self.loaded, device="cpu", dtype="float32", num_pages=16)
        self.assertIn("Paris", greedy_text(engine, self.prompt))

    def test_int4_bfloat16_agrees_with_float32(self):
        """The int4/bf16 path's next-token choices agree with fp32 on a fixed text.

        Greedy text in low precision drifts with any rounding (and differs between CPUs with
        and without AVX512-BF16), so this compares distributions position by position instead.
        """
        fp32 = create_engine(self.loaded, device="cpu", dtype="float32", num_pages=64)
        int4 = create_engine(self.loaded, device="cpu", dtype="bfloat16", num_pages=64)
        self.assertTrue(int4.model.int4)
        ids = self.tok.tokenize(AGREEMENT_TEXT)[: 60 * PS]
        pages = list(range((len(ids) + PS - 1) // PS))
        item = prefill_item(pages, ids, output_indices=list(range(len(ids))))
        [want] = fp32.run(Forward([item]))
        [got] = int4.run(Forward([item]))
        agree = sum(w[0][0] == g[0][0] for w, g in zip(want, got, strict=True))
        self.assertGreater(len(ids), 400)
        self.assertGreaterEqual(agree / len(ids), 0.9, f"{agree}/{len(ids)} top-1 agree")
        # Where fp32's choice is clear (its top token leads the next by 0.2 or more),
        # int4/bf16 makes the same choice; near-ties (0.506 vs 0.493, seen on an AMD EPYC)
        # may go either way under any rounding.
        confident = [(w, g) for w, g in zip(want, got, strict=True) if w[1][0] - w[1][1] >= 0.2]
        self.assertGreater(len(confident), 100)
        for w, g in confident:
            self.assertEqual(w[0][0], g[0][0])
            self.assertLess(abs(w[1][0] - g[1][0]), 0.25)


AGREEMENT_TEXT = """<|im_start|>user
Explain how a bicycle works, then list the planets of the solar system in order.<|im_end|>
<|im_start|>assistant
A bicycle turns the push of your legs into forward motion. The pedals turn a crank, the crank
turns the front sprocket, and a chain carries that motion to the rear wheel. Gears change how far
the wheel turns for each turn of the pedals, so you can climb hills slowly or ride fast on flat
roads. Brakes press pads against the rim or a disc to slow the wheels, and you balance by steering
into the direction you are falling.

The planets of the solar system, in order from the Sun, are Mercury, Venus, Earth, Mars, Jupiter,
Saturn, Uranus and Neptune. Mercury is the smallest and closest to the Sun. Venus is the hottest
because its thick atmosphere traps heat. Earth is the only planet known to support life. Mars is
called the Red Planet because of the iron oxide on its surface. Jupiter is the largest planet, a gas
giant with a great red storm. Saturn is famous for its bright rings of ice and rock. Uranus rotates
on its side, and Neptune has the strongest winds in the solar system.<|im_end|>
<|im_start|>user
What is the capital of France, and what is it known for?<|im_end|>
<|im_start|>assistant
The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum, which holds the
Mona Lisa, the cathedral of Notre-Dame, wide boulevards, cafes, fashion and food. The river Seine
runs through the city, and many bridges cross it. Paris has been a centre of art, science and
politics for centuries.<|im_end|>
<|im_start|>user
Count from one to twenty in words.<|im_end|>
<|im_start|>assistant
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, fourteen,
fifteen, sixteen, seventeen, eighteen, nineteen, twenty.<|im_end|>
"""


class SmolLM2Tokenizer(TestCase):
    def setUp(self):
        self.tok = smollm2().tokenizer

    def test_chat_prompt_ids(self):
        text = render_for(self.tok, FRANCE, add_generation_prompt=True)
        self.assertTrue(
            text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        )
        self.assertTrue(text.endswith("<|im_start|>assistant\n"))
        ids = self.tok.tokenize(text)
        self.assertEqual(len(ids), 37)
        self.assertEqual(ids[:7], [1, 9690, 198, 2683, 359, 253, 5356])

    def test_special_tokens_in_text_and_eos(self):
        self.assertEqual(self.tok.tokenize("<|im_end|>"), [2])
        self.assertEqual(self.tok.tokenize("a<|im_start|>b")[1], 1)
        self.assertIn(2, self.tok.eos_token_ids)

    def test_digits_split_like_llama_cpp(self):
        """SmolLM2 splits digits one by one, and '  4444' keeps its two spaces together."""
        pieces = [self.tok.detokenize([i]) for i in self.tok.tokenize("  4444")]
        self.assertEqual(pieces, ["  ", "4", "4", "4", "4"])

    def test_round_trip_and_vocab_bytes(self):
        for text in [
            "héllo wörld 🙂",
            "def f(x):\n\treturn x  # ok",
            "<|im_start|>user\nhi<|im_end|>",
        ]:
            self.assertEqual(self.tok.detokenize(self.tok.tokenize(text)), text)
        ids, pieces = self.tok.vocabs()
        self.assertNotIn(0, ids)  # <|endoftext|> is special
        self.assertEqual(pieces[ids.index(self.tok.tokenize(" the")[0])], b" the")
        emoji = self.tok.tokenize("🙂")
        self.assertEqual(b"".join(pieces[ids.index(i)] for i in emoji), "🙂".encode())
        with self.assertRaisesRegex(PieError, "unknown token id"):
            self.tok.detokenize([49152])
