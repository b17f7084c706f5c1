"""The controller role on its data directory (DATA_DIR/controller): the state database, the cluster CA,
the tokens, the admin API and Enrollment (public listener), Membership (cluster listener), the sweep that
marks silent nodes unreachable, the reconcile loop, and the deployments of `[controller] deploy`
(`clowderd --deploy NAME=IMAGE`), created at start when missing."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping

import grpc

from clowder.v1 import controller_pb2, controller_pb2_grpc
from clowderd.config import ADMIN_TOKEN_FILE, DEFAULT_CERTIFICATE_LIFETIME_SECONDS, JOIN_TOKEN_FILE
from clowderd.controller.admin import AdminServicer
from clowderd.controller.certificates import Certifier
from clowderd.controller.cluster import DEPLOYMENTS, Cluster
from clowderd.controller.deployments import Deployments
from clowderd.controller.membership import EnrollmentServicer, MembershipServicer
from clowderd.controller.reconcile import Reconciler
from clowderd.controller.state import ClusterState
from clowderd.controller.tokens import ClusterTokens
from clowderd.errors import AlreadyExists, ClowderError
from clowderd.member.join import Membership, own_insecure_membership, usable
from clowderd.trust import certs
from clowderd.trust.authz import Revocations
from clowderd.trust.ca import ClusterCA
from clowderd.trust.dial import Dialer
from clowderd.trust.identity import Material, NodeIdentity

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger(__name__)

STATE_FILE = "controller/state.db"
CA_DIR = "controller"  # ca.key and ca.crt
DEPLOY_RETRY_S = 5.0
WILDCARD_AS_LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}


class Controller:
    """The controller's parts on one data dir. `stopping` returns when the process begins to shut down;
    the watch streams end then, so that shutting down does not wait for them. `certificate_lifetime`
    None: `insecure = true`, no CA and no certificates."""

    def __init__(self, data_dir: Path, heartbeat_interval: float, heartbeat_grace: float,
                 stopping: Callable[[], Awaitable[None]], *, strategy: str = "binpack",
                 storage: Callable[[], str | None] = lambda: None, dialer: Dialer = Dialer(None),
                 certificate_lifetime: float | None = DEFAULT_CERTIFICATE_LIFETIME_SECONDS,
                 revocations: Revocations | None = None, own_name: str = ""):
        (data_dir / STATE_FILE).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = ClusterState(data_dir / STATE_FILE)
        self.cluster = Cluster(state, stopping)
        now = time.time()
        self.revocations = revocations or Revocations()
        self.revocations.replace(state.revoked_serials(now))
        self.certifier = None
        if certificate_lifetime is not None:
            ca = ClusterCA.load_or_create(data_dir / CA_DIR)
            self.certifier = Certifier(self.cluster, ca, certificate_lifetime, self.revocations)
        self.tokens = ClusterTokens.load(state, data_dir / JOIN_TOKEN_FILE, data_dir / ADMIN_TOKEN_FILE,
                                         self.certifier.ca.fingerprint if self.certifier else None, now)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_grace = heartbeat_grace
        self.own_name = own_name
        self.reconciler = Reconciler(self.cluster, strategy)
        self.deployments = Deployments(self.cluster, self.reconciler, storage, dialer)

    def add_public(self, server: grpc.aio.Server, cluster_address: Callable[[], str]) -> None:
        """The public listener's services: the admin API and Enrollment. cluster_address is where joining
        nodes are told to reach Membership."""
        controller_pb2_grpc.add_ControllerServicer_to_server(
            AdminServicer(self.cluster, self.tokens, self.deployments, self.certifier, self.own_name), server)
        controller_pb2_grpc.add_EnrollmentServicer_to_server(
            EnrollmentServicer(self.cluster, self.tokens, self.certifier, cluster_address, self.heartbeat_interval,
                               self.heartbeat_grace), server)

    def add_cluster(self, server: grpc.aio.Server) -> None:
        """The cluster listener's service: Membership."""
        controller_pb2_grpc.add_MembershipServicer_to_server(
            MembershipServicer(self.cluster, self.tokens, self.certifier, self.revocations, self.heartbeat_interval,
                               self.heartbeat_grace), server)

    async def own_identity(self, data_dir: Path, name: str, roles: tuple[str, ...]) -> NodeIdentity:
        """The identity of the controller's own process: the one on disk while the CA's, unrevoked, unexpired
        and naming every role; else a certificate issued here (for the same node id when there was one)."""
        identity = NodeIdentity.load(data_dir)
        ca = self.certifier.ca
        if identity is not None and ca.bundle in identity.material.ca and usable(identity) \
                and identity.holder.serial not in self.revocations and set(roles) <= set(identity.holder.roles):
            return identity
        node_id = identity.node_id if identity is not None else f"node-{secrets.token_hex(6)}"
        key = certs.new_key()
        issued, holder = await self.certifier.issue_recorded(key.public_key(), node_id, name, roles)
        log.info("issued the controller's own certificate", extra={"node_id": node_id, "serial": holder.serial})
        return NodeIdentity.create(data_dir, Material(certs.key_pem(key), issued.certificate, ca.bundle), "")

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


class ControllerRole:
    """The controller role of a clowderd process: made before the listeners (the process's identity comes
    from its CA), then its services on the public and the cluster listeners."""

    def __init__(self, process: "Process", controller: Controller):
        self.process = process
        self.controller = controller

    def register_public(self, server: grpc.aio.Server, process: "Process") -> None:
        self.controller.add_public(server, lambda: process.listeners["cluster"])

    def register_cluster(self, server: grpc.aio.Server, process: "Process") -> None:
        self.controller.add_cluster(server)
        # Every node registers, heartbeats, renews and follows the cluster's trust; its role decides the rest.
        nodes = certs.NODE_ROLES
        process.allow("cluster", "clowder.v1.Membership", {
            "Register": nodes, "Heartbeat": nodes, "RenewCertificate": nodes, "WatchTrust": nodes,
            "WatchAssignments": ("worker",), "WatchRoutes": ("lb",)})
        controller, config = self.controller, process.config
        process.run_in_background(controller.mark_silent_nodes_unreachable, "mark silent nodes unreachable")
        process.run_in_background(controller.reconciler.run, "reconcile deployments")
        if config.controller_deploy:
            process.run_in_background(lambda: controller.deploy(config.controller_deploy), "create the configured "
                                                                                            "deployments")
        process.on_shutdown(controller.close, "close the controller's state")


async def prepare(process: "Process") -> tuple[ControllerRole, Membership]:
    """The controller of this process, and the process's membership (its identity issued by the CA here)."""
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

    data_dir = Path(config.data_dir)
    controller = Controller(data_dir, config.heartbeat_interval_seconds, config.heartbeat_grace_seconds,
                            process.wait_stop_requested, strategy=config.controller_strategy, storage=storage,
                            dialer=process.dialer,
                            certificate_lifetime=None if config.insecure else config.certificate_lifetime_seconds,
                            revocations=process.revocations, own_name=config.node_name)
    if config.insecure:
        membership = own_insecure_membership(data_dir)
    else:
        identity = await controller.own_identity(data_dir, config.node_name, config.roles)
        membership = Membership(identity.node_id, "", identity)
    return ControllerRole(process, controller), membership
