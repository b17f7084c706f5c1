"""The worker role: clowder.v1.Worker over this node's replicas (replicas.py), and its part of the node's
membership session: report the replicas, run those the controller assigns (assignments.py).

The worker opens the node's content store at <data_dir>/store (model views are hard links into it),
and scrubs it in the background unless the storage role does (clowderd.store.scrub).
At shutdown the membership session stops first; once the servers have stopped taking calls, every
replica is unloaded (engine hosts exit, views are removed), then the store is closed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from clowder.v1 import common_pb2, inference_pb2, worker_pb2, worker_pb2_grpc
from clowderd.engines.base import Finished
from clowderd.engines.errors import AdapterError, EngineError, InvalidRequest
from clowderd.errors import InvalidInput, NotFound
from clowderd.server import StatusCodes
from clowderd.store import scrub
from clowderd.store.content import ContentStore
from clowderd.trust import authz
from clowderd.worker.assignments import Assignments
from clowderd.worker.engine_requests import engine_request
from clowderd.worker.replicas import Replica, ReplicaManager, ReplicaUnavailable

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger(__name__)

DEFAULT_UNLOAD_GRACE_S = 5.0

# Errors of the replica manager and the engines, as gRPC status codes; the message is the error's.
STATUS_CODES = StatusCodes(
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ReplicaUnavailable, grpc.StatusCode.UNAVAILABLE),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (EngineError, grpc.StatusCode.INTERNAL),
)
HANDLED, status_code = STATUS_CODES.handled, STATUS_CODES.code


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, replicas: ReplicaManager, node_name: str, authorizer: authz.Authorizer | None):
        self.replicas = replicas
        self.node_name = node_name
        self.authorizer = authorizer  # None with insecure = true

    def status(self, replica: Replica) -> common_pb2.ReplicaStatus:
        since = timestamp_pb2.Timestamp()
        since.FromNanoseconds(replica.since_ns)
        return common_pb2.ReplicaStatus(
            replica_id=replica.id, deployment=replica.spec.deployment, node_name=self.node_name,
            state=replica.state, message=replica.message, observed_generation=replica.spec.generation,
            in_flight=replica.in_flight, state_since=since)

    async def LoadReplica(self, request: worker_pb2.LoadReplicaRequest,
                          context: grpc.aio.ServicerContext) -> common_pb2.ReplicaStatus:
        try:
            return self.status(self.replicas.load(request.spec))
        except HANDLED as e:
            await context.abort(status_code(e), str(e))

    async def UnloadReplica(self, request: worker_pb2.UnloadReplicaRequest,
                            context: grpc.aio.ServicerContext) -> common_pb2.ReplicaStatus:
        grace = request.grace.ToTimedelta().total_seconds() if request.HasField("grace") else 0.0
        try:
            replica = await self.replicas.unload(request.replica_id, grace or DEFAULT_UNLOAD_GRACE_S)
        except HANDLED as e:
            await context.abort(status_code(e), str(e))
        return self.status(replica)

    async def ListReplicas(self, request: worker_pb2.ListReplicasRequest,
                           context: grpc.aio.ServicerContext) -> worker_pb2.ListReplicasResponse:
        return worker_pb2.ListReplicasResponse(
            replicas=[self.status(r) for r in self.replicas.list(request.deployment)])

    async def Generate(self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async for out in generate_responses(self.replicas, request):
                yield out
        except HANDLED as e:
            await context.abort(status_code(e), str(e))

    async def Complete(self, requests: AsyncIterator[worker_pb2.CompleteRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.CompleteResponse]:
        """Each request runs in a task of its own; each answer goes out when its request ends. The
        caller's certificate was checked when the call began, and is checked again at each request."""
        holder = authz.caller()
        answers: asyncio.Queue[worker_pb2.CompleteResponse | str | None] = asyncio.Queue()
        running: dict[int, asyncio.Task] = {}

        async def answer(tag: int, request: worker_pb2.GenerateRequest) -> None:
            out = worker_pb2.CompleteResponse(tag=tag)
            try:
                out.response.CopyFrom(await complete_response(self.replicas, request))
            except HANDLED as e:
                out.status_code, out.status_message = status_code(e).value[0], str(e)
            except Exception as e:  # one request's failure must not end the others on the call
                log.exception("request failed", extra={"request": request.request_id})
                out.status_code = grpc.StatusCode.INTERNAL.value[0]
                out.status_message = f"internal error: {type(e).__name__}: {e}"
            answers.put_nowait(out)

        async def take() -> None:
            try:
                async for message in requests:
                    why = holder and authz.lapsed(holder, self.authorizer.revocations)
                    if why:
                        answers.put_nowait(why)
                        return
                    if message.HasField("request"):
                        task = running[message.tag] = asyncio.create_task(answer(message.tag, message.request))
                        task.add_done_callback(lambda _, tag=message.tag: running.pop(tag, None))
                    elif message.cancel and message.tag in running:
                        running[message.tag].cancel()
                await asyncio.gather(*running.values(), return_exceptions=True)  # the caller is done sending
            finally:
                answers.put_nowait(None)

        taking = asyncio.create_task(take())
        try:
            while (out := await answers.get()) is not None:
                if isinstance(out, str):
                    await self.authorizer.refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                                                 "/clowder.v1.Worker/Complete", out, holder)
                yield out
        finally:
            taking.cancel()
            for task in list(running.values()):
                task.cancel()


async def generate_responses(replicas: ReplicaManager,
                             request: worker_pb2.GenerateRequest) -> AsyncIterator[worker_pb2.GenerateResponse]:
    """Worker.Generate's answer, for the gRPC service and for an lb in this process alike. Raises the
    errors of STATUS_CODES."""
    t0 = time.monotonic_ns()
    first = True
    prepared, echo = engine_request(request)
    async for event in replicas.generate(request.replica_id, prepared, request.adapter_digest):
        out = worker_pb2.GenerateResponse(index=0)
        if first:
            out.queue_time.FromNanoseconds(time.monotonic_ns() - t0)
            out.text, first = echo, False
        if isinstance(event, Finished):
            _finish(out, event)
        else:
            out.text += event.text
        yield out


async def complete_response(replicas: ReplicaManager, request: worker_pb2.GenerateRequest) -> worker_pb2.GenerateResponse:
    """One answer of Worker.Complete: what Generate streams, as one message (the text joined, the finish
    reason and usage of the end, the queue time before the first event). Raises the errors of
    STATUS_CODES."""
    t0 = time.monotonic_ns()
    whole = worker_pb2.GenerateResponse(index=0)
    prepared, echo = engine_request(request)
    texts = [echo]
    events = replicas.generate(request.replica_id, prepared, request.adapter_digest)
    async with contextlib.aclosing(events):
        async for event in events:
            if not whole.HasField("queue_time"):
                whole.queue_time.FromNanoseconds(time.monotonic_ns() - t0)
            if isinstance(event, Finished):
                _finish(whole, event)
            else:
                texts.append(event.text)
    whole.text = "".join(texts)
    return whole


def _finish(out: worker_pb2.GenerateResponse, event: Finished) -> None:
    """The end of a choice in out: its finish reason and usage."""
    out.finish_reason = event.finish_reason
    u = event.usage
    out.usage.CopyFrom(inference_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                           total_tokens=u.prompt_tokens + u.completion_tokens))


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the worker role's services to its server, and its part to the node's membership session."""
    config = process.config
    store = ContentStore(Path(config.data_dir) / "store")
    scrub.run_in(process, store, "worker")
    replicas = ReplicaManager(store, config.worker_pull_from, process.dialer)
    servicer = WorkerServicer(replicas, config.node_name, process.authorizer("worker"))
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    # Generation is the lb's (the middleware chain runs there; an lb in this process calls the replicas
    # directly); what runs where is the controller's.
    process.allow("worker", "clowder.v1.Worker", {"Generate": ("lb",), "Complete": ("lb",), "LoadReplica": ("controller",),
                                                  "UnloadReplica": ("controller",),
                                                  "ListReplicas": ("controller", "lb", "admin")})
    process.local_replicas = replicas  # an lb in this process calls them without a network hop
    process.role_reports.append(Assignments(replicas, servicer.status, replicas.views.index.manifest_digests,
                                            DEFAULT_UNLOAD_GRACE_S))

    async def close_store() -> None:
        store.close()

    async def unload_replicas() -> None:
        # Process.shutdown gives each callback max(grace, 1 s); engines still there at half of
        # that are killed, so that none outlives clowderd.
        await replicas.close(max(config.shutdown_grace_seconds, 1.0) / 2)

    process.on_shutdown(close_store, "close the worker's store")
    process.on_shutdown(unload_replicas, "unload the worker's replicas")  # runs first
