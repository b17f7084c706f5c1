"""Reconcile passes on a controller database, with the nodes' reports written as heartbeats would: a failed
replica is restarted with backoff and the deployment shows FAILED after too many failures in a row; a
drained node's replica is replaced before it is stopped, and then the drain ends; a removed replica is
TERMINATING, unrouted and holding its memory, until its node stops reporting it."""
from __future__ import annotations

import asyncio

import pytest

from clowder.v1 import common_pb2, controller_pb2
from clowderd.controller.cluster import Cluster
from clowderd.controller.deployments import deployment_message, replica_status
from clowderd.controller.images import ResolvedImage
from clowderd.controller.reconcile import MAX_FAILURES, Reconciler, restart_delay
from clowderd.controller.routes import current_routes
from clowderd.controller.scheduler import GIB
from clowderd.controller.state import ClusterState, NodeRecord, ReplicaRecord
from tests.test_controller_state import T0, join

IMAGE = ResolvedImage("sha256:" + "a" * 64, "127.0.0.1:7071", {"engine": {"name": "transformers"}},
                      (("sha256:" + "b" * 64, 1 << 20),))
INVENTORY = common_pb2.ResourceInventory(cpu_count=8, memory_total=64 << 30)


@pytest.fixture
def db(tmp_path):
    state = ClusterState(tmp_path / "state.db")
    yield state
    state.close()


@pytest.fixture
def reconciler(db):
    async def never() -> None:
        await asyncio.Event().wait()
    return Reconciler(Cluster(db, never), "binpack")


def report(db: ClusterState, node_id: str, state: int, now: float, message: str = "",
           inventory: common_pb2.ResourceInventory = INVENTORY) -> None:
    """A heartbeat of the node running what it is assigned, every replica in `state`."""
    statuses = [common_pb2.ReplicaStatus(replica_id=spec.replica_id, deployment=spec.deployment, state=state,
                                         message=message, observed_generation=spec.generation)
                for spec in db.assignments(node_id)]
    db.record_heartbeat(node_id, inventory, statuses, now)


def status(db: ClusterState, name: str) -> controller_pb2.DeploymentStatus:
    nodes = {node.id: node for node in db.nodes()}
    return deployment_message(db.deployment(name), db.replicas(name), nodes).status


def test_a_failed_replica_restarts_with_backoff_until_the_deployment_shows_failed(db, reconciler):
    w1 = join(db, "w1")
    db.record_heartbeat(w1, INVENTORY, [], T0)
    db.create_deployment("chat", controller_pb2.DeploymentSpec(image="chat:v1", replicas=1), {}, IMAGE, T0)
    reconciler.reconcile(T0)
    (replica,) = db.replicas("chat")
    assert (replica.node_id, replica.spec.generation, replica.spec.sources) == (w1, 1, ["clowder://127.0.0.1:7071"])
    now = T0
    for failures in range(1, MAX_FAILURES + 1):
        now += 1
        report(db, w1, common_pb2.REPLICA_STATE_FAILED, now, message="engine exited with status 1: boom")
        reconciler.reconcile(now)
        replica = db.replica(replica.id)
        assert replica.failures == failures
        if failures == MAX_FAILURES:
            break
        assert replica.restart_at == now + restart_delay(failures)
        reconciler.reconcile(replica.restart_at - 0.1)
        assert db.replica(replica.id).spec.generation == failures  # not yet
        now = replica.restart_at
        reconciler.reconcile(now)
        assert db.replica(replica.id).spec.generation == failures + 1
        assert status(db, "chat").state == controller_pb2.DEPLOYMENT_STATE_PROGRESSING
    reconciler.reconcile(now + 3600)
    assert db.replica(replica.id).spec.generation == MAX_FAILURES  # no more restarts
    failed = status(db, "chat")
    assert failed.state == controller_pb2.DEPLOYMENT_STATE_FAILED
    assert failed.message == f"replica {replica.id} failed {MAX_FAILURES} times in a row: engine exited with " \
                             "status 1: boom"
    assert [e.reason for e in db.events()].count("ReplicaRestarted") == MAX_FAILURES - 1


def test_a_drained_nodes_replica_is_replaced_before_it_stops_and_the_drain_then_ends(db, reconciler):
    w1, w2 = join(db, "w1"), join(db, "w2")
    for node_id in (w1, w2):
        db.record_heartbeat(node_id, INVENTORY, [], T0)
    db.create_deployment("chat", controller_pb2.DeploymentSpec(image="chat:v1", replicas=1), {}, IMAGE, T0)
    reconciler.reconcile(T0)
    (old,) = db.replicas("chat")
    source, target = (w1, w2) if old.node_id == w1 else (w2, w1)
    report(db, source, common_pb2.REPLICA_STATE_READY, T0 + 1)
    db.set_schedulable(db.node(source).name, cordoned=True, draining=True, now=T0 + 2)

    reconciler.reconcile(T0 + 2)
    assert sorted((r.id == old.id, r.node_id) for r in db.replicas("chat")) == [(False, target), (True, source)]
    assert db.node(source).draining
    reconciler.reconcile(T0 + 3)  # the new one is not READY yet: the old one keeps serving
    assert len(db.replicas("chat")) == 2

    report(db, target, common_pb2.REPLICA_STATE_READY, T0 + 4)
    reconciler.reconcile(T0 + 4)
    assert db.replica(old.id).terminating and db.node(source).draining  # until the source stops it
    db.record_heartbeat(source, INVENTORY, [], T0 + 5)
    reconciler.reconcile(T0 + 5)
    (new,) = db.replicas("chat")
    assert new.node_id == target and new.id != old.id
    node = db.node(source)
    assert (node.cordoned, node.draining) == (True, False)
    assert [e.reason for e in db.events()][-2:] == ["ReplicaRemoved", "NodeDrained"]
    assert status(db, "chat").state == controller_pb2.DEPLOYMENT_STATE_READY


def test_a_replica_reads_pending_until_placed_scheduled_until_its_node_reports_it_then_as_reported():
    node = NodeRecord(id="n1", name="w1", roles=["worker"], worker_address="127.0.0.1:1", info=common_pb2.NodeInfo(),
                      replicas=[], labels={}, cordoned=False, draining=False, state="ready", state_since=0,
                      joined_at=0, last_heartbeat=0, stored_manifests=[])
    replica = ReplicaRecord(id="chat-1", deployment="chat", node_id=None,
                            spec=common_pb2.ReplicaSpec(replica_id="chat-1", generation=1), observed_state="",
                            observed_message="", observed_generation=0, observed_at=0, memory=0, gpu_memory={},
                            pending_reason="0/1 nodes can take a replica of 'chat': 1 cordoned", preempted_by="",
                            failures=0, failed_generation=0, restart_at=0, created_at=0)
    pending = replica_status(replica, {"n1": node})
    assert (pending.state, pending.message) == (common_pb2.REPLICA_STATE_PENDING, replica.pending_reason)
    replica.node_id = "n1"
    scheduled = replica_status(replica, {"n1": node})
    assert scheduled.state == common_pb2.REPLICA_STATE_SCHEDULED and scheduled.node_name == "w1"
    replica.observed_state, replica.observed_generation, replica.observed_message = "LOADING", 1, "loading"
    assert replica_status(replica, {"n1": node}).state == common_pb2.REPLICA_STATE_LOADING


def test_a_scaled_down_replica_is_terminating_and_keeps_its_memory_until_its_node_stops_reporting_it(db, reconciler):
    w1 = join(db, "w1")
    room_for_two = common_pb2.ResourceInventory(cpu_count=8, memory_total=int(2.5 * GIB))
    db.record_heartbeat(w1, room_for_two, [], T0)
    spec = controller_pb2.DeploymentSpec(image="chat:v1", replicas=2)
    chat = db.create_deployment("chat", spec, {}, IMAGE, T0)
    reconciler.reconcile(T0)
    report(db, w1, common_pb2.REPLICA_STATE_READY, T0 + 1, inventory=room_for_two)
    spec.replicas = 1
    db.update_deployment("chat", spec, {}, IMAGE, chat.etag, "DeploymentScaled", "2 -> 1", T0 + 2)
    reconciler.reconcile(T0 + 2)
    gone, kept = sorted(db.replicas("chat"), key=lambda r: not r.terminating)
    assert gone.terminating and not kept.terminating
    shown = status(db, "chat")
    assert (shown.state, shown.ready_replicas) == (controller_pb2.DEPLOYMENT_STATE_READY, 1)
    terminating = next(r for r in shown.replicas if r.replica_id == gone.id)
    assert (terminating.state, terminating.message, terminating.node_name) == (
        common_pb2.REPLICA_STATE_TERMINATING, "the deployment is scaled to 1", "w1")
    assert [s.replica_id for s in db.assignments(w1)] == [kept.id]
    assert [e.replica_id for e in current_routes(db)["chat"].endpoints] == [kept.id]

    db.create_deployment("other", controller_pb2.DeploymentSpec(image="other:v1", replicas=1), {}, IMAGE, T0 + 3)
    reconciler.reconcile(T0 + 3)
    (other,) = db.replicas("other")
    assert other.node_id is None and "short of memory" in other.pending_reason  # gone's memory is still claimed

    still = common_pb2.ReplicaStatus(replica_id=gone.id, deployment="chat", state=common_pb2.REPLICA_STATE_DRAINING)
    db.record_heartbeat(w1, room_for_two, [still], T0 + 4)
    assert db.replica(gone.id).terminating
    db.record_heartbeat(w1, room_for_two, [], T0 + 5)
    assert [r.id for r in db.replicas("chat")] == [kept.id]
    reconciler.reconcile(T0 + 5)
    assert db.replica(other.id).node_id == w1
    assert [e.reason for e in db.events(object_name="chat")].count("ReplicaRemoved") == 1
