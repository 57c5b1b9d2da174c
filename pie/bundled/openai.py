"""openai: the OpenAI API as a server inferlet (the daemon serves it with `--openai`).

    POST /v1/chat/completions   messages, model, max_tokens | max_completion_tokens,
                                temperature, top_p, stop, n, seed, logprobs, top_logprobs, user
    POST /v1/completions        prompt (a string, strings, token ids, or lists of them), model,
                                max_tokens, temperature, top_p, stop, n, seed, logprobs, user
    GET  /v1/models, GET /v1/models/{id}

Every request runs in a fresh instance (the daemon checks the API key before
it starts one). Fields are checked as OpenAI's servers check them: unknown
ones are ignored, a bad value is a 400 whose error names the field. The
defaults are OpenAI's (temperature 1, top_p 1, n 1; max_tokens 16 for
/v1/completions). Generation runs on the engine's fast path, except with
log-probabilities (they need every step's distribution). With `stream: true`
the reply is server-sent events as OpenAI sends them (a role delta first on
chat, content deltas as the text is decoded, a chunk with the finish_reason
per choice, the usage chunk with `stream_options.include_usage`, then
`data: [DONE]`); a client that disconnects ends the instance.
`response_format` `json_object` / `json_schema` constrain the reply with a grammar
(pie.inferlet.grammar) on the fast path: every step samples only tokens the
grammar allows, and the reply ends when the JSON is complete.
"""

import json
import time

from pie.inferlet import (
    Greedy,
    NoChatTemplate,
    TemplateError,
    TopP,
    gather,
    get_all_models,
    get_instance_id,
    get_model,
)
from pie.inferlet.completion import Completion
from pie.inferlet.grammar import Grammar, GrammarError
from pie.inferlet.server import http_main

MAX_TOKENS_LIMIT = 8192
MAX_N = 16
MAX_STOP = 4
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
JSON = {"content-type": "application/json"}
SSE = {"content-type": "text/event-stream; charset=utf-8"}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, message, param=None, code=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self):
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return {"status": self.status, "headers": JSON, "body": json.dumps({"error": error})}


def ok(answer):
    return {"status": 200, "headers": JSON, "body": json.dumps(answer)}


# ---------------------------------------------------------------------------- fields


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and value == value


def integer(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise ApiError(f"{name} must be an integer from {low} to {high}, not {value!r}", name)
    return value


def number(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not low <= value <= high:
        raise ApiError(f"{name} must be a number from {low} to {high}, not {value!r}", name)
    return float(value)


def parse_body(request):
    try:
        body = request.json()
    except ValueError as e:
        raise ApiError(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or not isinstance(
            options.get("include_usage", False), bool
        ):
            raise ApiError(
                'stream_options must be an object such as {"include_usage": true}',
                "stream_options",
            )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError("user must be a string", "user")
    return body


def served_model(body):
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError("model must be the name of a served model (see GET /v1/models)", "model")
    model = get_model(name)
    if model is None:
        raise ApiError(
            f"the model {name!r} does not exist (served: {', '.join(get_all_models())})",
            "model",
            "model_not_found",
            404,
        )
    return model


def stop_texts(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) for s in stops)
    ):
        raise ApiError(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
    return stops


def samplers(body, n):
    """One sampler per choice; choice i draws from seed + i, so a seed fixes every choice."""
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(f"seed must be an integer, not {seed!r}", "seed")
    if temperature == 0 or top_p == 0:
        return [Greedy() for _ in range(n)]
    return [TopP(top_p, temperature, None if seed is None else seed + i) for i in range(n)]


def max_tokens(body, default):
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    return integer(body, name, default, 1, MAX_TOKENS_LIMIT)


# ---------------------------------------------------------------------------- generation


def response_grammar(body):
    """The grammar `response_format` asks for: None for text, any JSON object for
    json_object, the schema for json_schema (pie.inferlet.grammar, llguidance)."""
    response_format = body.get("response_format")
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(
                "response_format.json_schema.schema must be an object", "response_format"
            )
        return Grammar.json_schema(schema)
    raise ApiError(
        "response_format.type must be one of text, json_object, json_schema", "response_format"
    )


async def prepare(model, prompts, body, default_max, logprobs):
    """n choices per prompt (prompt i, choice j has index i * n + j), not started yet:
    (prompt tokens, [Completion], the contexts to close after)."""
    n = integer(body, "n", 1, 1, MAX_N)
    limit, stops, sampler_list = max_tokens(body, default_max), stop_texts(body), samplers(body, n)
    grammar = response_grammar(body)
    if grammar is not None:
        if logprobs is not None:
            raise ApiError("logprobs cannot be combined with a JSON response_format", "logprobs")
        try:  # a malformed schema is the client's error, answered before anything runs
            (await grammar.matcher(model)).close()
        except GrammarError as e:
            raise ApiError(f"response_format: {e}", "response_format") from None
    runs, contexts, prompt_tokens = [], [], 0
    for prompt in prompts:
        ctx = model.create_context()
        if isinstance(prompt, str):
            ctx.fill(prompt)
        else:
            ctx.fill_tokens(prompt)
        prompt_tokens += len(ctx)
        forks = [ctx] if n == 1 else await ctx.fork_many(n)
        contexts += [ctx, *forks] if n > 1 else forks
        runs += [
            Completion(
                f, s, limit, stops, logprobs, stream=bool(body.get("stream")), grammar=grammar
            )
            for f, s in zip(forks, sampler_list, strict=True)
        ]
    return prompt_tokens, runs, contexts


async def collect_all(runs, contexts):
    """Every choice generated at once: [(completion, text, token logprobs)]."""

    async def collect(run):
        text, entries = [], []
        async for delta in run.deltas():
            text.append(delta.text)
            entries += delta.logprobs
        return run, "".join(text), entries

    results = await gather(*(collect(run) for run in runs))
    for ctx in contexts:
        ctx.close()
    return results


async def stream_all(request, head, prompt_tokens, runs, contexts, shape):
    """Every choice generated at once, sent as server-sent events while it is decoded.

    `shape` says how an endpoint's choice looks: opening (chat's role delta, or None),
    piece(delta, sent so far), closing. With include_usage every chunk has
    "usage": null and a last chunk with no choices carries the usage, as OpenAI sends it.
    """
    include_usage = (request.json().get("stream_options") or {}).get("include_usage", False)
    opening, piece, closing = shape
    resp = await request.start_response(200, SSE)

    async def send(choices, usage_=None):
        chunk = {**head, "choices": choices}
        if include_usage:
            chunk["usage"] = usage_
        await resp.write(f"data: {json.dumps(chunk)}\n\n")

    async def one(index, run):
        if opening is not None:
            await send([{"index": index, **opening, "logprobs": None, "finish_reason": None}])
        sent = 0
        async for delta in run.deltas():
            await send([{"index": index, **piece(delta, sent), "finish_reason": None}])
            sent += len(delta.text)
        choice = {"index": index, **closing, "logprobs": None, "finish_reason": run.finish_reason}
        await send([choice])

    await gather(*(one(i, run) for i, run in enumerate(runs)))
    for ctx in contexts:
        ctx.close()
    if include_usage:
        await send([], usage(prompt_tokens, runs))
    await resp.write("data: [DONE]\n\n")
    await resp.finish()


def usage(prompt_tokens, runs):
    completion = sum(run.completion_tokens for run in runs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def chat_logprobs(entries):
    return {
        "content": [
            {
                "token": e.text,
                "logprob": e.logprob,
                "bytes": list(e.text.encode("utf-8")),
                "top_logprobs": [
                    {"token": t, "logprob": p, "bytes": list(t.encode("utf-8"))} for t, p in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries, at=0):
    offsets = []
    for e in entries:
        offsets.append(at)
        at += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


# ---------------------------------------------------------------------------- endpoints


def chat_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", "messages")
    rendered = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise ApiError(f"{where} must have a role among {', '.join(CHAT_ROLES)}", where)
        content = message.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(
                    f'{where}.content parts must be {{"type": "text", "text": ...}}',
                    f"{where}.content",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"{where}.content must be a string or text parts", f"{where}.content")
        rendered.append({"role": CHAT_ROLES[message["role"]], "content": content})
    return rendered


async def chat_completion(request):
    body = parse_body(request)
    messages = chat_messages(body)
    model = served_model(body)
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError("logprobs must be a boolean", "logprobs")
    top = integer(body, "top_logprobs", 0, 0, model.dist_size)
    if body.get("top_logprobs") is not None and not want:
        raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
    try:
        prompt = model.render_chat(messages, add_generation_prompt=True)
    except NoChatTemplate as e:
        raise ApiError(f"{e}: use /v1/completions", "messages") from None
    except TemplateError as e:  # e.g. the template refuses a role order
        raise ApiError(f"the model's chat template refused the messages: {e}", "messages") from None
    prompt_tokens, runs, contexts = await prepare(
        model, [prompt], body, MAX_TOKENS_LIMIT, top if want else None
    )
    head = {
        "id": f"chatcmpl-{get_instance_id()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.name,
        "system_fingerprint": None,
    }
    if body.get("stream"):

        def piece(delta, _sent):
            scored = chat_logprobs(delta.logprobs) if want else None
            return {"delta": {"content": delta.text}, "logprobs": scored}

        opening = {"delta": {"role": "assistant", "content": "", "refusal": None}}
        head["object"] = "chat.completion.chunk"
        await stream_all(
            request, head, prompt_tokens, runs, contexts, (opening, piece, {"delta": {}})
        )
        return None
    results = await collect_all(runs, contexts)
    return ok(
        {
            **head,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": chat_logprobs(entries) if want else None,
                    "finish_reason": run.finish_reason,
                }
                for i, (run, text, entries) in enumerate(results)
            ],
            "usage": usage(prompt_tokens, runs),
        }
    )


def prompts_of(body):
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) and t >= 0 for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p) for p in prompt):
            return prompt
    raise ApiError("prompt must be a string, a list of strings, or token ids", "prompt")


async def text_completion(request):
    body = parse_body(request)
    prompts = prompts_of(body)
    model = served_model(body)
    logprobs = integer(body, "logprobs", None, 0, model.dist_size)
    prompt_tokens, runs, contexts = await prepare(model, prompts, body, 16, logprobs)
    head = {
        "id": f"cmpl-{get_instance_id()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.name,
        "system_fingerprint": None,
    }
    if body.get("stream"):

        def piece(delta, sent):
            scored = None if logprobs is None else completion_logprobs(delta.logprobs, sent)
            return {"text": delta.text, "logprobs": scored}

        await stream_all(request, head, prompt_tokens, runs, contexts, (None, piece, {"text": ""}))
        return None
    results = await collect_all(runs, contexts)
    return ok(
        {
            **head,
            "choices": [
                {
                    "index": i,
                    "text": text,
                    "logprobs": None if logprobs is None else completion_logprobs(entries),
                    "finish_reason": run.finish_reason,
                }
                for i, (run, text, entries) in enumerate(results)
            ],
            "usage": usage(prompt_tokens, runs),
        }
    )


def model_object(name):
    return {"id": name, "object": "model", "created": 0, "owned_by": "pie"}


def models(path):
    names = get_all_models()
    if path == "/v1/models":
        return ok({"object": "list", "data": [model_object(n) for n in names]})
    name = path[len("/v1/models/") :]
    if name not in names:
        raise ApiError(f"the model {name!r} does not exist", "model", "model_not_found", 404)
    return ok(model_object(name))


ROUTES = {
    "/v1/chat/completions": ("POST", chat_completion),
    "/v1/completions": ("POST", text_completion),
}


async def handle(request):
    path = request.path.rstrip("/")
    try:
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if request.method != "GET":
                raise ApiError(f"use GET for {path}", status=405)
            return models(path)
        if path not in ROUTES:
            raise ApiError(f"no route {request.method} {path}", status=404, code="unknown_url")
        method, endpoint = ROUTES[path]
        if request.method != method:
            raise ApiError(f"use {method} for {path}", status=405)
        return await endpoint(request)
    except ApiError as e:
        return e.response()


main = http_main(handle)
