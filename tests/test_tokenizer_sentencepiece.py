"""SentencePiece GGUF tokenizers (tokenizer.ggml.model = llama) equal llama.cpp's SPM algorithm.

The oracle is llama.cpp's llm_tokenizer_spm written out plainly: split the
(escaped) text into characters, repeatedly merge the adjacent pair whose
concatenation is a piece with the highest score (leftmost on ties), then
spell every symbol that is not a piece as its <0xXX> byte tokens. Control and
user-defined tokens written in the text are matched first. The real Gemma 3
vocabulary is compared with llama.cpp itself in tests/test_model_gemma3.py.
"""

from __future__ import annotations

import random

from twisted.trial.unittest import TestCase

from pie.engine.tokenizer import (
    GGUF_BYTE,
    GGUF_CONTROL,
    GGUF_NORMAL,
    GGUF_USER_DEFINED,
    SPM_SPACE,
    Tokenizer,
)

ALPHABET = "ab▁cé"
SPECIALS = [("<bos>", GGUF_CONTROL), ("<eos>", GGUF_CONTROL), ("<turn>", GGUF_CONTROL)]
USER = [("\n\n", GGUF_USER_DEFINED)]


def vocabulary(seed: int = 0):
    """A random SentencePiece-like vocabulary: specials, 256 byte pieces, chars and merges."""
    rng = random.Random(seed)
    tokens = ["<unk>"] + [t for t, _ in SPECIALS + USER]
    types = [2] + [k for _, k in SPECIALS + USER]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [GGUF_BYTE] * 256
    pieces = set("ab▁c")  # "é" only by byte fallback
    while len(pieces) < 60:
        pieces.add("".join(rng.choice("ab▁c") for _ in range(rng.randint(2, 5))))
    pieces = sorted(pieces)
    tokens += pieces
    types += [GGUF_NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [rng.uniform(-10, 0) for _ in pieces]
    return tokens, scores, types


def metadata(tokens, scores, types, add_space_prefix: bool):
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
        "tokenizer.ggml.add_bos_token": True,
    }


def spm_reference(text: str, tokens, scores, types, add_space_prefix: bool) -> list[int]:
    """llama.cpp's SPM tokenization (with special tokens parsed), written out plainly."""
    ids = {t: i for i, t in enumerate(tokens)}
    matched = [
        t for t, k in zip(tokens, types, strict=True) if k in (GGUF_CONTROL, GGUF_USER_DEFINED)
    ]
    out: list[int] = []
    after_special = True  # llama.cpp prefixes the first fragment and every one after a special
    while text:
        cut = min(
            ((text.find(m), -len(m), m) for m in matched if m in text), default=(len(text), 0, "")
        )
        start, _, special = cut
        if start > 0:
            out += _spm_fragment(text[:start], ids, scores, add_space_prefix and after_special)
            after_special = False
        if special:
            out.append(ids[special])
            after_special = True
        text = text[start + len(special) :]
    return out


def _spm_fragment(text, ids, scores, prefix) -> list[int]:
    text = (" " + text if prefix else text).replace(" ", SPM_SPACE)
    symbols = list(text)
    normal = lambda s: s in ids and not s.startswith("<")  # noqa: E731
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if normal(merged) and (best is None or scores[ids[merged]] > scores[ids[best[1]]]):
                best = (i, merged)
        if best is None:
            break
        i, merged = best
        symbols[i : i + 2] = [merged]
    out = []
    for s in symbols:
        if normal(s):
            out.append(ids[s])
        else:
            out += [ids[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
    return out


class SentencePieceGGUF(TestCase):
    def check(self, add_space_prefix: bool, seed: int):
        tokens, scores, types = vocabulary(seed)
        tok = Tokenizer.from_gguf_metadata(metadata(tokens, scores, types, add_space_prefix))
        rng = random.Random(seed + 100)
        chars = "ab c  é\n" + "abc"
        for _ in range(300):
            text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 24)))
            if rng.random() < 0.3:
                text = text + rng.choice(["<turn>", "<eos>", "\n\n"]) + text[::-1]
            want = spm_reference(text, tokens, scores, types, add_space_prefix)
            self.assertEqual(tok.tokenize(text), want, repr(text))
            if not add_space_prefix:
                self.assertEqual(tok.detokenize(want), text)

    def test_equal_to_llama_cpp_spm_without_space_prefix(self):
        for seed in range(3):
            self.check(False, seed)

    def test_equal_to_llama_cpp_spm_with_space_prefix(self):
        for seed in range(3):
            self.check(True, seed)

    def test_decoding_bytes_and_specials(self):
        tokens, scores, types = vocabulary(0)
        tok = Tokenizer.from_gguf_metadata(metadata(tokens, scores, types, False))
        ids = tok.tokenize("a é<turn>\n\nb")
        self.assertEqual(tok.detokenize(ids), "a é<turn>\n\nb")
        self.assertEqual(tok.bos_token_id, 1)
        self.assertIn(tokens.index("<turn>"), tok.special_ids)
        self.assertNotIn(tokens.index("\n\n"), tok.special_ids)  # user-defined pieces are text
