"""Grammar-constrained decoding on the host: the one module that knows llguidance.

A grammar (JSON Schema, any JSON object, a regular expression, a Lark grammar
or a choice among strings) is compiled into a token matcher over the model's
real vocabulary: every token id's bytes, special tokens included (llguidance
marks those with a leading 0xFF byte so no grammar text can spell them; the
end-of-sequence token is allowed exactly when the grammar may end). Ids past
the tokenizer's vocabulary (a padded embedding) get placeholder special
names and are never allowed.

The matcher's mask is a packed bitmask, the wire form the engine applies to
full-vocabulary logits: little-endian 32-bit words, bit i of the whole byte
string (byte i // 8, bit i % 8) set when token i is allowed. It is plain
bytes so it travels in a pie.engine.batch job like any other field.

On the fast path a step's mask is computed on a grammar thread
(`Matcher.allowed_soon`) while the engine runs that step's forward pass:
llguidance releases the GIL while it computes a mask (compute_bitmask runs in
py.allow_threads), and the engine joins the mask only before sampling.

Why llguidance (see docs/grammar.md): abi3 wheels (one wheel for every
CPython), no torch dependency (the runtime must not import torch), masks in
tens of microseconds for JSON, Lark and regex grammars alike, and
`rollback(n)` for speculative paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance

from pie.interfaces import PieError

KINDS = ("json_schema", "json", "regex", "lark", "choice")
"""The grammar kinds `compile_grammar` accepts (the SDK's Grammar constructors)."""

MAX_MATCHERS = 256
"""Live matchers one instance may hold (each holds a parser state on the host)."""

ANY_JSON_OBJECT = {"type": "object"}

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON is written as json.dumps writes it: llguidance's default lets whitespace run freely
between tokens, and a sampled model can fill its whole budget with newlines. A schema's own
"x-guidance" options override these."""


MASK_THREADS = min(4, os.cpu_count() or 1)
"""Threads that compute fast-path masks (a batch's matchers compute side by side)."""

_mask_pool: ThreadPoolExecutor | None = None


def _masks() -> ThreadPoolExecutor:
    global _mask_pool
    if _mask_pool is None:
        _mask_pool = ThreadPoolExecutor(MASK_THREADS, thread_name_prefix="pie-grammar")
    return _mask_pool


class GrammarError(PieError):
    """A grammar the library refused; the text is the library's message."""


def compile_grammar(kind: str, source: str) -> str:
    """The llguidance grammar (its JSON text) for a grammar of `kind`.

    `source` is the JSON Schema text (json_schema), ignored (json), the
    pattern (regex), the Lark text (lark) or a JSON list of strings (choice).
    Raises GrammarError with the library's message when it is malformed.
    """
    if kind == "json_schema":
        try:
            schema = json.loads(source)
        except ValueError as e:
            raise GrammarError(f"the JSON Schema is not JSON: {e}") from None
        grammar = _library(llguidance.LLMatcher.grammar_from_json_schema, schema, JSON_LAYOUT)
    elif kind == "json":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, JSON_LAYOUT)
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(source)
    elif kind == "lark":
        grammar = llguidance.LLMatcher.grammar_from_lark(source)
    elif kind == "choice":
        grammar = llguidance.LLMatcher.grammar_from_lark(_choice_lark(source))
    else:
        raise GrammarError(f"unknown grammar kind {kind!r} (one of {', '.join(KINDS)})")
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"bad {kind} grammar: {problem.strip()}")
    return grammar


def _library(compile_, *args) -> str:
    try:
        return compile_(*args)
    except (ValueError, TypeError, RuntimeError) as e:
        raise GrammarError(str(e)) from None


def _choice_lark(source: str) -> str:
    try:
        options = json.loads(source)
    except ValueError as e:
        raise GrammarError(f"a choice is a JSON list of strings: {e}") from None
    if not (
        isinstance(options, list) and options and all(isinstance(o, str) and o for o in options)
    ):
        raise GrammarError("a choice needs a non-empty list of non-empty strings")
    # Lark string literals take JSON's escapes.
    return "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options) + "\n"


class Vocabulary:
    """A model's token table as llguidance sees it; build once per model (about 0.1 s).

    `tokenizer` is an ITokenizer (its `token_table()` gives every id's bytes
    and the special ids); `vocab_size` is the width of the model's logits.
    """

    def __init__(self, tokenizer, vocab_size: int) -> None:
        pieces, special = tokenizer.token_table()
        tokens: list[bytes] = []
        for i in range(vocab_size):
            piece = pieces[i] if i < len(pieces) else None
            if piece is None:
                tokens.append(b"\xff" + f"<[{i}]>".encode())
            elif i in special:
                tokens.append(b"\xff" + piece)
            else:
                tokens.append(piece)
        eos = [i for i in tokenizer.eos_token_ids if i < vocab_size]
        if not eos:
            raise PieError("grammars need a model with an end-of-sequence token")
        self.size = vocab_size
        self.eos_token_ids = eos
        wrapper = llguidance.TokenizerWrapper(_Encoder(tokenizer, tokens, sorted(special), eos[0]))
        self._lltokenizer = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)

    def matcher(self, kind: str, source: str) -> Matcher:
        """A fresh matcher for a grammar (GrammarError if it is malformed)."""
        grammar = compile_grammar(kind, source)
        inner = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if inner.is_error():
            raise GrammarError(f"bad {kind} grammar: {inner.get_error().strip()}")
        return Matcher(inner, self.size)


class _Encoder:
    """What llguidance.TokenizerWrapper reads: the token bytes and an encoder."""

    bos_token_id = None

    def __init__(self, tokenizer, tokens: list[bytes], special: list[int], eos: int) -> None:
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = eos

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.tokenize(text)


class Matcher:
    """One grammar's parser state over one vocabulary.

    At most one mask computation is in flight (`allowed_soon`); every other
    method waits for it first, so the matcher is never used from two threads
    at once and a consumed token is always applied before the next mask is
    computed (and after the mask it is checked against).
    """

    def __init__(self, inner: llguidance.LLMatcher, vocab_size: int) -> None:
        self._inner = inner
        self.vocab_size = vocab_size
        self._width = mask_bytes(vocab_size)
        self._mask: bytes | None = None  # the current step's, until the state changes
        self._pending: Future | None = None  # the mask being computed on a grammar thread
        self._consumed = 0  # tokens consumed and not rolled back

    def allowed(self) -> bytes:
        """The packed bitmask of the tokens that may come next (see the module docstring)."""
        self._join()
        if self._mask is None:
            self._compute()
        return self._mask

    def allowed_soon(self) -> Future:
        """allowed() as a Future, computed on a grammar thread: the fast path hands it to
        the engine with the step's forward pass, which joins it before sampling. In that
        flow the engine has joined it before its answer reaches the reactor, so the next
        call here does not wait."""
        self._join()
        if self._mask is not None:
            ready: Future = Future()
            ready.set_result(self._mask)
            return ready
        self._pending = _masks().submit(self._compute)
        return self._pending

    def _compute(self) -> bytes:
        # (llguidance rounds its buffer up by a word; the wire form is exact)
        self._mask = self._inner.compute_bitmask()[: self._width]
        return self._mask

    def _join(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def consume(self, tokens: Sequence[int]) -> bool:
        """Advance over tokens; False if one is not allowed (those before it stay consumed).

        Each token is checked against the mask first: llguidance's own refusal
        would leave the matcher in a permanent error state.
        """
        for token in tokens:
            if not (0 <= token < self.vocab_size and allows(self.allowed(), token)):
                return False
            self._mask = None
            if not self._inner.consume_token(token):
                raise PieError(f"grammar matcher failed: {self._inner.get_error()}")
            self._consumed += 1
        return True

    def is_accepting(self) -> bool:
        """The text so far is a complete match (the grammar may end here)."""
        self._join()
        return self._inner.is_accepting()

    def is_stopped(self) -> bool:
        """Nothing more may follow (the end-of-sequence token was consumed, or the
        grammar cannot go on)."""
        self._join()
        return self._inner.is_stopped()

    def rollback(self, count: int) -> None:
        """Undo the last `count` consumed tokens (a rejected speculative path)."""
        self._join()
        if count > self._consumed:
            raise GrammarError(f"cannot roll back {count} tokens: {self._consumed} were consumed")
        self._mask = None
        self._consumed -= count
        if not self._inner.rollback(count):
            raise GrammarError(f"cannot roll back {count} tokens: {self._inner.get_error()}")

    def error(self) -> str:
        """The matcher's error, '' if none."""
        self._join()
        return self._inner.get_error()


def mask_bytes(vocab_size: int) -> int:
    """Length of the packed bitmask over `vocab_size` tokens (whole 32-bit words)."""
    return (vocab_size + 31) // 32 * 4


def allows(mask: bytes, token: int) -> bool:
    """Whether a packed bitmask allows `token`."""
    return bool(mask[token >> 3] >> (token & 7) & 1)
