"""The lb's front ends (OpenAI HTTP under uvicorn, with clowderd's HTTP server settings; Inference over
gRPC) and dispatcher running in a thread of the test process, on loopback ports, with a route table the
test fills: for testing the lb in front of real workers before a controller publishes routes."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import uvicorn

from clowder.v1 import inference_pb2_grpc
from clowderd.config import HttpLimits
from clowderd.httpserver import server_config
from clowderd.lb.node import LbCore
from clowderd.lb.openai_http import OpenAIApp, protocol_error
from clowderd.lb.routes import Route
from clowderd.lb.service import InferenceServicer
from clowderd.middleware.registry import LbPolicy
from tests.clowderd_proc import free_port
from tests.tls_certs import TlsFiles


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
        core = LbCore(self.policy)
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
