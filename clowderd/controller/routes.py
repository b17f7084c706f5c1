"""The routing table that load balancers follow (Membership.WatchRoutes): one route per deployment, its
endpoints the placed replicas on ready nodes that are not terminating, with their state (the lb sends
calls to the READY ones), the worker address of their node, and the aimage's configuration.

A watch gets a snapshot, then a PUT of every route that changed and a DELETE of every route that went,
whenever DEPLOYMENTS moves. Revisions come from one counter per controller that starts at the clock
in milliseconds, so that they also increase across controller restarts while the clock does.
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Awaitable, Callable

from clowder.v1 import controller_pb2
from clowderd.controller.cluster import DEPLOYMENTS, Cluster
from clowderd.controller.deployments import replica_status
from clowderd.controller.state import READY, ClusterState

SNAPSHOT, PUT, DELETE = (controller_pb2.WATCH_EVENT_TYPE_SNAPSHOT, controller_pb2.WATCH_EVENT_TYPE_PUT,
                         controller_pb2.WATCH_EVENT_TYPE_DELETE)


def current_routes(state: ClusterState) -> dict[str, controller_pb2.Route]:
    """Every deployment's route. Runs on the state's thread."""
    nodes = {node.id: node for node in state.nodes()}
    routes = {}
    replicas = state.replicas()
    for deployment in state.deployments():
        endpoints = []
        for replica in replicas:
            node = nodes.get(replica.node_id) if replica.node_id else None
            if replica.deployment != deployment.name or node is None or node.state != READY or replica.terminating:
                continue
            endpoints.append(controller_pb2.Endpoint(replica_id=replica.id, node_name=node.name,
                                                     worker_address=node.worker_address,
                                                     state=replica_status(replica, nodes).state))
        routes[deployment.name] = controller_pb2.Route(
            deployment=deployment.name, endpoints=endpoints, manifest_digest=deployment.image.manifest_digest,
            image=deployment.spec.image, config_json=deployment.image.config_json, created=int(deployment.created_at))
    return routes


class RouteFeed:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.revision = time.time_ns() // 1_000_000

    def _next_revision(self) -> int:
        self.revision = max(self.revision + 1, time.time_ns() // 1_000_000)
        return self.revision

    async def watch(self, still_allowed: Callable[[], Awaitable[None]]) -> AsyncIterator[controller_pb2.RouteEvent]:
        """A snapshot, then the changes, until the controller stops; still_allowed runs at every wakeup
        (it ends the watch of a caller whose certificate was revoked meanwhile)."""
        changes = self.cluster.changes
        Event = controller_pb2.RouteEvent
        sent: dict[str, controller_pb2.Route] | None = None
        while True:
            seen = changes.version(DEPLOYMENTS)
            await still_allowed()
            routes = await self.cluster.call(current_routes, self.cluster.state)
            if sent is None:
                yield Event(type=SNAPSHOT, revision=self._next_revision(), routes=routes.values())
            else:
                changed = [route for name, route in routes.items() if sent.get(name) != route]
                gone = [controller_pb2.Route(deployment=name) for name in sent.keys() - routes.keys()]
                if changed:
                    yield Event(type=PUT, revision=self._next_revision(), routes=changed)
                if gone:
                    yield Event(type=DELETE, revision=self._next_revision(), routes=gone)
            sent = routes
            if not await changes.wait(DEPLOYMENTS, seen):
                return
