"""The controller role on its data directory (DATA_DIR/controller): the state database, the tokens, the
admin API and Membership, the sweep that marks silent nodes unreachable, the reconcile loop, and the
deployments of `[controller] deploy` (`clowderd --deploy NAME=IMAGE`), created at start when missing."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping

import grpc

from clowder.v1 import controller_pb2, controller_pb2_grpc
from clowderd.config import ADMIN_TOKEN_FILE, JOIN_TOKEN_FILE
from clowderd.controller.admin import AdminServicer
from clowderd.controller.cluster import DEPLOYMENTS, Cluster
from clowderd.controller.deployments import Deployments
from clowderd.controller.membership import MembershipServicer
from clowderd.controller.reconcile import Reconciler
from clowderd.controller.state import ClusterState
from clowderd.controller.tokens import ClusterTokens
from clowderd.errors import AlreadyExists, ClowderError

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger(__name__)

STATE_FILE = "controller/state.db"
DEPLOY_RETRY_S = 5.0
WILDCARD_AS_LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}


class Controller:
    """The controller's parts on one data dir. `stopping` returns when the process begins to shut down;
    the watch streams end then, so that shutting down does not wait for them."""

    def __init__(self, data_dir: Path, heartbeat_interval: float, heartbeat_grace: float,
                 stopping: Callable[[], Awaitable[None]], *, strategy: str = "binpack",
                 storage: Callable[[], str | None] = lambda: None):
        (data_dir / STATE_FILE).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = ClusterState(data_dir / STATE_FILE)
        self.cluster = Cluster(state, stopping)
        self.tokens = ClusterTokens.load(state, data_dir / JOIN_TOKEN_FILE, data_dir / ADMIN_TOKEN_FILE, time.time())
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_grace = heartbeat_grace
        self.reconciler = Reconciler(self.cluster, strategy)
        self.deployments = Deployments(self.cluster, self.reconciler, storage)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        controller_pb2_grpc.add_ControllerServicer_to_server(
            AdminServicer(self.cluster, self.tokens, self.deployments), server)
        controller_pb2_grpc.add_MembershipServicer_to_server(
            MembershipServicer(self.cluster, self.tokens, self.heartbeat_interval, self.heartbeat_grace), server)

    async def mark_silent_nodes_unreachable(self) -> None:
        """Every few moments, mark unreachable the ready nodes silent for longer than the grace period. The
        first sweep waits a grace period, so that after a restart every node has one to come back in."""
        await asyncio.sleep(self.heartbeat_grace)
        while True:
            now = time.time()
            silent = await self.cluster.call(self.cluster.state.mark_unreachable, now - self.heartbeat_grace, now,
                                             self.heartbeat_grace)
            for name in silent:
                log.warning("node unreachable", extra={"node": name, "grace_seconds": self.heartbeat_grace})
            if silent:
                self.cluster.changes.publish(DEPLOYMENTS)
            await asyncio.sleep(min(1.0, self.heartbeat_grace / 4))

    async def deploy(self, wanted: Mapping[str, str]) -> None:
        """Create each deployment name -> image that does not exist, with one replica; one whose image cannot
        be resolved yet (the storage node is not up, the image not built) is tried again every
        DEPLOY_RETRY_S."""
        missing = dict(wanted)
        while missing:
            for name, image in list(missing.items()):
                request = controller_pb2.CreateDeploymentRequest(deployment=controller_pb2.Deployment(
                    name=name, spec=controller_pb2.DeploymentSpec(image=image, replicas=1)))
                try:
                    await self.deployments.create(request)
                    log.info("deployed", extra={"deployment": name, "image": image})
                except AlreadyExists:
                    pass
                except ClowderError as e:
                    log.warning("cannot deploy yet", extra={"deployment": name, "image": image, "error": str(e),
                                                            "retry_seconds": DEPLOY_RETRY_S})
                    continue
                del missing[name]
            if missing:
                await asyncio.sleep(DEPLOY_RETRY_S)

    async def close(self) -> None:
        await self.cluster.close()


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the controller role's services to its server."""
    config = process.config

    def storage() -> str | None:
        """[controller] storage, else the storage role of this process (a wildcard host as loopback)."""
        if config.controller_storage is not None:
            return str(config.controller_storage)
        bound = process.listeners.get("storage")
        if bound is None:
            return None
        host, port = bound.rsplit(":", 1)
        return f"{WILDCARD_AS_LOOPBACK.get(host, host)}:{port}"

    controller = Controller(Path(config.data_dir), config.heartbeat_interval_seconds, config.heartbeat_grace_seconds,
                            process.wait_stop_requested, strategy=config.controller_strategy, storage=storage)
    controller.add_to_server(server)
    process.run_in_background(controller.mark_silent_nodes_unreachable, "mark silent nodes unreachable")
    process.run_in_background(controller.reconciler.run, "reconcile deployments")
    if config.controller_deploy:
        process.run_in_background(lambda: controller.deploy(config.controller_deploy), "create the configured "
                                                                                        "deployments")
    process.on_shutdown(controller.close, "close the controller's state")
