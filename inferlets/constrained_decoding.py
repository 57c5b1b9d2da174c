"""constrained-decoding: the model may only write JSON valid under a JSON Schema.

The schema becomes a grammar matcher on the host (pie.inferlet.Grammar, over
llguidance): every step, the engine masks the full-vocabulary logits to the
tokens the schema allows before sampling, so any token the schema needs is
reachable however unlikely the model finds it, and generation ends when the
JSON is complete. Without --schema any JSON object is allowed. Sends the JSON
text, or "GrammarError: ..." for a malformed schema.

    --prompt TEXT  --schema JSON  --max-tokens N (default 48)  --temperature T (default 0)
"""

import argparse
import json

from pie.inferlet import Grammar, GrammarError, Greedy, Temperature, get_auto_model, send


async def main(args):
    parser = argparse.ArgumentParser(prog="constrained-decoding")
    parser.add_argument("--prompt", default="Describe a cat as a JSON object with name and age.")
    parser.add_argument("--schema", default=None, help="a JSON Schema (JSON text)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    opts = parser.parse_args(args)

    model = get_auto_model()
    grammar = Grammar.json_schema(opts.schema) if opts.schema else Grammar.json()
    try:
        matcher = await grammar.matcher(model)
    except GrammarError as e:
        send(f"GrammarError: {e}")
        return
    ctx = model.create_context()
    ctx.system("You only answer with a JSON object.")
    ctx.user(opts.prompt)
    ctx.cue()
    sampler = Temperature(opts.temperature) if opts.temperature > 0 else Greedy()
    text = await ctx.generate_until(max_tokens=opts.max_tokens, sampler=sampler, grammar=matcher)
    complete = matcher.is_accepting()
    matcher.close()
    if complete:
        json.loads(text)  # guaranteed by the grammar; fail loudly if not
    send(text)
