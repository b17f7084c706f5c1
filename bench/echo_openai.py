"""A benchmark fixture, not a model: an OpenAI-compatible HTTP server (Starlette under uvicorn with uvloop
and httptools) that answers /v1/chat/completions at once with the caller's last message, streamed or not:
the backend that LiteLLM's proxy is measured in front of.

    python bench/echo_openai.py PORT
"""
from __future__ import annotations

import json
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


async def chat_completions(request: Request):
    body = await request.json()
    text = body["messages"][-1]["content"]
    words = text.split(" ")[:body.get("max_tokens") or None]
    head = {"id": "chatcmpl-echo", "created": int(time.time()), "model": body.get("model", "echo")}
    usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(words),
             "total_tokens": len(text.split()) + len(words)}
    if not body.get("stream"):
        return JSONResponse({**head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "stop"}]})

    async def events():
        for i, word in enumerate(words):
            delta = {"content": word if i == 0 else " " + word, **({"role": "assistant"} if i == 0 else {})}
            chunk = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        last = {**head, "object": "chat.completion.chunk", "usage": usage,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": "bench"}]})


app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                        Route("/v1/models", models)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                loop="uvloop", http="httptools")
