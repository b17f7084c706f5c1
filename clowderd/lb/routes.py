"""Where each deployment's calls can go: its READY replicas, and what the lb needs to run its middleware
(the aimage configuration). The table is filled from the controller's route watch; the lb picks, per
call, the replica with the fewest calls outstanding from this lb.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class Endpoint:
    replica_id: str
    worker_address: str
    node_name: str = ""
    outstanding: int = 0  # calls from this lb in flight on it


@dataclass
class Route:
    deployment: str
    endpoints: list[Endpoint]
    image: str = ""                  # the aimage reference deployed
    manifest_digest: str = ""        # also the responses' system_fingerprint
    config: dict = field(default_factory=dict)  # the aimage configuration
    middleware: list[str] = field(default_factory=list)  # the cluster's chain for it, before the aimage's own
    created: int = 0                 # Unix seconds


class NoReplica(Exception):
    """The deployment has no replica left to try."""


class RouteTable:
    def __init__(self):
        self.routes: dict[str, Route] = {}
        self._turn = itertools.count()  # breaks ties between equally loaded replicas in turn

    def put(self, route: Route) -> None:
        """Add or replace a route, keeping the outstanding counts of replicas that stay."""
        old = self.routes.get(route.deployment)
        if old is not None:
            counts = {e.replica_id: e.outstanding for e in old.endpoints}
            for e in route.endpoints:
                e.outstanding = counts.get(e.replica_id, 0)
        self.routes[route.deployment] = route

    def delete(self, deployment: str) -> None:
        self.routes.pop(deployment, None)

    def replace_all(self, routes: list[Route]) -> None:
        for name in set(self.routes) - {r.deployment for r in routes}:
            del self.routes[name]
        for route in routes:
            self.put(route)

    def get(self, deployment: str) -> Route | None:
        return self.routes.get(deployment)

    def list(self) -> list[Route]:
        return sorted(self.routes.values(), key=lambda r: r.deployment)

    def pick(self, route: Route, tried: set[str]) -> Endpoint:
        """The endpoint with the fewest calls outstanding among those not tried yet."""
        candidates = [e for e in route.endpoints if e.replica_id not in tried]
        if not candidates:
            raise NoReplica(route.deployment)
        least = min(e.outstanding for e in candidates)
        best = [e for e in candidates if e.outstanding == least]
        return best[next(self._turn) % len(best)]
