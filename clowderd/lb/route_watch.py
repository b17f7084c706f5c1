"""The lb's routing table, kept from the controller's route watch (Membership.WatchRoutes): a snapshot
first, then changes, each route complete. When the controller goes away the lb keeps serving with the
routes it has and reconnects with backoff, resuming from the last revision it saw; a controller restart
disturbs no call.

The watch shows the cluster's join token (`authorization: Bearer TOKEN`): [lb] join_token, or the file
[lb] join_token_file (read at each connection, so that a rotated token is picked up), which defaults
to the controller's own file when the controller runs in the same process.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Callable

import grpc

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from clowderd.lb.routes import Endpoint, Route, RouteTable

log = logging.getLogger("clowderd.lb.routes")

BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
READY = common_pb2.ReplicaState.REPLICA_STATE_READY
SNAPSHOT, PUT, DELETE = (controller_pb2.WATCH_EVENT_TYPE_SNAPSHOT, controller_pb2.WATCH_EVENT_TYPE_PUT,
                         controller_pb2.WATCH_EVENT_TYPE_DELETE)


def route_from(msg: controller_pb2.Route) -> Route:
    """A route as the lb keeps it: the READY replicas only, the configuration parsed."""
    try:
        config = json.loads(msg.config_json) if msg.config_json else {}
    except ValueError:
        log.error("a route's configuration is not JSON; its middleware is off", extra={"deployment": msg.deployment})
        config = {}
    endpoints = [Endpoint(e.replica_id, e.worker_address, e.node_name) for e in msg.endpoints if e.state == READY]
    return Route(msg.deployment, endpoints, image=msg.image, manifest_digest=msg.manifest_digest, config=config,
                 middleware=list(msg.middleware), created=msg.created)


class RouteWatch:
    def __init__(self, routes: RouteTable, controller: Callable[[], str], node_id: str,
                 on_change: Callable[[str], None] = lambda deployment: None, *, join_token: str | None = None,
                 join_token_file: str | None = None):
        self.routes = routes
        self.controller = controller  # the controller's address, asked for at each connection
        self.node_id = node_id
        self.on_change = on_change
        self.join_token = join_token
        self.join_token_file = join_token_file
        self.revision = 0
        self.connected = asyncio.Event()  # set while a watch is open and its snapshot applied

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The join token as gRPC metadata; none when neither it nor a readable file is configured."""
        token = self.join_token
        if token is None and self.join_token_file is not None:
            try:
                token = Path(self.join_token_file).read_text().strip()
            except OSError as e:
                log.error("cannot read the join token; watching routes without it", extra={
                    "file": self.join_token_file, "error": e.strerror})
        return (("authorization", f"Bearer {token}"),) if token else ()

    def apply(self, event: controller_pb2.RouteEvent) -> None:
        if event.type == SNAPSHOT:
            routes = [route_from(r) for r in event.routes]
            self.routes.replace_all(routes)
            for route in routes:
                self.on_change(route.deployment)
        elif event.type == PUT:
            for msg in event.routes:
                self.routes.put(route_from(msg))
                self.on_change(msg.deployment)
        elif event.type == DELETE:
            for msg in event.routes:
                self.routes.delete(msg.deployment)
                self.on_change(msg.deployment)
        self.revision = max(self.revision, event.revision)

    async def run(self) -> None:
        failures = 0
        while True:
            address = self.controller()
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    stream = controller_pb2_grpc.MembershipStub(channel).WatchRoutes(
                        controller_pb2.WatchRoutesRequest(node_id=self.node_id, since_revision=self.revision),
                        metadata=self.metadata())
                    async for event in stream:
                        self.apply(event)
                        if event.type == SNAPSHOT:
                            self.connected.set()
                            failures = 0
                            log.info("routes", extra={"controller": address, "deployments": len(self.routes.routes),
                                                      "revision": self.revision})
            except grpc.aio.AioRpcError as e:
                log.warning("route watch interrupted; serving with the routes known", extra={
                    "controller": address, "code": e.code().name, "reason": e.details()})
            self.connected.clear()
            await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
            failures += 1
