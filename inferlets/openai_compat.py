"""openai-compat: an HTTP server instance answering OpenAI-style chat completions.

Launch with launch_server_instance; every request runs in a fresh instance.

    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}],
                                 "max_tokens": 32, "temperature": 0}
    GET  /v1/models

The messages are rendered with the model's own chat template; generation is
greedy unless temperature > 0 (then top-p 0.95 at that temperature). No
streaming.
"""

import json

from pie.inferlet import Greedy, TemplateError, TopP, get_auto_model, get_instance_id, time_ms
from pie.inferlet.server import http_main

MAX_TOKENS_LIMIT = 512


def error(status, message):
    return {
        "status": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({"error": {"message": message, "type": "invalid_request_error"}}),
    }


async def chat_completion(request):
    try:
        body = request.json()
    except ValueError:
        return error(400, "the body is not JSON")
    messages = body.get("messages") if isinstance(body, dict) else None
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        return error(400, "messages must be a non-empty list of {role, content} strings")
    max_tokens = body.get("max_tokens", 64)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        return error(400, f"max_tokens must be an integer in 1..{MAX_TOKENS_LIMIT}")
    temperature = body.get("temperature", 0) or 0

    model = get_auto_model()
    ctx = model.create_context()
    try:
        prompt = model.render_chat(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            add_generation_prompt=True,
        )
    except TemplateError as e:  # e.g. the template refuses a role order
        return error(400, f"the model's chat template refused the messages: {e}")
    ctx.fill(prompt)
    prompt_tokens = len(ctx)
    sampler = Greedy() if temperature <= 0 else TopP(0.95, temperature=float(temperature))
    tokens = await ctx.generate_tokens(sampler, ctx.eos_stop(max_tokens))
    finish = "stop" if tokens[-1] in model.eos_token_ids else "length"
    if finish == "stop":
        tokens = tokens[:-1]
    answer = {
        "id": f"chatcmpl-{get_instance_id()}",
        "object": "chat.completion",
        "created": time_ms() // 1000,
        "model": model.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": model.tokenizer.detokenize(tokens)},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        },
    }
    return {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(answer),
    }


async def handle(request):
    if request.path == "/v1/chat/completions":
        if request.method != "POST":
            return error(405, "use POST")
        return await chat_completion(request)
    if request.path == "/v1/models":
        model = get_auto_model()
        return {
            "status": 200,
            "headers": {"content-type": "application/json"},
            "body": json.dumps(
                {
                    "object": "list",
                    "data": [{"id": model.name, "object": "model", "owned_by": "pie"}],
                }
            ),
        }
    return error(404, f"no route {request.path}")


main = http_main(handle)
