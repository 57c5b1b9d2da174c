"""hierarchical-attention: each token of an XML document sees only its own node and its children.

The document is parsed into a tree; every element's text is tokenized in
document order and given a custom attention mask: a token attends to the
earlier tokens of its own element and of that element's direct children.
The whole document is prefilled in one pass with these masks, then a
question (which sees everything) is answered. Sends "nodes=N tokens=T" and
the answer.

    --question TEXT  --max-tokens N (default 24)  --document XML (default: a small report)
"""

import argparse
import re

from pie.inferlet import Brle, get_auto_model, send

DOCUMENT = (
    "<report><title>Quarterly results</title>"
    "<section><heading>Sales</heading><p>Sales grew by ten percent.</p></section>"
    "<section><heading>Costs</heading><p>Costs fell slightly.</p></section></report>"
)


def parse(xml):
    """[(node id, parent id, text)] in document order; node 0 is a virtual root."""
    pieces, stack, next_id = [], [0], 1
    for tag, text in re.findall(r"(<[^>]+>)|([^<]+)", xml):
        if tag.startswith("</"):
            stack.pop()
        elif tag:
            name = tag.strip("<>/")
            pieces.append((next_id, stack[-1], f"<{name}>"))
            if not tag.endswith("/>"):
                stack.append(next_id)
            next_id += 1
        elif text.strip():
            pieces.append((stack[-1], -1, text))
    parents = {node: parent for node, parent, _ in pieces if parent != -1}
    return [(node, parents.get(node, 0), text) for node, _, text in pieces], next_id - 1


async def main(args):
    parser = argparse.ArgumentParser(prog="hierarchical-attention")
    parser.add_argument("--question", default="What happened to sales?")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--document", default=DOCUMENT)
    opts = parser.parse_args(args)

    model = get_auto_model()
    ctx = model.create_context()
    ctx.user("Read the document.")
    owners = [None] * len(ctx)  # chat header tokens: visible to everyone
    pieces, node_count = parse(opts.document)
    parent_of = {node: parent for node, parent, _ in pieces}
    for node, _, text in pieces:
        tokens = model.tokenizer.tokenize(text)
        masks = []
        for i in range(len(tokens)):
            visible = [
                owner is None or owner == node or parent_of.get(owner) == node for owner in owners
            ]
            masks.append(Brle.from_list([not v for v in visible] + [False] * (i + 1)))
        ctx.fill_tokens(tokens, masks=masks)
        owners.extend([node] * len(tokens))
    document_tokens = len(owners)
    ctx.user(opts.question)
    ctx.cue()
    await ctx.flush()
    answer = await ctx.generate_until(max_tokens=opts.max_tokens)
    send(f"nodes={node_count} tokens={document_tokens}")
    send(answer)
