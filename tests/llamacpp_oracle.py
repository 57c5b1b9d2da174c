"""Run by an interpreter that has llama-cpp-python (never imported by the test process).

Reads one JSON request on stdin: {"model", "texts", "prompts", "new"}; writes one
JSON line: each text's token ids (specials parsed, no BOS), each prompt's
greedy continuation of `new` tokens, and llama.cpp's top-1 next token at every
position of the prompt followed by that continuation (teacher-forced).
"""

import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    request = json.loads(sys.stdin.read())
    llm = Llama(request["model"], n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)
    texts = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in request["texts"]]
    greedy, argmax = [], []
    for prompt in request["prompts"]:
        llm.reset()
        llm.eval(prompt)
        new = []
        for _ in range(request["new"]):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(token)
            llm.eval([token])
        greedy.append(new)
        argmax.append([int(np.argmax(row)) for row in llm.scores[: llm.n_tokens]])
    print(json.dumps({"texts": texts, "greedy": greedy, "argmax": argmax}))


if __name__ == "__main__":
    main()
