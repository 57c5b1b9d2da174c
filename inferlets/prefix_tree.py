"""prefix-tree: 8 prompts arranged as a 3-level tree of shared prefixes, generated at once.

Level 1 is a shared system prompt, level 2 two topics, level 3 two styles per
topic and two questions per style: every shared prefix is computed once and
forked. Sends "i: <prompt> -> <answer>" for the 8 leaves.

    --max-tokens N (default 16)
"""

import argparse

from pie.inferlet import gather, get_auto_model, send

TREE = {
    "Tell me about cats.": {
        "Answer briefly.": ["What do they eat?", "How long do they sleep?"],
        "Answer like a poet.": ["Why do they purr?", "What do they dream of?"],
    },
    "Tell me about the sea.": {
        "Answer briefly.": ["Why is it salty?", "How deep is it?"],
        "Answer like a poet.": ["What colour is it?", "What does it sing?"],
    },
}


async def main(args):
    parser = argparse.ArgumentParser(prog="prefix-tree")
    parser.add_argument("--max-tokens", type=int, default=16)
    opts = parser.parse_args(args)

    root = get_auto_model().create_context()
    root.system("You are a helpful assistant.")
    leaves = []
    topics = await root.fork_many(len(TREE))
    for topic_ctx, (topic, styles) in zip(topics, TREE.items(), strict=True):
        topic_ctx.fill(topic + "\n")
        style_ctxs = await topic_ctx.fork_many(len(styles))
        for style_ctx, (style, questions) in zip(style_ctxs, styles.items(), strict=True):
            style_ctx.fill(style + "\n")
            for question_ctx, question in zip(
                await style_ctx.fork_many(len(questions)), questions, strict=True
            ):
                question_ctx.user(question)
                question_ctx.cue()
                leaves.append((f"{topic} {style} {question}", question_ctx))
    answers = await gather(*(c.generate_until(max_tokens=opts.max_tokens) for _, c in leaves))
    for i, ((prompt, _), answer) in enumerate(zip(leaves, answers, strict=True)):
        send(f"{i}: {prompt} -> {answer}")
