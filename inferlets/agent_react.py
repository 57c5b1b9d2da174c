"""agent-react: a ReAct loop (thought/action -> tool -> observation) in one context.

Each round the model writes a thought and an action, a simulated tool runs
(it sleeps --tool-ms to stand for a web call and answers from a tiny
table), and its observation is appended to the same context, whose KV cache
is reused across rounds. Sends "round i: ..." and "observation i: ..." lines,
then the final answer.

    --question TEXT  --rounds N (default 2)  --max-tokens N per step (default 24)
    --tool-ms N (default 50)
"""

import argparse

from pie.inferlet import get_auto_model, send, sleep

SYSTEM = (
    "You answer questions by thinking step by step. Each turn, write a Thought and an "
    "Action of the form Search[term]. You will get an Observation back."
)
FACTS = {
    "paris": "Paris is the capital of France; about 2.1 million people live there.",
    "france": "France is a country in Western Europe; its capital is Paris.",
}


async def tool(action, delay_ms):
    await sleep(delay_ms)
    lowered = action.lower()
    for key, fact in FACTS.items():
        if key in lowered:
            return fact
    return "No results."


async def main(args):
    parser = argparse.ArgumentParser(prog="agent-react")
    parser.add_argument("--question", default="How many people live in the capital of France?")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--tool-ms", type=int, default=50)
    opts = parser.parse_args(args)

    model = get_auto_model()
    ctx = model.create_context()
    ctx.system(SYSTEM)
    ctx.user(opts.question)
    for i in range(opts.rounds):
        ctx.cue()
        step = await ctx.generate_until(max_tokens=opts.max_tokens)
        send(f"round {i}: {step}")
        observation = await tool(step + " " + opts.question, opts.tool_ms)
        send(f"observation {i}: {observation}")
        ctx.user(f"Observation: {observation}")
    ctx.user("Now give the final answer in one sentence.")
    ctx.cue()
    answer = await ctx.generate_until(max_tokens=opts.max_tokens)
    send(f"answer: {answer}")
