"""agent-swarm: one stage of a story pipeline across instances (idea -> plot -> characters -> dialogue).

Launch one instance per role. Each role subscribes to the previous stage's
topic, writes its part from what it receives, and broadcasts it to the next
stage's topic. The first role gets its prompt from the client (receive());
the last sends the finished piece to its client. Every role also sends a
"<role>: ..." line of its own output.

    --role idea|plot|characters|dialogue  --topic-prefix TEXT (default "swarm")
    --max-tokens N (default 24)
"""

import argparse

from pie.inferlet import broadcast, get_auto_model, receive, send, subscribe

ROLES = ["idea", "plot", "characters", "dialogue"]
TASKS = {
    "idea": "Give a one-sentence story idea about: {}",
    "plot": "Outline a short plot for this idea: {}",
    "characters": "Describe two characters for this plot: {}",
    "dialogue": "Write two lines of dialogue between these characters: {}",
}


async def main(args):
    parser = argparse.ArgumentParser(prog="agent-swarm")
    parser.add_argument("--role", choices=ROLES, required=True)
    parser.add_argument("--topic-prefix", default="swarm")
    parser.add_argument("--max-tokens", type=int, default=24)
    opts = parser.parse_args(args)
    index = ROLES.index(opts.role)

    if index == 0:
        source = await receive()
    else:
        subscription = subscribe(f"{opts.topic_prefix}/{ROLES[index - 1]}")
        send(f"{opts.role}: waiting")
        source = await subscription.next()
        subscription.close()

    model = get_auto_model()
    ctx = model.create_context()
    ctx.user(TASKS[opts.role].format(source))
    ctx.cue()
    text = await ctx.generate_until(max_tokens=opts.max_tokens)
    send(f"{opts.role}: {text}")
    if index + 1 < len(ROLES):
        broadcast(f"{opts.topic_prefix}/{opts.role}", text)
