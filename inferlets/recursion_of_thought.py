"""recursion-of-thought: solve directly (<leaf>) or split in two (<branch>), recursively.

Each node asks the model whether to answer or split; a split forks two
children that recurse in parallel (down to --depth), and their answers are
merged. Sends one line per node ("node <path> leaf|branch: ...") and "answer: ...".

    --problem TEXT  --depth N (default 2)  --max-tokens N (default 16)
"""

import argparse

from pie.inferlet import gather, get_auto_model, send

INSTRUCTION = (
    "If the task is simple, answer it after the word <leaf>. If it is complex, "
    "write <branch> and then two smaller sub-tasks, one per line."
)


async def solve(model, task, depth, max_depth, max_tokens, path):
    ctx = model.create_context()
    ctx.system(INSTRUCTION)
    ctx.user(task)
    ctx.cue()
    text = await ctx.generate_until(max_tokens=max_tokens)
    ctx.close()
    if "<branch>" in text and depth < max_depth:
        lines = [ln.strip() for ln in text.split("<branch>", 1)[1].splitlines() if ln.strip()]
        subtasks = (lines + [f"first half of: {task}", f"second half of: {task}"])[:2]
        send(f"node {path or 'root'} branch: {' | '.join(subtasks)}")
        answers = await gather(
            *(
                solve(model, sub, depth + 1, max_depth, max_tokens, f"{path}{i}")
                for i, sub in enumerate(subtasks)
            )
        )
        merger = model.create_context()
        merger.user(
            f"Task: {task}\nPartial answers:\n1. {answers[0]}\n2. {answers[1]}\n"
            "Give the combined answer."
        )
        merger.cue()
        merged = await merger.generate_until(max_tokens=max_tokens)
        merger.close()
        return merged
    answer = text.split("<leaf>", 1)[-1].strip()
    send(f"node {path or 'root'} leaf: {answer}")
    return answer


async def main(args):
    parser = argparse.ArgumentParser(prog="recursion-of-thought")
    parser.add_argument("--problem", default="Plan a picnic for four friends.")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    opts = parser.parse_args(args)
    answer = await solve(get_auto_model(), opts.problem, 0, opts.depth, opts.max_tokens, "")
    send(f"answer: {answer}")
