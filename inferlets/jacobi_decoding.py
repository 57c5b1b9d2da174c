"""jacobi-decoding: parallel (Jacobi) decoding of a greedy continuation.

Each iteration forwards the seed plus the current guess of the next
--window tokens in one pass (a causal chain) and reads the greedy token at
every position. The longest prefix of the guess that matches is accepted
(plus the token after it, which is always right); the rest of the outputs
become the next guess. Unlike Pie's toy version, which accepted every
guess, the result equals plain greedy decoding. Sends the text, then
"iterations=I tokens=T".

    --prompt TEXT  --max-tokens N (default 32)  --window N (default 4)
"""

import argparse

from pie.inferlet import Greedy, get_auto_model, send


async def main(args):
    parser = argparse.ArgumentParser(prog="jacobi-decoding")
    parser.add_argument("--prompt", default="Write the alphabet: A B C")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window", type=int, default=4)
    opts = parser.parse_args(args)

    model = get_auto_model()
    ctx = model.create_context()
    ctx.user(opts.prompt)
    ctx.cue()
    greedy = Greedy()
    eos = set(model.eos_token_ids)
    guess = []
    generated = []
    iterations = 0
    while len(generated) < opts.max_tokens and not (generated and generated[-1] in eos):
        iterations += 1
        dists = await ctx.verify_drafts(guess, list(range(1, len(guess) + 1)))
        outputs = [greedy.sample(d.ids, d.probs) for d in dists]
        accepted = 0
        while accepted < len(guess) and guess[accepted] == outputs[accepted]:
            accepted += 1
        new = outputs[: accepted + 1]
        stop_at = len(new)
        for i, token in enumerate(new):
            if token in eos or len(generated) + i + 1 >= opts.max_tokens:
                stop_at = i + 1
                break
        new = new[:stop_at]
        generated.extend(new)
        ctx.accept_drafts(list(range(len(new) - 1)), new[-1])
        guess = outputs[accepted + 1 :][: opts.window]
        guess += [guess[-1] if guess else new[-1]] * (opts.window - len(guess))
    text = model.tokenizer.detokenize(generated)
    send(text)
    send(f"iterations={iterations} tokens={len(generated)}")
