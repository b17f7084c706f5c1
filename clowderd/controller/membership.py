"""clowder.v1.Membership: nodes join, heartbeat, and follow the replicas assigned to them; load balancers
follow the routes (routes.py).

Membership calls carry the node credential from Join, except WatchRoutes, which a load balancer may
call before or without joining: it also takes the join token (which an lb has where a worker would)
or the admin token."""
from __future__ import annotations

import logging
import time
from datetime import timedelta

import grpc
from google.protobuf import duration_pb2

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from clowderd.controller import tokens
from clowderd.controller.cluster import DEPLOYMENTS, Cluster, assignments_key
from clowderd.controller.routes import RouteFeed
from clowderd.controller.state import WARNING
from clowderd.controller.status import HANDLED, status_code
from clowderd.controller.tokens import ClusterTokens
from clowderd.server import unimplemented_servicer
from clowderd.version import __version__

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::")

_Unimplemented = type(unimplemented_servicer(controller_pb2_grpc.MembershipServicer, controller_pb2.DESCRIPTOR,
                                             "Membership"))


def peer_host(peer: str) -> str:
    """The host of a gRPC peer ("ipv4:10.0.0.7:51234", "ipv6:[fd00::7]:51234"); "" for other kinds."""
    kind, _, address = peer.partition(":")
    return address.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else ""


def worker_address(info: common_pb2.NodeInfo, peer: str) -> str:
    """Where the node's Worker service is reached: its worker listener, a wildcard host replaced by the
    host it connected from. "" when it runs no worker."""
    listener = next((item for item in info.listeners if item.role == common_pb2.ROLE_WORKER), None)
    if listener is None:
        return ""
    host, _, port = listener.address.rpartition(":")
    if host in WILDCARD_HOSTS and peer_host(peer):
        return f"{peer_host(peer)}:{port}"
    return listener.address


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


class MembershipServicer(_Unimplemented):
    def __init__(self, cluster: Cluster, cluster_tokens: ClusterTokens, heartbeat_interval: float,
                 heartbeat_grace: float):
        self.cluster = cluster
        self.state = cluster.state
        self.cluster_tokens = cluster_tokens
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_grace = heartbeat_grace
        self.routes = RouteFeed(cluster)

    async def Join(self, request: controller_pb2.JoinRequest,
                   context: grpc.aio.ServicerContext) -> controller_pb2.JoinResponse:
        info = request.node
        if not info.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node.name: required")
        now = time.time()
        address = worker_address(info, context.peer())
        credential = tokens.bearer(context.invocation_metadata())
        try:
            if info.node_id and tokens.matches(credential, await self.cluster.call(self.state.node_credential,
                                                                                  info.node_id)):
                node = await self.cluster.call(self.state.rejoin_node, info.node_id, info, address, now)
            elif self.cluster_tokens.admits(request.join_token):
                credential = tokens.new_secret(tokens.NODE_PREFIX)
                node = await self.cluster.call(self.state.register_node, info, address, tokens.digest(credential),
                                               now)
            else:
                await self._refuse(info, context, now, "the join token is not this cluster's" if request.join_token
                                   else "no join token was given")
        except HANDLED as e:
            await context.abort(status_code(e), str(e))
        self.cluster.changes.publish(DEPLOYMENTS)
        log.info("node joined", extra={"node": node.name, "node_id": node.id, "worker_address": address})
        return controller_pb2.JoinResponse(
            node_id=node.id, node_credential=credential, heartbeat_interval=_duration(self.heartbeat_interval),
            heartbeat_grace=_duration(self.heartbeat_grace), controller_version=__version__)

    async def _refuse(self, info: common_pb2.NodeInfo, context: grpc.aio.ServicerContext, now: float,
                      why: str) -> None:
        message = f"node {info.name} ({peer_host(context.peer()) or context.peer()}) was refused: {why}"
        log.warning("join refused", extra={"node": info.name, "peer": context.peer(), "reason": why})
        await self.cluster.call(self.state.add_event, WARNING, "JoinRefused", "Node", info.name, message, now,
                                info.name)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"join refused: {why}; `clowderctl token` prints the current one (it is also in "
                            "DATA_DIR/controller/join-token on the controller)")

    async def _authenticate(self, node_id: str, context: grpc.aio.ServicerContext) -> bool:
        """Whether the node is known; a known node whose credential is missing or wrong is refused."""
        expected = await self.cluster.call(self.state.node_credential, node_id)
        if expected is None:
            return False
        if not tokens.matches(tokens.bearer(context.invocation_metadata()), expected):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"the node credential is not node {node_id}'s; join again")
        return True

    async def Heartbeat(self, request: controller_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> controller_pb2.HeartbeatResponse:
        if not await self._authenticate(request.node_id, context):
            return controller_pb2.HeartbeatResponse(rejoin=True)
        if await self.cluster.call(self.state.record_heartbeat, request.node_id, request.inventory,
                                   list(request.replicas), time.time(), list(request.stored_manifests)):
            self.cluster.changes.publish(DEPLOYMENTS)
        return controller_pb2.HeartbeatResponse()

    async def WatchAssignments(self, request: controller_pb2.WatchAssignmentsRequest,
                               context: grpc.aio.ServicerContext):
        node_id = request.node_id
        if not await self._authenticate(node_id, context):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {node_id!r} is not a member of this cluster; "
                                                           "join again")
        key = assignments_key(node_id)
        Event = controller_pb2.AssignmentEvent
        sent: dict[str, common_pb2.ReplicaSpec] | None = None
        while True:
            seen = self.cluster.changes.version(key)
            current = {spec.replica_id: spec for spec in await self.cluster.call(self.state.assignments, node_id)}
            if sent is None:
                yield Event(type=controller_pb2.WATCH_EVENT_TYPE_SNAPSHOT, replicas=current.values())
            else:
                changed = [spec for replica_id, spec in current.items() if sent.get(replica_id) != spec]
                gone = sorted(sent.keys() - current.keys())
                graces = await self.cluster.call(self.state.termination_graces, gone) if gone else {}
                removed = [common_pb2.ReplicaSpec(replica_id=replica_id) for replica_id in gone]
                for spec in removed:
                    if spec.replica_id in graces:
                        spec.termination_grace.FromTimedelta(timedelta(seconds=graces[spec.replica_id]))
                if changed:
                    yield Event(type=controller_pb2.WATCH_EVENT_TYPE_PUT, replicas=changed)
                if removed:
                    yield Event(type=controller_pb2.WATCH_EVENT_TYPE_DELETE, replicas=removed)
            sent = current
            if not await self.cluster.changes.wait(key, seen):
                return

    async def WatchRoutes(self, request: controller_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext):
        secret = tokens.bearer(context.invocation_metadata())
        if not (self.cluster_tokens.admits(secret) or self.cluster_tokens.is_admin(secret)
                or request.node_id and tokens.matches(secret, await self.cluster.call(self.state.node_credential,
                                                                                       request.node_id))):
            what = "the credential is wrong" if secret else "no credential was given"
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"WatchRoutes: {what}: send `authorization: Bearer TOKEN` with the join token "
                                "([lb] join_token or join_token_file), the admin token, or the node credential "
                                "of node_id")
        async for event in self.routes.watch():
            yield event
