"""The lb's front ends (OpenAI HTTP under uvicorn, with clowderd's HTTP server settings; Inference over
gRPC) and dispatcher running in a thread of the test process, on loopback ports, with a route table the
test fills: for testing the lb in front of real workers before a controller publishes routes."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
import uvicorn

from clowder.v1 import common_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from clowderd.config import HttpLimits
from clowderd.httpserver import server_config
from clowderd.lb.node import LbCore
from clowderd.trust.dial import Dialer
from clowderd.lb.openai_http import OpenAIApp, protocol_error
from clowderd.lb.routes import Endpoint, Route
from clowderd.lb.service import InferenceServicer
from clowderd.middleware.registry import LbPolicy
from tests.clowderd_proc import free_port
from tests.tls_certs import TlsFiles
from tests.worker_fixtures import build_chat_image, start_worker


class LbServer:
    def __init__(self, data_dir: Path, *, keys_file: Path | None = None, requests_per_minute: int | None = None,
                 max_body_bytes: int = 1 << 20, limits: HttpLimits = HttpLimits(), tls: TlsFiles | None = None):
        self.policy = LbPolicy(data_dir=data_dir, keys_file=keys_file, requests_per_minute=requests_per_minute,
                               audit_log=data_dir / "audit.log")
        self.max_body = max_body_bytes
        self.limits = limits
        self.tls = tls
        self.http_port, self.grpc_port = free_port(), free_port()
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lb", daemon=True)
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError("the lb did not start")

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}/v1"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        core = LbCore(self.policy, Dialer(None))  # the workers of these tests are of no cluster
        self.routes, self.workers, self.chains, self.dispatcher = core.routes, core.workers, core.chains, core.dispatcher
        grpc_server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.dispatcher), grpc_server)
        grpc_server.add_insecure_port(self.grpc_address)
        await grpc_server.start()
        config = server_config(OpenAIApp(self.dispatcher, self.max_body).app(), self.limits, error_body=protocol_error,
                               tls_cert=str(self.tls.cert) if self.tls else None,
                               tls_key=str(self.tls.key) if self.tls else None, port=self.http_port)
        self.http = uvicorn.Server(config)
        self.http.install_signal_handlers = lambda: None
        serving = asyncio.ensure_future(self.http.serve())
        while not self.http.started:
            await asyncio.sleep(0.01)
        self._started.set()
        await serving
        await grpc_server.stop(1)
        await self.workers.close()
        await core.shared.close()

    def put_route(self, route: Route) -> None:
        """Publish a route, as the controller's route watch does."""
        async def put():
            self.chains.forget(route.deployment)
            self.routes.put(route)
        asyncio.run_coroutine_threadsafe(put(), self.loop).result(5)

    def stop(self) -> None:
        self.http.should_exit = True
        self._thread.join(15)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A worker clowderd serving a tiny chat llama as two READY replicas, chat-0 and chat-1; yields the
    process, a Worker stub and the image."""
    workdir = tmp_path_factory.mktemp("lb-worker")
    image = build_chat_image(workdir / "data" / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    proc = start_worker(workdir, workdir / "data")
    stub = worker_pb2_grpc.WorkerStub(proc.channel("worker"))
    for replica_id in ("chat-0", "chat-1"):
        stub.LoadReplica(worker_pb2.LoadReplicaRequest(spec=common_pb2.ReplicaSpec(
            replica_id=replica_id, deployment="tiny", image=image.name, manifest_digest=image.digest,
            generation=1)), timeout=10)
    deadline = time.monotonic() + 60
    while True:
        states = {r.replica_id: r.state for r in stub.ListReplicas(worker_pb2.ListReplicasRequest()).replicas}
        if all(s == common_pb2.ReplicaState.REPLICA_STATE_READY for s in states.values()):
            break
        assert time.monotonic() < deadline, f"replicas not ready: {states}\n{proc.stderr_text()}"
        time.sleep(0.1)
    yield proc, stub, image
    assert proc.stop() == 0


def tiny_route(worker, deployment: str = "tiny", config: dict | None = None, endpoints=None) -> Route:
    """A route to the worker fixture's two replicas, as `deployment` with the aimage configuration `config`."""
    proc, _, image = worker
    address = proc.addresses["worker"]
    endpoints = endpoints or [Endpoint("chat-0", address), Endpoint("chat-1", address)]
    return Route(deployment, endpoints, image=image.name, manifest_digest=image.digest, config=config or {},
                 created=1_700_000_000)
