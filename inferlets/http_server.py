"""http-server: a demo HTTP server instance (one fresh instance per request).

GET  /            a greeting
POST /echo        the request body back
GET  /headers     the request headers as JSON
GET  /wait?ms=N   answers after sleeping N ms (at most 5000)
GET  /events?n=N  N server-sent events, one every 100 ms (at most 100), then `data: [DONE]`
anything else     404
"""

import json

from pie.inferlet import sleep
from pie.inferlet.server import http_main


async def handle(request):
    if request.path == "/":
        return "Hello from a pie server instance!"
    if request.path == "/echo":
        return {"status": 200, "headers": {"content-type": "text/plain"}, "body": request.body}
    if request.path == "/headers":
        return {
            "status": 200,
            "headers": {"content-type": "application/json"},
            "body": json.dumps(request.headers, sort_keys=True),
        }
    params = dict(p.split("=", 1) for p in request.query.split("&") if "=" in p)
    if request.path == "/events":
        n = params.get("n", "3")
        if not n.isdigit() or int(n) > 100:
            return {"status": 400, "body": "n must be an integer 0..100"}
        resp = await request.start_response(200, {"content-type": "text/event-stream"})
        for i in range(int(n)):
            if i:
                await sleep(100)
            await resp.write(f"data: {json.dumps({'event': i})}\n\n")
        await resp.write("data: [DONE]\n\n")
        await resp.finish()
        return None
    if request.path == "/wait":
        ms = params.get("ms", "100")
        if not ms.isdigit() or int(ms) > 5000:
            return {"status": 400, "body": "ms must be an integer 0..5000"}
        await sleep(int(ms))
        return f"waited {ms} ms"
    return {"status": 404, "body": f"no route {request.path}"}


main = http_main(handle)
