"""agent-codeact: the model acts by writing Python, which the inferlet runs itself.

Each turn the model writes a ```python block; the inferlet runs it in a
namespace of its own, inside the inferlet's sandbox: a few safe builtins,
`import` of a handful of pure modules only, `print` captured, and a budget
of executed lines (a `while True:` ends with "step budget exceeded" rather
than at the sandbox's CPU deadline). Variables persist from one action to
the next, as in CodeAct. The output (or the error) is appended to the
context as the observation, and the loop goes on until the model writes
"Final answer: ...".

The namespace keeps the model's code away from the inferlet's own state; the
security boundary is the wasm sandbox around the whole inferlet (no files,
no network). A long single builtin call (`sum(range(10**12))`) runs no lines
and is stopped by that sandbox's CPU deadline.

Sends "turn i: <reply>", "observation i: <output>", then "answer: <text>"
(or "answer: none" when the turns run out), then "context: <tokens> tokens".

    --task TEXT  --turns N (default 4)  --max-tokens N per turn (default 96)
    --step-budget N executed lines per action (default 20000)
    --canned JSON list of replies to use instead of the model's, one per turn
      (the model still reads every turn; it writes once they run out)
    --show-context  also send "transcript: <the context's text>"
"""

import argparse
import builtins
import importlib
import io
import json
import re
import sys

from pie.inferlet import get_auto_model, send

SYSTEM = (
    "You solve tasks by writing Python. Each turn, reply with one ```python code block; "
    "whatever it prints comes back to you as an Observation, and variables persist between "
    "turns. When you know the answer, reply with 'Final answer: <answer>' and no code."
)
SAFE_BUILTINS = (
    "abs all any bool chr dict divmod enumerate filter float format frozenset int isinstance "
    "len list map max min next ord pow range repr reversed round set sorted str sum tuple zip "
    "ArithmeticError Exception IndexError KeyError NameError TypeError ValueError "
    "ZeroDivisionError __build_class__"
).split()
MODULES = frozenset({"math", "json", "re", "string", "itertools", "functools", "collections"})
OUTPUT_LIMIT = 2000
CODE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)
FINAL = re.compile(r"Final answer:\s*(.+)", re.S)


class StepBudgetExceeded(BaseException):
    """Raised into the action's code by the tracer; a BaseException, so `except Exception` in
    the model's code cannot swallow it."""


class CodeSandbox:
    """One namespace for every action of the agent, and a line budget per action."""

    def __init__(self, step_budget):
        self.step_budget = step_budget
        self._output = io.StringIO()
        safe = {name: getattr(builtins, name) for name in SAFE_BUILTINS}
        safe["print"] = self._print
        safe["__import__"] = self._import
        self.namespace = {"__builtins__": safe, "__name__": "action"}

    def _print(self, *values, sep=" ", end="\n"):
        self._output.write(sep.join(str(v) for v in values) + end)

    @staticmethod
    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name not in MODULES:
            raise ImportError(f"import of {name!r} is not allowed here")
        return importlib.import_module(name)

    def run(self, code):
        """Run one action; its printed output, or the error it ended with."""
        self._output = io.StringIO()
        steps = 0

        def trace(frame, event, arg):
            nonlocal steps
            if event == "line":
                steps += 1
                if steps > self.step_budget:
                    raise StepBudgetExceeded
            return trace

        previous = sys.gettrace()
        error = None
        try:
            compiled = compile(code, "<action>", "exec")
            sys.settrace(trace)
            try:
                exec(compiled, self.namespace)
            finally:
                sys.settrace(previous)
        except StepBudgetExceeded:
            error = f"step budget exceeded ({self.step_budget} lines)"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        output = self._output.getvalue()
        if error is not None:
            output += ("\n" if output and not output.endswith("\n") else "") + error
        output = output.strip() or "(no output)"
        return output if len(output) <= OUTPUT_LIMIT else output[:OUTPUT_LIMIT] + " ..."


async def main(args):
    parser = argparse.ArgumentParser(prog="agent-codeact")
    parser.add_argument(
        "--task",
        default="What is the sum of the squares of the integers from 1 to 10?",
    )
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--step-budget", type=int, default=20000)
    parser.add_argument("--canned", default="[]")
    parser.add_argument("--show-context", action="store_true")
    opts = parser.parse_args(args)
    canned = list(json.loads(opts.canned))

    model = get_auto_model()
    ctx = model.create_context()
    ctx.system(SYSTEM)
    ctx.user(opts.task)
    sandbox = CodeSandbox(opts.step_budget)
    answer = "none"
    for turn in range(opts.turns):
        if canned:
            reply = canned.pop(0)
            ctx.assistant(reply)
        else:
            ctx.cue()
            reply = await ctx.generate_until(max_tokens=opts.max_tokens)
        send(f"turn {turn}: {reply}")
        code = CODE.search(reply)
        final = FINAL.search(reply)
        if final and not code:
            answer = final.group(1).strip()
            break
        observation = sandbox.run(code.group(1)) if code else "No ```python block found."
        send(f"observation {turn}: {observation}")
        ctx.user(f"Observation:\n{observation}")
    await ctx.flush()  # the whole transcript is in the model's KV cache
    send(f"answer: {answer}")
    send(f"context: {len(ctx)} tokens")
    if opts.show_context:
        send(f"transcript: {ctx.get_text()}")
