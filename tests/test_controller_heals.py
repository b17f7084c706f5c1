"""The controller heals what it did not ask for, with real processes on loopback: a replica stopped behind
its back is started again, a replica no deployment assigned is stopped, each with an event, and the
deployment does not say READY meanwhile."""
from __future__ import annotations

import json
import time

from clowder.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.cluster_fixtures import clowderctl, wait_for
from tests.test_cluster_trust import cluster, generate  # noqa: F401  (fixture: a deployment on w1)
from tests.test_controller_deployments import LOAD_TIMEOUT, Admin
from tests.trust_fixtures import channel_as

READY = common_pb2.REPLICA_STATE_READY


def events(controller) -> list[dict]:
    return json.loads(clowderctl(controller, "events", "-o", "json").stdout)


def test_a_replica_stopped_behind_the_controllers_back_is_started_again(cluster):
    controller, node, replica_id = cluster
    admin = Admin(controller)
    before = admin.deployment("chat")
    # Only a controller may unload, and this one did not ask: as if its certificate were used elsewhere.
    stopped = worker_pb2_grpc.WorkerStub(channel_as(controller, node, "worker", "controller")).UnloadReplica(
        worker_pb2.UnloadReplicaRequest(replica_id=replica_id), timeout=30)
    assert stopped.state == common_pb2.REPLICA_STATE_STOPPED
    unloaded = time.monotonic()
    wait_for("the deployment no longer READY", lambda: not admin.ready_replicas("chat"), timeout=5)
    print(f"\nthe controller saw the replica stop {time.monotonic() - unloaded:.2f}s after the unload")
    lost = wait_for("a ReplicaLost event", lambda: [e for e in events(controller) if e["reason"] == "ReplicaLost"])
    assert f"replica {replica_id}: stopped on node w1 without the controller asking" in lost[0]["message"]
    (healed,) = wait_for("the replica READY again", lambda: admin.ready_replicas("chat"), timeout=LOAD_TIMEOUT)
    assert healed.replica_id == replica_id and healed.node_name == "w1"
    assert healed.observed_generation > before.status.replicas[0].observed_generation
    assert generate(channel_as(controller, node, "worker", "lb"), replica_id)[-1].finish_reason


def test_a_replica_no_deployment_assigned_is_stopped(cluster):
    controller, node, replica_id = cluster
    on_worker = worker_pb2_grpc.WorkerStub(channel_as(controller, node, "worker", "controller"))
    image = Admin(controller).deployment("chat").status.manifest_digest
    on_worker.LoadReplica(worker_pb2.LoadReplicaRequest(spec=common_pb2.ReplicaSpec(
        replica_id="rogue-1", deployment="rogue", image="tiny-chat:v1", manifest_digest=image, generation=1)),
        timeout=30)
    stray = wait_for("a ReplicaNotAssigned event",
                     lambda: [e for e in events(controller) if e["reason"] == "ReplicaNotAssigned"], timeout=30)
    assert stray[0]["message"] == ("node w1 runs replica rogue-1, which no deployment assigned to it; it is told to "
                                   "stop it")

    def rogue_state():
        replicas = on_worker.ListReplicas(worker_pb2.ListReplicasRequest(), timeout=10).replicas
        return next(r.state for r in replicas if r.replica_id == "rogue-1")

    wait_for("rogue-1 stopped", lambda: rogue_state() == common_pb2.REPLICA_STATE_STOPPED, timeout=LOAD_TIMEOUT)
    assert [r.replica_id for r in Admin(controller).ready_replicas("chat")] == [replica_id]  # untouched
    assert "rogue" not in clowderctl(controller, "deployments").stdout
