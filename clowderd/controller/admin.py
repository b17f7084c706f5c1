"""clowder.v1.Controller, the admin API: nodes (revocation included), deployments (deployments.py), events,
the join token and admin certificates. Every call needs the admin token; a refused one is logged with
the peer."""
from __future__ import annotations

import functools
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

import grpc

from clowder.v1 import controller_pb2, controller_pb2_grpc
from clowderd.controller import tokens
from clowderd.controller.certificates import ADMIN_CERTIFICATE_LIFETIME, Certifier
from clowderd.controller.cluster import DEPLOYMENTS, EVENTS, Cluster, assignments_key
from clowderd.controller.deployments import Deployments
from clowderd.controller.state import READY, EventRecord, NodeRecord
from clowderd.controller.status import HANDLED, status_code
from clowderd.controller.timestamps import timestamp
from clowderd.controller.tokens import ClusterTokens
from clowderd.errors import InvalidInput
from clowderd.server import ROLE_ENUM, unimplemented_servicer
from clowderd.trust import certs
from clowderd.trust.authz import RefusalLog

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000

_Unimplemented = type(unimplemented_servicer(controller_pb2_grpc.ControllerServicer, controller_pb2.DESCRIPTOR,
                                             "Controller"))


def cluster_node(node: NodeRecord) -> controller_pb2.ClusterNode:
    return controller_pb2.ClusterNode(
        info=node.info, worker_address=node.worker_address, cordoned=node.cordoned, draining=node.draining,
        labels=node.labels, replicas=node.replicas, state_since=timestamp(node.state_since),
        joined_at=timestamp(node.joined_at), last_heartbeat=timestamp(node.last_heartbeat),
        state=controller_pb2.NODE_STATE_READY if node.state == READY else controller_pb2.NODE_STATE_UNREACHABLE)


def event_message(event: EventRecord) -> controller_pb2.Event:
    return controller_pb2.Event(
        revision=event.revision, time=timestamp(event.time), severity=event.severity, reason=event.reason,
        message=event.message, object_kind=event.object_kind, object_name=event.object_name,
        node_name=event.node_name)


def parse_label_selector(selector: str) -> dict[str, str]:
    """"key=value,key2=value2" as a dict."""
    wanted = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, sep, value = term.partition("=")
        if not sep or not key:
            raise InvalidInput(f"label_selector: {term!r} is not key=value")
        wanted[key.strip()] = value.strip()
    return wanted


def page_size(requested: int) -> int:
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def admin_call(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A unary method that needs the admin token; the controller's errors become status codes."""
    @functools.wraps(method)
    async def call(self: "AdminServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self.authorize(context)
        try:
            return await method(self, request, context)
        except HANDLED as e:
            await context.abort(status_code(e), str(e))
    return call


class AdminServicer(_Unimplemented):
    def __init__(self, cluster: Cluster, cluster_tokens: ClusterTokens, deployments: Deployments,
                 certifier: Certifier | None, own_name: str):
        self.cluster = cluster
        self.state = cluster.state
        self.cluster_tokens = cluster_tokens
        self.deployments = deployments
        self.certifier = certifier  # None with insecure = true
        self.own_name = own_name  # the node of the controller's process
        self.refusals = RefusalLog("controller")

    async def authorize(self, context: grpc.aio.ServicerContext) -> None:
        token = tokens.bearer(context.invocation_metadata())
        if not self.cluster_tokens.is_admin(token):
            what = "the admin token is wrong" if token else "no admin token was given"
            self.refusals.log(grpc.StatusCode.UNAUTHENTICATED, context.peer(), "the admin API", what, None)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{what}: send it as `authorization: Bearer TOKEN` (clowderctl --token or "
                                "$CLOWDER_TOKEN); it is in DATA_DIR/controller/admin-token on the controller")

    # -- nodes ------------------------------------------------------------------------------------

    @admin_call
    async def ListNodes(self, request: controller_pb2.ListNodesRequest,
                        context: grpc.aio.ServicerContext) -> controller_pb2.ListNodesResponse:
        wanted = parse_label_selector(request.label_selector)
        roles = set(request.roles)
        nodes = [node for node in await self.cluster.call(self.state.nodes)
                 if node.name > request.page_token
                 and wanted.items() <= node.effective_labels().items()
                 and (not roles or roles & {ROLE_ENUM.get(r) for r in node.roles})]
        size = page_size(request.page_size)
        page = nodes[:size]
        return controller_pb2.ListNodesResponse(
            nodes=[cluster_node(node) for node in page], next_page_token=page[-1].name if len(nodes) > size else "")

    @admin_call
    async def GetNode(self, request: controller_pb2.GetNodeRequest,
                      context: grpc.aio.ServicerContext) -> controller_pb2.ClusterNode:
        return cluster_node(await self.cluster.call(self.state.node_by_name, request.name))

    async def _scheduling_changed(self, method: Callable[..., NodeRecord], *args: Any, **kwargs: Any) -> NodeRecord:
        """Run a change of a node that may move replicas, and wake the reconcile loop."""
        node = await self.cluster.call(method, *args, **kwargs)
        self.cluster.changes.publish(DEPLOYMENTS)
        return node

    @admin_call
    async def LabelNode(self, request: controller_pb2.LabelNodeRequest,
                        context: grpc.aio.ServicerContext) -> controller_pb2.ClusterNode:
        return cluster_node(await self._scheduling_changed(self.state.label_node, request.name, dict(request.set),
                                                           list(request.remove), time.time()))

    @admin_call
    async def CordonNode(self, request: controller_pb2.CordonNodeRequest,
                         context: grpc.aio.ServicerContext) -> controller_pb2.ClusterNode:
        return cluster_node(await self._scheduling_changed(self.state.set_schedulable, request.name, cordoned=True,
                                                           draining=False, now=time.time()))

    @admin_call
    async def UncordonNode(self, request: controller_pb2.UncordonNodeRequest,
                           context: grpc.aio.ServicerContext) -> controller_pb2.ClusterNode:
        return cluster_node(await self._scheduling_changed(self.state.set_schedulable, request.name, cordoned=False,
                                                           draining=False, now=time.time()))

    @admin_call
    async def DrainNode(self, request: controller_pb2.DrainNodeRequest,
                        context: grpc.aio.ServicerContext) -> controller_pb2.DrainNodeResponse:
        node = await self._scheduling_changed(self.state.set_schedulable, request.name, cordoned=True, draining=True,
                                              now=time.time())
        return controller_pb2.DrainNodeResponse(node=cluster_node(node))

    @admin_call
    async def RevokeNode(self, request: controller_pb2.RevokeNodeRequest,
                         context: grpc.aio.ServicerContext) -> controller_pb2.RevokeNodeResponse:
        if self.certifier is not None and request.name == self.own_name:
            raise InvalidInput(f"name: {request.name} is the controller's own node; revoking it would leave the "
                               "cluster without a controller")
        node, serials = await self.cluster.call(self.state.revoke_node, request.name, time.time())
        if self.certifier is not None:
            await self.certifier.revoked(serials)
        self.cluster.changes.publish(assignments_key(node.id))  # its assignment watch ends
        self.cluster.changes.publish(DEPLOYMENTS)
        log.warning("node revoked", extra={"node": node.name, "node_id": node.id, "serials": serials,
                                           "peer": context.peer()})
        return controller_pb2.RevokeNodeResponse(revoked_serials=serials)

    @admin_call
    async def IssueAdminCertificate(self, request: controller_pb2.IssueAdminCertificateRequest,
                                    context: grpc.aio.ServicerContext) -> controller_pb2.IssuedCertificate:
        if self.certifier is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this cluster runs with insecure = true: it issues no certificates")
        key = certs.requested_key(request.csr)
        issued, holder = await self.certifier.issue_recorded(key, f"admin-{secrets.token_hex(6)}", "clowderctl",
                                                             (certs.ADMIN,), ADMIN_CERTIFICATE_LIFETIME)
        log.info("admin certificate issued", extra={"serial": holder.serial, "peer": context.peer()})
        return issued

    # -- deployments ------------------------------------------------------------------------------

    @admin_call
    async def CreateDeployment(self, request: controller_pb2.CreateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> controller_pb2.Deployment:
        return await self.deployments.create(request)

    @admin_call
    async def ListDeployments(self, request: controller_pb2.ListDeploymentsRequest,
                              context: grpc.aio.ServicerContext) -> controller_pb2.ListDeploymentsResponse:
        return await self.deployments.list(request, parse_label_selector(request.label_selector),
                                           page_size(request.page_size))

    @admin_call
    async def GetDeployment(self, request: controller_pb2.GetDeploymentRequest,
                            context: grpc.aio.ServicerContext) -> controller_pb2.Deployment:
        return await self.deployments.get(request.name)

    @admin_call
    async def ScaleDeployment(self, request: controller_pb2.ScaleDeploymentRequest,
                              context: grpc.aio.ServicerContext) -> controller_pb2.Deployment:
        return await self.deployments.scale(request)

    @admin_call
    async def UpdateDeployment(self, request: controller_pb2.UpdateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> controller_pb2.Deployment:
        return await self.deployments.update(request)

    @admin_call
    async def DeleteDeployment(self, request: controller_pb2.DeleteDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> controller_pb2.DeleteDeploymentResponse:
        await self.deployments.delete(request)
        return controller_pb2.DeleteDeploymentResponse()

    # -- events -----------------------------------------------------------------------------------

    @admin_call
    async def ListEvents(self, request: controller_pb2.ListEventsRequest,
                         context: grpc.aio.ServicerContext) -> controller_pb2.ListEventsResponse:
        try:
            after = int(request.page_token or 0)
        except ValueError:
            raise InvalidInput(f"page_token: {request.page_token!r} is not a token from ListEvents") from None
        size = page_size(request.page_size)
        since = request.since.ToNanoseconds() / 1e9 if request.HasField("since") else 0.0
        events = await self.cluster.call(self.state.events, after, object_kind=request.object_kind,
                                         object_name=request.object_name, since=since, limit=size + 1)
        page = events[:size]
        return controller_pb2.ListEventsResponse(
            events=[event_message(e) for e in page],
            next_page_token=str(page[-1].revision) if len(events) > size else "")

    async def WatchEvents(self, request: controller_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext):
        await self.authorize(context)
        changes = self.cluster.changes
        last = request.since_revision or self.state.last_event_revision
        while True:
            seen = changes.version(EVENTS)
            events = await self.cluster.call(self.state.events, last, object_kind=request.object_kind,
                                             object_name=request.object_name, limit=MAX_PAGE_SIZE)
            for event in events:
                yield event_message(event)
                last = event.revision
            if len(events) < MAX_PAGE_SIZE and not await changes.wait(EVENTS, seen):
                return

    # -- join token -------------------------------------------------------------------------------

    @admin_call
    async def GetJoinToken(self, request: controller_pb2.GetJoinTokenRequest,
                           context: grpc.aio.ServicerContext) -> controller_pb2.JoinToken:
        return self._join_token()

    @admin_call
    async def RotateJoinToken(self, request: controller_pb2.RotateJoinTokenRequest,
                              context: grpc.aio.ServicerContext) -> controller_pb2.JoinToken:
        await self.cluster_tokens.rotate_join(self.cluster, time.time())
        return self._join_token()

    def _join_token(self) -> controller_pb2.JoinToken:
        return controller_pb2.JoinToken(token=self.cluster_tokens.join,
                                        created_at=timestamp(self.cluster_tokens.join_created_at))
