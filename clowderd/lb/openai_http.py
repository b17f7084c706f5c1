"""OpenAI-compatible HTTP at the lb: GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
streamed (server-sent events ending in `data: [DONE]`) or not. One handler per method; errors in one place
(OpenAI's error JSON with the status that says what went wrong, also for an error after the stream began).

Every response carries the lb's own time in `x-clowder-lb-overhead-ms`: the time the call spent in the lb
and not waiting on the replica (for a stream, up to its first byte).

A caller that hangs up before its answer is whole (a call that does not stream) or before its first byte
(a stream) has the call cancelled, and with it the generation on the replica, as a stream whose caller
goes away later has (answered 499, which nobody reads, and recorded so).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from clowderd.lb.api import parse_chat, parse_completion, parse_json
from clowderd.lb.dispatch import CLIENT_GONE, ChoiceEnd, Dispatcher, Piece, Text, Usage
from clowderd.lb.errors import ApiError
from clowderd.middleware.auth import bearer
from clowderd.middleware.base import Call

log = logging.getLogger(__name__)

T = TypeVar("T")

OVERHEAD_HEADER = "x-clowder-lb-overhead-ms"
DEFAULT_MAX_BODY = 4 << 20


def _overhead_ms(call: Call) -> str:
    spent = time.perf_counter() - call.received - call.state.get("upstream_seconds", 0.0)
    return f"{spent * 1000:.3f}"


def _error_response(error: ApiError, call: Call | None = None) -> JSONResponse:
    headers = {OVERHEAD_HEADER: _overhead_ms(call)} if call is not None else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class CallerHungUp(Exception):
    """The caller closed its connection before its answer."""


async def _unless_hung_up(request: Request, work: Awaitable[T]) -> T:
    """work's result; CallerHungUp, with work cancelled, when the caller hangs up first. Only once the
    request's body has been read (the caller then sends nothing more but the end of its connection)."""
    job = asyncio.ensure_future(work)
    hang_up = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait((job, hang_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
    if not job.done():
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        raise CallerHungUp
    return job.result()


async def _hung_up(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _add_all(enc, pieces: AsyncIterator[Piece]) -> None:
    async for piece in pieces:
        enc.add(piece)


class OpenAIApp:
    def __init__(self, dispatcher: Dispatcher, max_body_bytes: int = DEFAULT_MAX_BODY):
        self.dispatcher = dispatcher
        self.max_body = max_body_bytes

    def app(self) -> Starlette:
        return Starlette(routes=[
            HttpRoute("/v1/models", self.models, methods=["GET"]),
            HttpRoute("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            HttpRoute("/v1/completions", self.completions, methods=["POST"]),
            HttpRoute("/health", self.health, methods=["GET"]),
        ], exception_handlers={404: self.not_found, 405: self.not_allowed, Exception: self.internal_error})

    # -- handlers -----------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        try:
            routes = self.dispatcher.models(bearer(request.headers.get("authorization")))
        except ApiError as e:
            return _error_response(e)
        data = [{"id": r.deployment, "object": "model", "created": r.created, "owned_by": "clowder",
                 "image": r.image} for r in routes]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, parse_chat, ChatEncoding)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, parse_completion, CompletionEncoding)

    async def not_found(self, request: Request, exc) -> Response:
        return _error_response(ApiError(404, f"no such endpoint: {request.method} {request.url.path}"))

    async def not_allowed(self, request: Request, exc) -> Response:
        return _error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        """A failure of the lb itself, still in OpenAI's JSON, which clients parse (the exception is logged)."""
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}"))

    # -- one call -----------------------------------------------------------------------------------

    async def _serve(self, request: Request, parse: Callable[[object], Call], encoding: type) -> Response:
        received = time.perf_counter()
        try:
            body = await self._body(request)
            call = parse(body)
        except ApiError as e:
            return _error_response(e)
        except ClientDisconnect:
            return Response(status_code=CLIENT_GONE)
        call.received = received
        call.body_bytes = int(request.headers.get("content-length") or 0)
        call.api_key = bearer(request.headers.get("authorization"))
        call.client = request.client.host if request.client else ""
        enc = encoding(call, self.dispatcher.routes.get(call.model))
        pieces = self.dispatcher.run(call)
        try:  # errors before the first byte get their own status
            first = await _unless_hung_up(request, anext(pieces) if call.stream else _add_all(enc, pieces))
        except ApiError as e:
            await pieces.aclose()
            return _error_response(e, call)
        except CallerHungUp:
            return Response(status_code=CLIENT_GONE)
        if call.stream:
            return StreamingResponse(self._events(enc, first, pieces), media_type="text/event-stream",
                                     headers={**call.response_headers, OVERHEAD_HEADER: _overhead_ms(call),
                                              "cache-control": "no-cache"})
        return JSONResponse(enc.whole(), headers={**call.response_headers, OVERHEAD_HEADER: _overhead_ms(call)})

    async def _body(self, request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, f"the request body is {int(declared)} bytes, over this server's limit of "
                                f"{self.max_body} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise ApiError(413, f"the request body is over this server's limit of {self.max_body} bytes")
        if not raw:
            raise ApiError(400, "the request has no body: send a JSON object")
        return parse_json(raw)

    async def _events(self, enc, first: Piece, pieces: AsyncIterator[Piece]) -> AsyncIterator[bytes]:
        try:
            for chunk in enc.chunks(first):
                yield _sse(chunk)
            async for piece in pieces:
                for chunk in enc.chunks(piece):
                    yield _sse(chunk)
        except ApiError as e:  # after the first byte the status is sent: the error travels as an event
            yield _sse(e.body())
        finally:
            await pieces.aclose()
        yield b"data: [DONE]\n\n"


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def protocol_error(status: int, message: str) -> tuple[str, bytes]:
    """An error the HTTP server answers before a request reaches the app (a client over the server's
    limits, a request that is not HTTP), in OpenAI's JSON: clients parse every error as such."""
    return "application/json", json.dumps(ApiError(status, message).body()).encode()


# -- encodings: pieces as OpenAI objects -------------------------------------------------------------

class _Encoding:
    object_whole = ""
    object_chunk = ""

    def __init__(self, call: Call, route):
        self.call = call
        self.fingerprint = route.manifest_digest if route is not None else ""
        n = call.sampling.get("n", 1)
        self.texts = [""] * n
        self.finish = [None] * n
        self.usage: Usage | None = None

    def head(self) -> dict:
        return {"id": self.call.id, "created": self.call.created, "model": self.call.model,
                "system_fingerprint": self.fingerprint}

    def add(self, piece: Piece) -> None:
        if isinstance(piece, Text):
            self.texts[piece.index] += piece.text
        elif isinstance(piece, ChoiceEnd):
            self.finish[piece.index] = piece.finish_reason
        else:
            self.usage = piece

    def chunks(self, piece: Piece) -> list[dict]:
        if isinstance(piece, Usage):
            if not self.call.include_usage:
                return []
            return [{**self.head(), "object": self.object_chunk, "choices": [], "usage": piece.as_dict()}]
        chunk = self.chunk_choice(piece)
        out = {**self.head(), "object": self.object_chunk, "choices": [chunk]}
        if self.call.include_usage:
            out["usage"] = None
        return [out]


class ChatEncoding(_Encoding):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def __init__(self, call: Call, route):
        super().__init__(call, route)
        self.started = [False] * len(self.texts)  # the first chunk of a choice carries its role

    def whole(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": self.finish[i]} for i, text in enumerate(self.texts)]
        return {**self.head(), "object": self.object_whole, "choices": choices,
                "usage": self.usage.as_dict() if self.usage else None}

    def chunk_choice(self, piece: Text | ChoiceEnd) -> dict:
        delta: dict = {}
        if not self.started[piece.index]:
            self.started[piece.index] = True
            delta["role"] = "assistant"
        if isinstance(piece, Text):
            delta["content"] = piece.text
            return {"index": piece.index, "delta": delta, "logprobs": None, "finish_reason": None}
        return {"index": piece.index, "delta": delta, "logprobs": None, "finish_reason": piece.finish_reason}


class CompletionEncoding(_Encoding):
    object_whole = "text_completion"
    object_chunk = "text_completion"

    def whole(self) -> dict:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": self.finish[i]}
                   for i, text in enumerate(self.texts)]
        return {**self.head(), "object": self.object_whole, "choices": choices,
                "usage": self.usage.as_dict() if self.usage else None}

    def chunk_choice(self, piece: Text | ChoiceEnd) -> dict:
        if isinstance(piece, Text):
            return {"index": piece.index, "text": piece.text, "logprobs": None, "finish_reason": None}
        return {"index": piece.index, "text": "", "logprobs": None, "finish_reason": piece.finish_reason}
