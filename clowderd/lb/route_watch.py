"""The lb's routing table, kept from the controller's route watch (Membership.WatchRoutes): a snapshot
first, then changes, each route complete. When the controller goes away the lb keeps serving with the
routes it has and reconnects with backoff, resuming from the last revision it saw; a controller restart
disturbs no call.

The watch goes to the controller's cluster listener with the lb's own certificate (its role lb is what
opens WatchRoutes to it); each connection is made anew, so a renewed certificate is presented from the
next one on.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

import grpc

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from clowderd.lb.routes import Endpoint, Route, RouteTable
from clowderd.trust.dial import Dialer

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
    def __init__(self, routes: RouteTable, controller: Callable[[], str], dialer: Dialer,
                 on_change: Callable[[str], None] = lambda deployment: None):
        self.routes = routes
        self.controller = controller  # the controller's cluster listener, asked for at each connection
        self.dialer = dialer
        self.on_change = on_change
        self.revision = 0
        self.connected = asyncio.Event()  # set while a watch is open and its snapshot applied

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
                async with self.dialer.aio_channel(address, "controller") as channel:
                    stream = controller_pb2_grpc.MembershipStub(channel).WatchRoutes(
                        controller_pb2.WatchRoutesRequest(since_revision=self.revision))
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
