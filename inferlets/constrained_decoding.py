"""constrained-decoding: the model may only write a JSON object.

A JSON prefix recogniser (a pushdown automaton, plain Python, so it runs in
the sandbox; no host-side grammar engine is needed) checks every candidate
token: the sampler takes the most probable token of the top-k distribution
that keeps the text a valid JSON prefix, falls back to the first allowed
token among a few structural ones when none of the top-k is allowed, and
allows the end-of-turn token only once the object is complete. A token is
taken only if the object can still be closed within the token budget;
otherwise the shortest valid completion is written. The result
always parses with json.loads. Sends the JSON text.

    --prompt TEXT  --max-tokens N (default 48)
"""

import argparse
import json

from pie.inferlet import get_auto_model, send

VALUE, KEY_OR_CLOSE, KEY, COLON, AFTER, VALUE_OR_CLOSE, STRING, NUMBER, LITERAL, DONE = range(10)
LITERALS = ("true", "false", "null")
NUMBER_CHARS = set("0123456789+-.eE")


class JsonPrefix:
    """Feeds characters; refuses any that cannot continue a JSON object."""

    def __init__(self):
        self.stack = []  # "{" or "["
        self.state = VALUE
        self.is_key = False
        self.escape = 0  # 1 after a backslash, 2..5 inside \\uXXXX
        self.partial = ""

    def clone(self):
        other = JsonPrefix()
        other.stack = list(self.stack)
        other.state, other.is_key = self.state, self.is_key
        other.escape, other.partial = self.escape, self.partial
        return other

    @property
    def complete(self):
        return self.state == DONE

    def feed_text(self, text):
        return all(self.feed(ch) for ch in text)

    def feed(self, ch):
        state = self.state
        if state == STRING:
            return self._string(ch)
        if state == NUMBER:
            if ch in NUMBER_CHARS and self._number_prefix_ok(self.partial + ch):
                self.partial += ch
                return True
            if not self._number_ok(self.partial):
                return False
            self._value_done()
            return self.feed(ch)
        if state == LITERAL:
            candidate = self.partial + ch
            if not any(lit.startswith(candidate) for lit in LITERALS):
                return False
            self.partial = candidate
            if candidate in LITERALS:
                self._value_done()
            return True
        if ch in " \t\n\r":
            return True
        if state in (VALUE, VALUE_OR_CLOSE):
            if state == VALUE_OR_CLOSE and ch == "]":
                return self._close("[")
            if not self.stack and ch != "{":
                return False  # the top-level value must be an object
            return self._start_value(ch)
        if state in (KEY_OR_CLOSE, KEY):
            if state == KEY_OR_CLOSE and ch == "}":
                return self._close("{")
            if ch == '"':
                self.state, self.is_key, self.escape = STRING, True, 0
                return True
            return False
        if state == COLON:
            if ch == ":":
                self.state = VALUE
                return True
            return False
        if state == AFTER:
            if ch == ",":
                self.state = KEY if self.stack[-1] == "{" else VALUE
                return True
            if ch in "}]":
                return self._close("{" if ch == "}" else "[")
            return False
        return False  # DONE: nothing but whitespace

    def _start_value(self, ch):
        if ch == "{":
            self.stack.append("{")
            self.state = KEY_OR_CLOSE
        elif ch == "[":
            self.stack.append("[")
            self.state = VALUE_OR_CLOSE
        elif ch == '"':
            self.state, self.is_key, self.escape = STRING, False, 0
        elif ch in "-0123456789":
            self.state, self.partial = NUMBER, ch
        elif ch in "tfn":
            self.state, self.partial = LITERAL, ch
        else:
            return False
        return True

    def _string(self, ch):
        if self.escape == 1:
            if ch == "u":
                self.escape = 2
                return True
            self.escape = 0
            return ch in '"\\/bfnrt'
        if self.escape >= 2:
            if ch not in "0123456789abcdefABCDEF":
                return False
            self.escape = 0 if self.escape == 5 else self.escape + 1
            return True
        if ch == "\\":
            self.escape = 1
            return True
        if ch == '"':
            if self.is_key:
                self.state = COLON
            else:
                self._value_done()
            return True
        return ch >= " "

    def _close(self, opener):
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._value_done()
        return True

    def _value_done(self):
        self.partial = ""
        self.state = AFTER if self.stack else DONE

    @staticmethod
    def _number_ok(text):
        try:
            json.loads(text)
            return True
        except ValueError:
            return False

    @staticmethod
    def _number_prefix_ok(text):
        for tail in ("", "0", "e0", "0e0"):
            if JsonPrefix._number_ok(text + tail):
                return True
        return False

    def closing_suffix(self):
        """The shortest text that completes the object from here."""
        out = ""
        if self.state == STRING:
            if self.escape == 1:
                out += "n"
            elif self.escape >= 2:
                out += "0" * (6 - self.escape)
            out += '"' + (":0" if self.is_key else "")
        elif self.state == NUMBER and not self._number_ok(self.partial):
            out += "0"
        elif self.state == LITERAL:
            out += next(lit for lit in LITERALS if lit.startswith(self.partial))[
                len(self.partial) :
            ]
        elif self.state == COLON:
            out += ":0"
        elif self.state == KEY:
            out += '"k":0'
        elif self.state == VALUE:
            out += "0" if self.stack else "{}"
        closers = {"{": "}", "[": "]"}
        return out + "".join(closers[c] for c in reversed(self.stack))


class JsonSampler:
    """Best allowed token of the top-k; forced completion near the budget."""

    def __init__(self, model, max_tokens):
        self.tokenizer = model.tokenizer
        ids, pieces = self.tokenizer.get_vocabs()  # regular tokens: no control token is in it
        self.pieces = dict(zip(ids, pieces, strict=True))
        self.texts = {}  # token -> text, decoded only for tokens that are tried
        self.char_token = {}
        for char in '{}[]":,0 an':
            tokens = self.tokenizer.tokenize(char)
            if len(tokens) == 1:
                self.char_token[char] = tokens[0]
        self.eos = list(model.eos_token_ids)
        self.fallback = [self.char_token[c] for c in '{"}]:,0 a' if c in self.char_token]
        self.state = JsonPrefix()
        self.max_tokens = max_tokens
        self.count = 0

    def _text(self, token):
        """The token's text, or None for special tokens and partial UTF-8 sequences."""
        if token not in self.texts:
            try:
                self.texts[token] = self.pieces[token].decode("utf-8") or None
            except (KeyError, UnicodeDecodeError):
                self.texts[token] = None
        return self.texts[token]

    def _try(self, token):
        text = self._text(token)
        if not text:
            return None
        trial = self.state.clone()
        return trial if trial.feed_text(text) else None

    def sample(self, ids, probs):
        self.count += 1
        if self.state.complete:
            return self.eos[0]
        left = self.max_tokens - self.count  # tokens after this one, the end token included
        for token in list(ids) + self.fallback:
            trial = self._try(token)
            # take it only if the object can still be closed (one token per char) in time
            if trial is not None and len(trial.closing_suffix()) < left:
                self.state = trial
                return token
        suffix = self.state.closing_suffix()
        if suffix:
            self.state.feed(suffix[0])
            return self.char_token[suffix[0]]
        raise RuntimeError("no token can continue the JSON text")


async def main(args):
    parser = argparse.ArgumentParser(prog="constrained-decoding")
    parser.add_argument("--prompt", default="Describe a cat as a JSON object with name and age.")
    parser.add_argument("--max-tokens", type=int, default=48)
    opts = parser.parse_args(args)

    model = get_auto_model()
    ctx = model.create_context()
    ctx.system("You only answer with a JSON object.")
    ctx.user(opts.prompt)
    ctx.cue()
    sampler = JsonSampler(model, opts.max_tokens)

    def stop(generated):
        return generated[-1] in sampler.eos

    text = await ctx.generate(sampler, stop)
    for eos in model.eos_tokens:
        text = text.removesuffix(eos)
    json.loads(text)  # guaranteed by construction; fail loudly if not
    send(text)
