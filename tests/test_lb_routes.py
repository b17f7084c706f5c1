"""The lb's routing table: least outstanding calls among a deployment's READY replicas, kept from the
controller's route events."""
from __future__ import annotations

import json

import pytest

from clowder.v1 import common_pb2, controller_pb2
from clowderd.lb.route_watch import DELETE, PUT, SNAPSHOT, RouteWatch
from clowderd.lb.routes import Endpoint, NoReplica, Route, RouteTable

READY, LOADING = common_pb2.ReplicaState.REPLICA_STATE_READY, common_pb2.ReplicaState.REPLICA_STATE_LOADING


def event(kind, *routes, revision=1):
    return controller_pb2.RouteEvent(type=kind, revision=revision, routes=list(routes))


def route_msg(name, *replicas, config=None):
    return controller_pb2.Route(
        deployment=name, image=f"{name}:v1", manifest_digest="sha256:" + "a" * 64, created=7,
        config_json=json.dumps(config or {}),
        endpoints=[controller_pb2.Endpoint(replica_id=r, worker_address="10.0.0.1:7072", state=s)
                   for r, s in replicas])


def test_the_least_loaded_replica_is_picked_and_ties_take_turns():
    table = RouteTable()
    route = Route("d", [Endpoint("a", "w:1"), Endpoint("b", "w:1"), Endpoint("c", "w:1")])
    table.put(route)
    route.endpoints[0].outstanding, route.endpoints[1].outstanding = 3, 1
    assert table.pick(route, set()).replica_id == "c"
    route.endpoints[2].outstanding = 1
    assert {table.pick(route, set()).replica_id for _ in range(4)} == {"b", "c"}
    assert table.pick(route, {"b", "c"}).replica_id == "a"
    with pytest.raises(NoReplica):
        table.pick(route, {"a", "b", "c"})


def test_route_events_keep_the_table_with_ready_replicas_only():
    table = RouteTable()
    changed = []
    watch = RouteWatch(table, lambda: "unused", "lb-1", on_change=changed.append)
    watch.apply(event(SNAPSHOT, route_msg("chat", ("r0", READY), ("r1", LOADING), config={"priority": 5}),
                      route_msg("old", ("o0", READY)), revision=4))
    chat = table.get("chat")
    assert [e.replica_id for e in chat.endpoints] == ["r0"]
    assert (chat.image, chat.created, chat.config) == ("chat:v1", 7, {"priority": 5})
    chat.endpoints[0].outstanding = 2
    watch.apply(event(PUT, route_msg("chat", ("r0", READY), ("r1", READY)), revision=5))
    assert [(e.replica_id, e.outstanding) for e in table.get("chat").endpoints] == [("r0", 2), ("r1", 0)]
    watch.apply(event(DELETE, controller_pb2.Route(deployment="old"), revision=6))
    assert table.get("old") is None and watch.revision == 6
    watch.apply(event(SNAPSHOT, route_msg("new", ("n0", READY)), revision=9))
    assert [r.deployment for r in table.list()] == ["new"]
    assert changed == ["chat", "old", "chat", "old", "new"]
