"""clowder.v1.Enrollment (a node joins: the public listener) and clowder.v1.Membership (the nodes of the
cluster follow it: the cluster listener, mutual TLS), with the lb's route watch (routes.py).

On the cluster listener the caller is who its certificate says (trust.authz.caller()): its node id,
not the one a request names, and a watch ends as soon as its certificate is revoked. With
`insecure = true` there are no certificates: the node id a request names is taken as it is.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import AsyncIterator, Callable

import grpc
from google.protobuf import duration_pb2

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from clowderd.controller.certificates import Certifier
from clowderd.controller.cluster import DEPLOYMENTS, TRUST, Cluster, assignments_key
from clowderd.controller.routes import RouteFeed
from clowderd.controller.state import WARNING
from clowderd.controller.status import HANDLED, status_code
from clowderd.controller.tokens import ClusterTokens
from clowderd.errors import InvalidInput
from clowderd.server import unimplemented_servicer
from clowderd.trust import certs
from clowderd.trust.authz import RefusalLog, Revocations, caller
from clowderd.version import __version__

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::")

_Membership = type(unimplemented_servicer(controller_pb2_grpc.MembershipServicer, controller_pb2.DESCRIPTOR,
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


def role_names(roles) -> list[str]:
    return [common_pb2.Role.Name(r).removeprefix("ROLE_").lower() for r in roles]


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


class EnrollmentServicer(controller_pb2_grpc.EnrollmentServicer):
    def __init__(self, cluster: Cluster, cluster_tokens: ClusterTokens, certifier: Certifier | None,
                 cluster_address: Callable[[], str], heartbeat_interval: float, heartbeat_grace: float):
        self.cluster = cluster
        self.state = cluster.state
        self.cluster_tokens = cluster_tokens
        self.certifier = certifier  # None with insecure = true
        self.cluster_address = cluster_address
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_grace = heartbeat_grace
        self.refusals = RefusalLog("controller")

    async def Join(self, request: controller_pb2.JoinRequest,
                   context: grpc.aio.ServicerContext) -> controller_pb2.JoinResponse:
        info = request.node
        if not info.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node.name: required")
        now = time.time()
        if not self.cluster_tokens.admits(request.join_token):
            await self._refuse(info, context, now, "the join token is not this cluster's" if request.join_token
                               else "no join token was given")
        roles = [r for r in role_names(info.roles) if r in certs.NODE_ROLES]
        key = None
        if self.certifier is not None:
            try:
                key = certs.requested_key(request.csr)
            except InvalidInput as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            node, revoked = await self.cluster.call(self.state.enroll_node, info, now)
        except HANDLED as e:
            await context.abort(status_code(e), str(e))
        answer = controller_pb2.JoinResponse(
            node_id=node.id, heartbeat_interval=_duration(self.heartbeat_interval),
            heartbeat_grace=_duration(self.heartbeat_grace), controller_version=__version__,
            cluster_address=self.cluster_address())
        if self.certifier is not None:
            issued, holder = await self.certifier.issue_recorded(key, node.id, info.name, roles)
            answer.certificate.CopyFrom(issued)
            await self.certifier.revoked(revoked)
        self.cluster.changes.publish(DEPLOYMENTS)
        log.info("node joined", extra={"node": node.name, "node_id": node.id, "roles": roles,
                                       "peer": context.peer()})
        return answer

    async def _refuse(self, info: common_pb2.NodeInfo, context: grpc.aio.ServicerContext, now: float,
                      why: str) -> None:
        message = f"node {info.name} ({peer_host(context.peer()) or context.peer()}) was refused: {why}"
        self.refusals.log(grpc.StatusCode.UNAUTHENTICATED, context.peer(), "/clowder.v1.Enrollment/Join",
                          f"node {info.name}: {why}", None)
        await self.cluster.call(self.state.add_event, WARNING, "JoinRefused", "Node", info.name, message, now,
                                info.name)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"join refused: {why}; `clowderctl token` prints the current one (it is also in "
                            "DATA_DIR/controller/join-token on the controller)")


class MembershipServicer(_Membership):
    def __init__(self, cluster: Cluster, cluster_tokens: ClusterTokens, certifier: Certifier | None,
                 revocations: Revocations, heartbeat_interval: float, heartbeat_grace: float):
        self.cluster = cluster
        self.state = cluster.state
        self.cluster_tokens = cluster_tokens
        self.certifier = certifier  # None with insecure = true
        self.revocations = revocations
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_grace = heartbeat_grace
        self.routes = RouteFeed(cluster)
        self._strays: dict[str, set[str]] = {}  # per node, the unassigned replicas it last reported

    async def _node_id(self, named: str, context: grpc.aio.ServicerContext) -> str:
        """The caller's node id: its certificate's. A request that names another node is refused."""
        holder = caller()
        if holder is None:  # insecure = true: the request says who it is
            if not named:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id: required")
            return named
        if named and named != holder.node_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"node_id {named!r} is not the caller's: its certificate names {holder}")
        return holder.node_id

    async def _still_trusted(self, context: grpc.aio.ServicerContext) -> None:
        """End a stream whose caller's certificate was revoked since it began."""
        holder = caller()
        if holder is not None and holder.serial in self.revocations:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"certificate revoked: serial {holder.serial} of node {holder}")

    async def Register(self, request: controller_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> controller_pb2.RegisterResponse:
        info = request.node
        node_id = await self._node_id(info.node_id, context)
        if not info.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node.name: required")
        holder = caller()
        if holder is not None:
            # A node serves only the roles its certificate names: more would let it claim what it may not do.
            claimed = set(role_names(info.roles)) - set(holder.roles)
            if claimed:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"node.roles: {', '.join(sorted(claimed))} not in the certificate of {holder}; "
                                    "a renewal with the join token adds roles")
        try:
            node = await self.cluster.call(self.state.register_node, node_id, info,
                                           worker_address(info, context.peer()), time.time())
        except HANDLED as e:
            await context.abort(status_code(e), str(e))
        self.cluster.changes.publish(DEPLOYMENTS)
        log.info("node registered", extra={"node": node.name, "node_id": node.id, "worker_address":
                                           node.worker_address})
        return controller_pb2.RegisterResponse(
            node_id=node.id, heartbeat_interval=_duration(self.heartbeat_interval),
            heartbeat_grace=_duration(self.heartbeat_grace), controller_version=__version__)

    async def Heartbeat(self, request: controller_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> controller_pb2.HeartbeatResponse:
        node_id = await self._node_id(request.node_id, context)
        now = time.time()
        news = await self.cluster.call(self.state.record_heartbeat, node_id, request.inventory,
                                       list(request.replicas), now, list(request.stored_manifests))
        if news is None:
            return controller_pb2.HeartbeatResponse(rejoin=True)
        if news:
            self.cluster.changes.publish(DEPLOYMENTS)
        strays = await self.cluster.call(self.state.unassigned_replicas, node_id,
                                         [r.replica_id for r in request.replicas])
        await self._stray_events(node_id, strays, now)
        return controller_pb2.HeartbeatResponse(stop_replicas=strays)

    async def _stray_events(self, node_id: str, strays: list[str], now: float) -> None:
        """An event the first time a node reports a replica no deployment assigned to it (it is told to stop
        it at every heartbeat until it no longer reports it)."""
        seen = self._strays.setdefault(node_id, set())
        for replica_id in sorted(set(strays) - seen):
            node = await self.cluster.call(self.state.node, node_id)
            await self.cluster.call(self.state.add_event, WARNING, "ReplicaNotAssigned", "Node", node.name,
                                    f"node {node.name} runs replica {replica_id}, which no deployment assigned to it; "
                                    "it is told to stop it", now, node.name)
        self._strays[node_id] = set(strays)

    async def RenewCertificate(self, request: controller_pb2.RenewCertificateRequest,
                               context: grpc.aio.ServicerContext) -> controller_pb2.IssuedCertificate:
        holder = caller()
        if self.certifier is None or holder is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this cluster runs with insecure = true: it issues no certificates")
        try:
            key = certs.requested_key(request.csr)
        except InvalidInput as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        roles = [r for r in role_names(request.roles) if r in certs.NODE_ROLES] or list(holder.roles)
        added = set(roles) - set(holder.roles)
        if added and not self.cluster_tokens.admits(request.join_token):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"roles: adding {', '.join(sorted(added))} to node {holder} needs the join token")
        issued, renewed = await self.certifier.issue_recorded(key, holder.node_id, holder.name, roles)
        log.info("renewed a node's certificate", extra={"node": holder.name, "node_id": holder.node_id,
                                               "serial": renewed.serial, "roles": roles})
        return issued

    async def WatchTrust(self, request: controller_pb2.WatchTrustRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[controller_pb2.TrustEvent]:
        bundle = self.certifier.ca.bundle if self.certifier is not None else b""
        while True:
            seen = self.cluster.changes.version(TRUST)
            await self._still_trusted(context)
            serials = await self.cluster.call(self.state.revoked_serials, time.time())
            yield controller_pb2.TrustEvent(revoked_serials=serials, ca_certificates=bundle)
            if not await self.cluster.changes.wait(TRUST, seen):
                return

    async def WatchAssignments(self, request: controller_pb2.WatchAssignmentsRequest,
                               context: grpc.aio.ServicerContext):
        node_id = await self._node_id(request.node_id, context)
        try:
            await self.cluster.call(self.state.node, node_id)
        except HANDLED:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {node_id!r} is not registered; register again")
        key = assignments_key(node_id)
        Event = controller_pb2.AssignmentEvent
        sent: dict[str, common_pb2.ReplicaSpec] | None = None
        while True:
            seen = self.cluster.changes.version(key)
            await self._still_trusted(context)
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
        async for event in self.routes.watch(lambda: self._still_trusted(context)):
            yield event
