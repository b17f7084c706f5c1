"""The lb's calls to workers: one gRPC channel per worker address, Worker.Generate per call. Closing the
stream early (the caller went away) cancels the call, and with it the generation on the replica."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from clowder.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from clowderd.lb.api import INT64_MAX
from clowderd.lb.routes import Endpoint
from clowderd.middleware.base import Call
from clowderd.trust.dial import Dialer

RETIRED_CHANNEL_GRACE_S = 600.0  # calls on a channel replaced at a renewal get this long to finish
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "ignore_eos")


def generate_request(call: Call, replica_id: str, seed_offset: int = 0) -> worker_pb2.GenerateRequest:
    """The call, after the middleware chain, as a worker request for one choice."""
    sampling = inference_pb2.SamplingParams(**{k: v for k, v in call.sampling.items() if k in SAMPLING_FIELDS})
    if seed_offset and sampling.HasField("seed"):  # the choices of one call differ; int64 wraps to 0
        sampling.seed = (sampling.seed + seed_offset) % (INT64_MAX + 1)
    request = worker_pb2.GenerateRequest(replica_id=replica_id, request_id=f"{call.id}-{seed_offset}",
                                         adapter_digest=call.adapter_digest)
    if call.method == "chat":
        request.chat.CopyFrom(inference_pb2.ChatCompletionRequest(
            model=call.model, sampling=sampling, user=call.user, metadata=call.metadata,
            messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"], name=m.get("name", ""))
                      for m in call.messages]))
    else:
        request.completion.CopyFrom(inference_pb2.CompletionRequest(
            model=call.model, prompt=call.prompt, sampling=sampling, user=call.user, metadata=call.metadata,
            echo=call.echo))
    return request


class UpstreamError(Exception):
    """A worker refused or failed a call: its gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class Workers:
    """Worker.Generate on any worker: over gRPC with the lb's certificate (dialer), or, for the worker role
    of this same process (`local`: its node name and replica manager), by calling it directly."""

    def __init__(self, dialer: Dialer, local: tuple[str, object] | None = None):
        self.dialer = dialer
        self.local = local
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._generation = dialer.generation
        if local is not None:  # only then: a node that is just an lb never loads the worker's code
            from clowderd.worker import service
            self._worker_service = service

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if self.dialer.generation != self._generation:
            # The lb's certificate was renewed: new calls go on channels that present the new one; the old
            # channels close once their calls are done.
            for old in self._channels.values():
                asyncio.get_running_loop().create_task(old.close(grace=RETIRED_CHANNEL_GRACE_S))
            self._channels, self._generation = {}, self.dialer.generation
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.dialer.aio_channel(address, "worker")
        return worker_pb2_grpc.WorkerStub(channel)

    async def generate(self, endpoint: Endpoint,
                       request: worker_pb2.GenerateRequest) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """The worker's responses; raises UpstreamError. Closing the iterator early cancels the call."""
        if self.local is not None and endpoint.node_name == self.local[0]:
            service = self._worker_service
            try:
                async for response in service.generate_responses(self.local[1], request):
                    yield response
            except service.HANDLED as e:
                raise UpstreamError(service.status_code(e), str(e)) from None
            return
        call = self._stub(endpoint.worker_address).Generate(request)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as e:
            raise UpstreamError(e.code(), e.details() or e.code().name) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
