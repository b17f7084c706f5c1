"""The controller role on its data directory (DATA_DIR/controller): the state database, the tokens, the
admin API and Membership, and the sweep that marks silent nodes unreachable."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

import grpc

from clowder.v1 import controller_pb2_grpc
from clowderd.config import ADMIN_TOKEN_FILE, JOIN_TOKEN_FILE
from clowderd.controller.admin import AdminServicer
from clowderd.controller.cluster import Cluster
from clowderd.controller.membership import MembershipServicer
from clowderd.controller.state import ClusterState
from clowderd.controller.tokens import ClusterTokens

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger(__name__)

STATE_FILE = "controller/state.db"


class Controller:
    """The controller's parts on one data dir. `stopping` returns when the process begins to shut down;
    the watch streams end then, so that shutting down does not wait for them."""

    def __init__(self, data_dir: Path, heartbeat_interval: float, heartbeat_grace: float,
                 stopping: Callable[[], Awaitable[None]]):
        (data_dir / STATE_FILE).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = ClusterState(data_dir / STATE_FILE)
        self.cluster = Cluster(state, stopping)
        self.tokens = ClusterTokens.load(state, data_dir / JOIN_TOKEN_FILE, data_dir / ADMIN_TOKEN_FILE, time.time())
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_grace = heartbeat_grace

    def add_to_server(self, server: grpc.aio.Server) -> None:
        controller_pb2_grpc.add_ControllerServicer_to_server(AdminServicer(self.cluster, self.tokens), server)
        controller_pb2_grpc.add_MembershipServicer_to_server(
            MembershipServicer(self.cluster, self.tokens, self.heartbeat_interval, self.heartbeat_grace), server)

    async def mark_silent_nodes_unreachable(self) -> None:
        """Every few moments, mark unreachable the ready nodes silent for longer than the grace period. The
        first sweep waits a grace period, so that after a restart every node has one to come back in."""
        await asyncio.sleep(self.heartbeat_grace)
        while True:
            now = time.time()
            for name in await self.cluster.call(self.cluster.state.mark_unreachable, now - self.heartbeat_grace,
                                                now, self.heartbeat_grace):
                log.warning("node unreachable", extra={"node": name, "grace_seconds": self.heartbeat_grace})
            await asyncio.sleep(min(1.0, self.heartbeat_grace / 4))

    async def close(self) -> None:
        await self.cluster.close()


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the controller role's services to its server."""
    config = process.config
    controller = Controller(Path(config.data_dir), config.heartbeat_interval_seconds, config.heartbeat_grace_seconds,
                            process.wait_stop_requested)
    controller.add_to_server(server)
    process.run_in_background(controller.mark_silent_nodes_unreachable, "mark silent nodes unreachable")
    process.on_shutdown(controller.close, "close the controller's state")
