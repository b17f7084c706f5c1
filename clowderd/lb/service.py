"""The lb role: the Inference methods over gRPC (this module) and OpenAI-compatible HTTP
(openai_http.py), both running each call through the same Dispatcher (routing and middleware).

Errors map to gRPC status codes as clowder.v1.Inference documents them; the caller's key travels in the
`authorization` metadata ("Bearer KEY"), as it does in the HTTP header.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator

import grpc

from clowder.v1 import inference_pb2, inference_pb2_grpc
from clowderd.lb.api import grpc_body, parse_chat, parse_completion
from clowderd.lb.dispatch import ChoiceEnd, Dispatcher, Piece, Text, Usage
from clowderd.lb.errors import ApiError
from clowderd.middleware.auth import bearer
from clowderd.middleware.base import Call

if TYPE_CHECKING:
    from clowderd.server import Process


async def _call(request, method: str, context: grpc.aio.ServicerContext, stream: bool) -> Call:
    """The request as a Call, checked as the HTTP API checks its JSON (INVALID_ARGUMENT naming the field)."""
    parse = parse_chat if method == "chat" else parse_completion
    try:
        call = parse(grpc_body(request, stream))
    except ApiError as e:
        await context.abort(e.grpc_code(), e.message)
    call.include_usage = True  # a gRPC stream always ends with the usage
    call.api_key = _api_key(context)
    call.client, call.body_bytes = context.peer(), request.ByteSize()
    return call


def _api_key(context: grpc.aio.ServicerContext) -> str | None:
    return bearer(dict(context.invocation_metadata() or ()).get("authorization"))


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher

    async def ListModels(self, request, context) -> inference_pb2.ListModelsResponse:
        try:
            routes = self.dispatcher.models(_api_key(context))
        except ApiError as e:
            await context.abort(e.grpc_code(), e.message)
        return inference_pb2.ListModelsResponse(data=[
            inference_pb2.Model(id=r.deployment, created=r.created, owned_by="clowder", image=r.image)
            for r in routes])

    async def _pieces(self, call: Call, context) -> AsyncIterator[Piece]:
        try:
            async for piece in self.dispatcher.run(call):
                yield piece
            if call.response_headers:
                context.set_trailing_metadata(tuple(call.response_headers.items()))
        except ApiError as e:
            await context.abort(e.grpc_code(), e.message)

    def _head(self, call: Call) -> dict:
        route = self.dispatcher.routes.get(call.model)
        return dict(id=call.id, created=call.created, model=call.model,
                    system_fingerprint=route.manifest_digest if route else "")

    async def _collect(self, call: Call, context) -> tuple[list[str], list[str], Usage | None]:
        """Each choice's text and finish reason, and the usage."""
        n = call.sampling.get("n", 1)
        texts, finish, usage = [""] * n, [""] * n, None
        async for piece in self._pieces(call, context):
            if isinstance(piece, Text):
                texts[piece.index] += piece.text
            elif isinstance(piece, ChoiceEnd):
                finish[piece.index] = piece.finish_reason
            else:
                usage = piece
        return texts, finish, usage

    async def ChatCompletion(self, request, context) -> inference_pb2.ChatCompletionResponse:
        call = await _call(request, "chat", context, stream=False)
        texts, finish, usage = await self._collect(call, context)
        return inference_pb2.ChatCompletionResponse(
            **self._head(call), usage=_usage(usage),
            choices=[inference_pb2.ChatCompletionChoice(
                index=i, message=inference_pb2.ChatMessage(role="assistant", content=t), finish_reason=finish[i])
                for i, t in enumerate(texts)])

    async def StreamChatCompletion(self, request, context):
        call = await _call(request, "chat", context, stream=True)
        head = self._head(call)
        started: set[int] = set()
        async for piece in self._pieces(call, context):
            if isinstance(piece, Usage):
                yield inference_pb2.ChatCompletionChunk(**head, usage=_usage(piece))
                continue
            choice = inference_pb2.ChatCompletionChunkChoice(index=piece.index)
            if piece.index not in started:
                started.add(piece.index)
                choice.delta.role = "assistant"
            if isinstance(piece, Text):
                choice.delta.content = piece.text
            else:
                choice.finish_reason = piece.finish_reason
            yield inference_pb2.ChatCompletionChunk(**head, choices=[choice])

    async def Completion(self, request, context) -> inference_pb2.CompletionResponse:
        call = await _call(request, "completion", context, stream=False)
        texts, finish, usage = await self._collect(call, context)
        return inference_pb2.CompletionResponse(
            **self._head(call), usage=_usage(usage),
            choices=[inference_pb2.CompletionChoice(index=i, text=t, finish_reason=finish[i])
                     for i, t in enumerate(texts)])

    async def StreamCompletion(self, request, context):
        call = await _call(request, "completion", context, stream=True)
        head = self._head(call)
        async for piece in self._pieces(call, context):
            if isinstance(piece, Usage):
                yield inference_pb2.CompletionChunk(**head, usage=_usage(piece))
            elif isinstance(piece, Text):
                yield inference_pb2.CompletionChunk(**head, choices=[
                    inference_pb2.CompletionChoice(index=piece.index, text=piece.text)])
            else:
                yield inference_pb2.CompletionChunk(**head, choices=[
                    inference_pb2.CompletionChoice(index=piece.index, finish_reason=piece.finish_reason)])


def _usage(usage: Usage | None) -> inference_pb2.Usage | None:
    if usage is None:
        return None
    return inference_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                               total_tokens=usage.total_tokens)


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the lb role's services to its server, and start its HTTP API."""
    from clowderd.lb.node import LbNode

    node = LbNode(process)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(node.dispatcher), server)
    node.start()
