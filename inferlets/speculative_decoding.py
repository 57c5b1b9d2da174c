"""speculative-decoding: an n-gram cache drafter verified with a tree attention mask.

The drafter remembers, for every (n-1)-token history seen so far (prompt and
output), the tokens that followed it (most recent first). Each step it drafts
a trie: up to --width alternatives for the next token, each followed by the
chain the cache predicts, --depth tokens deep. The seed and the whole trie go
through one forward pass; siblings cannot see each other (tree mask), and
every draft the sampler agrees with is accepted. The output is exactly what
plain greedy decoding gives. Sends the text, then "steps=S accepted=A".

    --prompt TEXT  --max-tokens N (default 48)  --ngram N (default 3)
    --width N (default 2)  --depth N (default 4)
"""

import argparse

from pie.inferlet import Greedy, get_auto_model, send


class NgramDrafter:
    def __init__(self, n, width, depth):
        self.n, self.width, self.depth = n, width, depth
        self.table = {}
        self.history = []

    def update(self, tokens):
        seen = len(self.history)
        self.history = list(tokens)
        for end in range(max(self.n - 1, seen - self.n + 1), len(self.history)):
            key = tuple(self.history[end - self.n + 1 : end])
            following = self.history[end]
            options = self.table.setdefault(key, [])
            if following in options:
                options.remove(following)
            options.insert(0, following)
            del options[self.width * 2 :]

    def _next(self, history):
        return self.table.get(tuple(history[len(history) - self.n + 1 :]), [])

    def draft(self):
        tokens, depths = [], []
        for first in self._next(self.history)[: self.width]:
            chain, history = [first], self.history + [first]
            while len(chain) < self.depth:
                options = self._next(history)
                if not options:
                    break
                chain.append(options[0])
                history.append(options[0])
            tokens.extend(chain)
            depths.extend(range(1, len(chain) + 1))
        return tokens, depths


async def main(args):
    parser = argparse.ArgumentParser(prog="speculative-decoding")
    parser.add_argument("--prompt", default="Count from one to twenty in words, comma separated.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--depth", type=int, default=4)
    opts = parser.parse_args(args)

    ctx = get_auto_model().create_context()
    ctx.user(opts.prompt)
    ctx.cue()
    stats = {}
    drafter = NgramDrafter(opts.ngram, opts.width, opts.depth)
    text = await ctx.generate_with_drafter(drafter, Greedy(), ctx.eos_stop(opts.max_tokens), stats)
    send(text)
    send(f"steps={stats['steps']} accepted={stats['accepted']}")
