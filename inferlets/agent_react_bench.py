"""agent-react-bench: a ReAct agent on real HTTP tools, and what three optimisations save.

Each round the model writes a thought and an action; the agent then calls its
tools over HTTP (`pie.inferlet.http.fetch`): a search and two document
retrievals from --tools (a base URL the daemon's inferlet_http_allow must
allow). The search result and the documents are appended to the context.
Three optimisations of Pie's version, each switchable:

- prefix cache (--cache): the long tool-documentation prompt is prefilled
  once, exported (persistent KV pages + its tokens in the key-value store)
  and imported by later runs instead of computed again;
- dropping documents (--drop): once a round's documents have been read (the
  next round's step has attended to them), their tokens are masked and every
  KV page they fill whole is freed, so later steps attend over less and the
  context holds fewer pages (the last round's documents stay for the answer);
- overlapping tool calls (--overlap): the three calls of a round are in
  flight together instead of one after the other.

One run sends a JSON line {"config", "prefix", "prefix_ms", "tool_ms",
"decode_ms", "total_ms", "pages_dropped", "pages_held", "answer"}; the
phases are timed with time_ms in the instance. --compare runs the baseline
(all off), then each optimisation alone, sends each run's line, and then one
line per optimisation with the time it saves over the baseline in the phase
it changes ("prefix cache saves N ms of prefill", ...), then a JSON summary
{"saved_ms": {...}}. The figures are what this run measured, noise included.

    --tools URL  --question TEXT  --rounds N (default 2)  --max-tokens N (default 16)
    --tool-ms N (latency asked of the test tool server, default 0)
    --cache --drop --overlap  --compare  --name NAME (cache entry)
"""

import argparse
import json

from pie.inferlet import Context, gather, get_auto_model, send, time_ms
from pie.inferlet.http import HttpError, fetch

TOOL_DOCS = (
    "You are a research agent. You answer by thinking step by step and calling tools. "
    "Each turn write 'Thought: ...' and then 'Action: search[terms]'. After every action you "
    "get an Observation with the search result and documents that may help. Tools:\n"
    "search[terms]: looks the terms up in an encyclopedia and returns one sentence; use "
    "short terms such as a city or a country name; it returns 'No results.' when it knows "
    "nothing; it never returns more than one sentence.\n"
    "docs[id]: returns a background document; documents are long, read them once and keep "
    "only what matters for the question; their facts are numbered.\n"
    "Rules: never invent an observation; do not repeat a search you already made; when the "
    "observations answer the question, stop calling tools and write 'Final answer: ...' in "
    "one sentence. Keep every thought under twenty words. Prefer facts from the search tool "
    "over facts from the documents when they disagree. Quote numbers exactly as observed."
)
CONFIGS = {
    "baseline": {},
    "prefix_cache": {"cache": True},
    "drop_documents": {"drop": True},
    "overlap_tools": {"overlap": True},
}


async def call_tool(url):
    try:
        response = await fetch(url)
    except HttpError as error:
        return f"(tool failed: {error})"
    return response.text()


def quote(text):
    """Percent-encode for a query string (ASCII; no urllib in the sandbox)."""
    return "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02X}" for c in text)


async def tools(base, run, query, first_doc, latency_ms, overlap):
    """The round's three tool calls: one search and two documents."""
    tail = f"run={quote(run)}&ms={latency_ms}"
    urls = [
        f"{base}/search?q={query}&{tail}",
        f"{base}/docs?id={first_doc}&{tail}",
        f"{base}/docs?id={first_doc + 1}&{tail}",
    ]
    if overlap:
        return await gather(*[call_tool(url) for url in urls])
    return [await call_tool(url) for url in urls]


def search_terms(step, question):
    """The terms of the model's Action: search[...] if it wrote one, else the question's."""
    text = step.lower()
    if "search[" in text:
        terms = text.split("search[", 1)[1].split("]", 1)[0]
    else:
        terms = question.lower()
    return "+".join(w for w in "".join(c if c.isalnum() else " " for c in terms).split()[:6])


async def prefix(model, cache, name):
    """The context holding the tool documentation: imported from the cache, or computed."""
    if cache:
        ctx = await Context.open(model, name)
        if ctx is not None:
            await ctx.flush()  # a partial last page is recomputed: part of the cost of a hit
            await ctx.queue.synchronize()
            return ctx, "hit"
    ctx = model.create_context()
    ctx.system(TOOL_DOCS)
    await ctx.flush()
    await ctx.queue.synchronize()  # timed until the prefill has run, not only been queued
    if cache:
        await ctx.save(name)
        return ctx, "miss"
    return ctx, "off"


async def run_agent(opts, config, cache=False, drop=False, overlap=False):
    model = get_auto_model()
    started = time_ms()
    ctx, prefix_state = await prefix(model, cache, opts.name)
    prefix_ms = time_ms() - started
    ctx.user(opts.question)
    tool_ms = decode_ms = dropped = 0
    documents = None  # [start, end) of the last round's documents in the context
    for r in range(opts.rounds):
        ctx.cue()
        t = time_ms()
        step = await ctx.generate_until(max_tokens=opts.max_tokens)  # reads the last documents
        decode_ms += time_ms() - t
        if drop and documents is not None:
            ctx.mask_token_range(*documents)
            dropped += ctx.drop_masked_kv_pages()
        t = time_ms()
        search, *docs = await tools(
            opts.tools, config, search_terms(step, opts.question), 2 * r, opts.tool_ms, overlap
        )
        tool_ms += time_ms() - t
        ctx.user(f"Observation: {search}")
        start = len(ctx)
        ctx.user("Documents:\n" + "\n".join(docs))
        documents = (start, len(ctx))
    ctx.user("Now give the final answer in one sentence.")
    ctx.cue()
    t = time_ms()
    answer = await ctx.generate_until(max_tokens=opts.max_tokens)
    decode_ms += time_ms() - t
    held = len(ctx.get_kv_page_ids())
    ctx.close()
    return {
        "config": config,
        "prefix": prefix_state,
        "prefix_ms": prefix_ms,
        "tool_ms": tool_ms,
        "decode_ms": decode_ms,
        "total_ms": time_ms() - started,
        "pages_dropped": dropped,
        "pages_held": held,
        "answer": answer,
    }


async def compare(opts):
    model = get_auto_model()
    warm, _ = await prefix(model, True, opts.name)  # so that the cached run is a hit
    warm.close()
    runs = {}
    for config, switches in CONFIGS.items():
        runs[config] = await run_agent(opts, config, **switches)
        send(json.dumps(runs[config]))
    base = runs["baseline"]
    saved = {
        "prefix_cache": base["prefix_ms"] - runs["prefix_cache"]["prefix_ms"],
        "drop_documents": base["decode_ms"] - runs["drop_documents"]["decode_ms"],
        "overlap_tools": base["tool_ms"] - runs["overlap_tools"]["tool_ms"],
    }
    send(f"prefix cache saves {saved['prefix_cache']} ms of prefill")
    send(
        f"dropping documents saves {saved['drop_documents']} ms of decoding and holds "
        f"{base['pages_held'] - runs['drop_documents']['pages_held']} fewer KV pages"
    )
    send(f"overlapping tool calls saves {saved['overlap_tools']} ms of tool time")
    send(json.dumps({"saved_ms": saved}))


async def main(args):
    parser = argparse.ArgumentParser(prog="agent-react-bench")
    parser.add_argument("--tools", required=True, help="base URL of the tool server")
    parser.add_argument("--question", default="How many people live in the capital of France?")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tool-ms", type=int, default=0)
    parser.add_argument("--cache", action="store_true")
    parser.add_argument("--drop", action="store_true")
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--name", default="agent-react-bench/tools")
    opts = parser.parse_args(args)
    opts.tools = opts.tools.rstrip("/")
    if opts.compare:
        await compare(opts)
        return
    config = "+".join(k for k in ("cache", "drop", "overlap") if getattr(opts, k)) or "baseline"
    result = await run_agent(opts, config, opts.cache, opts.drop, opts.overlap)
    send(json.dumps(result))
