"""The messages between the worker (client.py, a zmq DEALER) and the engine host (host.py, a ROUTER).

Every message is one JSON object in one frame, with a `type` and, except `ready`, the `id` of the call or
stream it belongs to. The client calls with:
    hello                                   answered with `ready` once the model is loaded
    generate  {id, request}                 answered with `token`* then `finish`, or `error`
    cancel    {id}                          the stream `id` ends with finish_reason "cancelled"
    health    {id}   metrics {id}           answered with `result`
    add_adapter {id, name, path}   remove_adapter {id, name}   unload {id}   answered with `result`
The host sends:
    ready     {engine, model_dir, adapters, context, pid}
    token     {id, text}
    finish    {id, finish_reason, usage: {prompt_tokens, completion_tokens}}
    result    {id, value}
    error     {id, kind, message}       kind: errors.ERRORS_BY_KIND (id null: the load failed)
"""
from __future__ import annotations

import json

from clowderd.engines.base import Event, Finished, TextDelta, Usage
from clowderd.engines.errors import EngineError, error_from_kind

LOAD_FAILED_STATUS = 3  # the host's exit status when the model could not be loaded


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(frame: bytes) -> dict:
    msg = json.loads(frame)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ValueError(f"not a protocol message: {frame[:100]!r}")
    return msg


def event_message(request_id: str, event: Event) -> dict:
    if isinstance(event, TextDelta):
        return {"type": "token", "id": request_id, "text": event.text}
    return {"type": "finish", "id": request_id, "finish_reason": event.finish_reason,
            "usage": {"prompt_tokens": event.usage.prompt_tokens,
                      "completion_tokens": event.usage.completion_tokens}}


def message_event(msg: dict) -> Event:
    if msg["type"] == "token":
        return TextDelta(msg["text"])
    return Finished(msg["finish_reason"], Usage(**msg["usage"]))


def error_message(call_id: str | None, error: Exception) -> dict:
    kind = error.kind if isinstance(error, EngineError) else EngineError.kind
    message = str(error) if isinstance(error, EngineError) else f"internal error: {type(error).__name__}: {error}"
    return {"type": "error", "id": call_id, "kind": kind, "message": message}


def message_error(msg: dict) -> EngineError:
    return error_from_kind(msg.get("kind", EngineError.kind), msg.get("message", "unknown error"))
