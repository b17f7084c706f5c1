"""The controller role in a thread of the test process, on a loopback port, for tests that place replicas
through the calls the scheduler makes (Cluster.assign / unassign) and watch real workers act on them.
It runs with insecure = true, its public and cluster services on one port: workers that join it say
insecure = true too (`joining`)."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine

import grpc

from clowder.v1 import common_pb2
from clowderd.controller.service import Controller
from clowderd.controller.state import NodeRecord, ReplicaRecord
from tests.clowderd_proc import free_port


class InProcessController:
    def __init__(self, data_dir: Path, *, heartbeat_interval: float = 0.5, heartbeat_grace: float = 3.0,
                 port: int | None = None):
        self.data_dir = data_dir
        self.address = f"127.0.0.1:{port or free_port()}"
        self.join_token_file = data_dir / "controller" / "join-token"
        self._timing = (heartbeat_interval, heartbeat_grace)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),),
                                        name="controller", daemon=True)
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError("the controller did not start")

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.controller = Controller(self.data_dir, *self._timing, self._stop.wait, certificate_lifetime=None)
        server = grpc.aio.server()
        self.controller.add_public(server, lambda: self.address)
        self.controller.add_cluster(server)
        server.add_insecure_port(self.address)
        await server.start()
        sweep = asyncio.create_task(self.controller.mark_silent_nodes_unreachable())
        self._started.set()
        await self._stop.wait()
        sweep.cancel()
        await server.stop(1)
        await self.controller.close()

    def joining(self) -> dict:
        """The [cluster] section of a node that joins this controller."""
        return {"controller": self.address, "join_token_file": str(self.join_token_file), "insecure": True}

    def run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(15)

    def node(self, name: str) -> NodeRecord:
        cluster = self.controller.cluster
        return self.run(lambda: cluster.call(cluster.state.node_by_name, name))

    def replica(self, replica_id: str) -> ReplicaRecord:
        cluster = self.controller.cluster
        return self.run(lambda: cluster.call(cluster.state.replica, replica_id))

    def assign(self, spec: common_pb2.ReplicaSpec, node_name: str) -> None:
        node_id = self.node(node_name).id
        self.run(lambda: self.controller.cluster.assign(spec, node_id, time.time()))

    def unassign(self, replica_id: str) -> None:
        self.run(lambda: self.controller.cluster.unassign(replica_id, time.time()))

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        self.loop.close()

    def restarted(self) -> "InProcessController":
        """Stop, and start a new controller on the same data dir and port."""
        self.stop()
        interval, grace = self._timing
        return InProcessController(self.data_dir, heartbeat_interval=interval, heartbeat_grace=grace,
                                   port=int(self.address.rsplit(":", 1)[1]))
