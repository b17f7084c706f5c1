"""The lb's calls to workers: one gRPC channel per worker address; Worker.Generate per streamed call, and
one Worker.Complete call kept open per worker for the calls that do not stream (Completions). Closing the
stream early (the caller went away) cancels the call, and with it the generation on the replica."""
from __future__ import annotations

import asyncio
import itertools
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

    @classmethod
    def of(cls, error: grpc.aio.AioRpcError) -> "UpstreamError":
        return cls(error.code(), error.details() or error.code().name)


STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class Completions:
    """One Worker.Complete call kept open to a worker: each request goes out with a tag of its own, and its
    answer is matched back by tag. When the call ends (the worker went away or refused it), the requests
    waiting on it fail with its status, and `ended` says a new call is needed."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub):
        self._call = stub.Complete()
        self._tags = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._sending = asyncio.Lock()  # one message at a time on a gRPC call
        self._cancels: set[asyncio.Task] = set()
        self.ended: UpstreamError | None = None
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        error = UpstreamError(grpc.StatusCode.UNAVAILABLE, "the worker ended the call")
        try:
            async for answer in self._call:
                waiting = self._waiting.pop(answer.tag, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except grpc.aio.AioRpcError as e:
            error = UpstreamError.of(e)
        except asyncio.CancelledError:  # the channel was closed
            error = UpstreamError(grpc.StatusCode.UNAVAILABLE, "the call to the worker was closed")
        finally:
            self.ended = error
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(error)
            self._waiting.clear()

    async def complete(self, request: worker_pb2.GenerateRequest) -> worker_pb2.GenerateResponse:
        """The request's whole answer; raises UpstreamError. Cancelling it cancels the request on the worker."""
        if self.ended is not None:
            raise self.ended
        tag = next(self._tags)
        waiting = self._waiting[tag] = asyncio.get_running_loop().create_future()
        try:
            async with self._sending:
                await self._call.write(worker_pb2.CompleteRequest(tag=tag, request=request))
            answer = await waiting
        except grpc.aio.AioRpcError as e:  # the call ended before the request was sent
            self._waiting.pop(tag, None)
            raise UpstreamError.of(e) from None
        except asyncio.CancelledError:
            if self._waiting.pop(tag, None) is not None and self.ended is None:
                cancel = asyncio.get_running_loop().create_task(self._cancel(tag))
                self._cancels.add(cancel)
                cancel.add_done_callback(self._cancels.discard)
            raise
        if answer.status_code:
            raise UpstreamError(STATUS_BY_NUMBER.get(answer.status_code, grpc.StatusCode.UNKNOWN),
                                answer.status_message)
        return answer.response

    async def _cancel(self, tag: int) -> None:
        try:
            async with self._sending:
                await self._call.write(worker_pb2.CompleteRequest(tag=tag, cancel=True))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass  # the call has ended, and with it every request on it

    async def retire(self) -> None:
        """No more requests: the worker ends the call once those running have been answered."""
        try:
            async with self._sending:
                await self._call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass


class Workers:
    """Worker.Generate on any worker: over gRPC with the lb's certificate (dialer), or, for the worker role
    of this same process (`local`: its node name and replica manager), by calling it directly."""

    def __init__(self, dialer: Dialer, local: tuple[str, object] | None = None):
        self.dialer = dialer
        self.local = local
        self._channels: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = {}
        self._completions: dict[str, Completions] = {}
        self._generation = dialer.generation
        if local is not None:  # only then: a node that is just an lb never loads the worker's code
            from clowderd.worker import service
            self._worker_service = service

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if self.dialer.generation != self._generation:
            # The lb's certificate was renewed: new calls go on channels that present the new one; the old
            # channels close once their calls are done.
            loop = asyncio.get_running_loop()
            for completions in self._completions.values():
                loop.create_task(completions.retire())
            for old, _ in self._channels.values():
                loop.create_task(old.close(grace=RETIRED_CHANNEL_GRACE_S))
            self._channels, self._completions, self._generation = {}, {}, self.dialer.generation
        held = self._channels.get(address)
        if held is None:
            channel = self.dialer.aio_channel(address, "worker")
            held = self._channels[address] = channel, worker_pb2_grpc.WorkerStub(channel)
        return held[1]

    def _completions_to(self, address: str) -> Completions:
        stub = self._stub(address)
        completions = self._completions.get(address)
        if completions is None or completions.ended is not None:
            completions = self._completions[address] = Completions(stub)
        return completions

    async def generate(self, endpoint: Endpoint, request: worker_pb2.GenerateRequest,
                       stream: bool = True) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """The worker's responses; raises UpstreamError. Closing the iterator early cancels the call.
        stream False: one response with the whole choice (on Worker.Complete), for a caller that waits for it."""
        if self.local is not None and endpoint.node_name == self.local[0]:
            service = self._worker_service
            try:
                async for response in service.generate_responses(self.local[1], request):
                    yield response
            except service.HANDLED as e:
                raise UpstreamError(service.status_code(e), str(e)) from None
            return
        if not stream:
            yield await self._completions_to(endpoint.worker_address).complete(request)
            return
        call = self._stub(endpoint.worker_address).Generate(request)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as e:
            raise UpstreamError.of(e) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    async def close(self) -> None:
        self._completions.clear()
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
