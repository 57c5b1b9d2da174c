"""pie.runtime.grammar over the real SmolLM2 tokenizer (issue 13, point 1): every grammar
kind compiles, masks follow the grammar token by token, special tokens are only the
end-of-sequence when the grammar may end, malformed grammars carry the library's text."""

from __future__ import annotations

import json

import pytest
from twisted.trial.unittest import SkipTest, TestCase

from pie.interfaces import PieError
from pie.runtime.grammar import GrammarError, Vocabulary, allows, compile_grammar
from tests.runtime_doubles import CharTokenizer

pytestmark = pytest.mark.slow  # reads the tokenizer out of the model file

_CACHE: dict = {}


def smollm2_tokenizer():
    if "tokenizer" not in _CACHE:
        from gguf import GGUFReader

        from pie.engine.loaders.gguf_loader import read_metadata
        from pie.engine.tokenizer import Tokenizer
        from pie.service.registry import default_model_path

        try:
            path = default_model_path()
        except PieError as e:
            raise SkipTest(f"SmolLM2 is not in the model cache ({e})") from None
        _CACHE["tokenizer"] = Tokenizer.from_gguf_metadata(read_metadata(GGUFReader(path)))
    return _CACHE["tokenizer"]


def vocabulary() -> Vocabulary:
    if "vocab" not in _CACHE:
        _CACHE["vocab"] = Vocabulary(smollm2_tokenizer(), 49152)
    return _CACHE["vocab"]


def allowed_ids(mask: bytes, size: int) -> list[int]:
    return [i for i in range(size) if allows(mask, i)]


def drive(matcher, tokenizer, text: str) -> bool:
    """Feed text's tokens one by one, each checked against the mask first."""
    for token in tokenizer.tokenize(text):
        if not allows(matcher.allowed(), token):
            return False
        if not matcher.consume([token]):
            return False
    return True


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


class GrammarTests(TestCase):
    def setUp(self):
        self.tok = smollm2_tokenizer()
        self.vocab = vocabulary()

    def test_json_schema_follows_the_schema(self):
        m = self.vocab.matcher("json_schema", json.dumps(SCHEMA))
        text = '{"name": "Ann", "age": 3, "tags": ["a"]}'
        self.assertTrue(drive(m, self.tok, text))
        self.assertTrue(m.is_accepting())
        eos = self.vocab.eos_token_ids[0]
        self.assertTrue(allows(m.allowed(), eos))
        self.assertTrue(m.consume([eos]))
        self.assertTrue(m.is_stopped())

    def test_json_is_laid_out_as_json_dumps_writes_it(self):
        m = self.vocab.matcher("json_schema", json.dumps(SCHEMA))
        self.assertFalse(drive(m, self.tok, '{\n"name"'))
        m = self.vocab.matcher("json", "")
        self.assertTrue(drive(m, self.tok, '{"a": [1, 2]}'))

    def test_json_schema_rejects_an_extra_property(self):
        m = self.vocab.matcher("json_schema", json.dumps(SCHEMA))
        self.assertFalse(drive(m, self.tok, '{"nick": 1}'))

    def test_masks_hold_no_special_token_but_the_end_when_accepting(self):
        m = self.vocab.matcher("json", "")
        first = allowed_ids(m.allowed(), self.vocab.size)
        self.assertTrue(first)
        self.assertFalse(set(first) & self.tok.special_ids)
        self.assertTrue(drive(m, self.tok, "{}"))
        after = set(allowed_ids(m.allowed(), self.vocab.size))
        self.assertEqual(after & self.tok.special_ids, set(self.vocab.eos_token_ids))

    def test_regex(self):
        m = self.vocab.matcher("regex", r"\d{4}-\d{2}-\d{2}")
        self.assertTrue(drive(m, self.tok, "2024-01-31"))
        self.assertTrue(m.is_accepting())
        self.assertFalse(drive(self.vocab.matcher("regex", r"\d{4}"), self.tok, "20a"))

    def test_lark(self):
        m = self.vocab.matcher("lark", 'start: "yes" | "no" " way"')
        self.assertTrue(drive(m, self.tok, "no way"))
        self.assertTrue(m.is_accepting())

    def test_choice(self):
        m = self.vocab.matcher("choice", json.dumps(["red", 'green "x"']))
        self.assertTrue(drive(m, self.tok, 'green "x"'))
        self.assertTrue(m.is_accepting())
        self.assertFalse(drive(self.vocab.matcher("choice", '["red"]'), self.tok, "blue"))

    def test_rollback(self):
        m = self.vocab.matcher("choice", json.dumps(["abc", "abd"]))
        start = m.allowed()
        self.assertTrue(drive(m, self.tok, "abc"))
        consumed = len(self.tok.tokenize("abc"))
        m.rollback(consumed)
        self.assertEqual(m.allowed(), start)
        self.assertTrue(drive(m, self.tok, "abd"))

    def test_consume_refuses_a_disallowed_token(self):
        m = self.vocab.matcher("regex", "a+")
        (b,) = self.tok.tokenize("b")
        self.assertFalse(allows(m.allowed(), b))
        self.assertFalse(m.consume([b]))

    def test_malformed_grammars_carry_the_library_message(self):
        cases = [
            ("json_schema", '{"type": "objec"}', "objec"),
            ("json_schema", '{"type": ', "not JSON"),
            ("regex", "[a-", "unclosed character class"),
            ("lark", "start: x\n", 'unknown name: "x"'),
            ("choice", "[]", "non-empty list"),
            ("yaml", "", "unknown grammar kind"),
        ]
        for kind, source, text in cases:
            with self.assertRaises(GrammarError) as caught:
                self.vocab.matcher(kind, source)
            self.assertIn(text, str(caught.exception), kind)

    def test_mask_width_is_the_model_vocabulary(self):
        wide = Vocabulary(self.tok, 49152 + 64)  # a padded embedding
        mask = wide.matcher("regex", ".*").allowed()
        self.assertEqual(len(mask), (49152 + 64 + 31) // 32 * 4)
        self.assertFalse(any(allows(mask, i) for i in range(49152, 49152 + 64)))


class TinyVocabularyTests(TestCase):
    """The plumbing on a one-byte-per-token tokenizer (no model file)."""

    def test_char_tokenizer(self):
        vocab = Vocabulary(CharTokenizer(), 128)
        m = vocab.matcher("regex", "ab")
        self.assertEqual(allowed_ids(m.allowed(), 128), [ord("a")])
        self.assertEqual(compile_grammar("regex", "ab"), compile_grammar("regex", "ab"))
