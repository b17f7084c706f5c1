"""A real worker process follows the replicas a controller assigns to it: it loads the new ones, replaces
changed ones, unloads removed ones, reports their states in its heartbeats, and keeps serving across a
restart of the controller. The controller runs in the test process (tests/controller_fixtures.py) so that
the test can place replicas the way the scheduler does."""
from __future__ import annotations

import re
import time

import psutil
import pytest

from clowder.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from clowderd.errors import NotFound
from tests.controller_fixtures import InProcessController
from tests.worker_fixtures import build_chat_image

LOAD_TIMEOUT = 120.0


def wait_for(what, condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)
    return value


@pytest.fixture
def controller(tmp_path):
    controllers = [InProcessController(tmp_path / "controller")]
    yield controllers
    controllers[-1].stop()


def test_the_worker_runs_its_assignments_and_keeps_them_across_a_controller_restart(
        clowderd, controller, tmp_path_factory):
    data = tmp_path_factory.mktemp("worker") / "data"
    image = build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    ctl = controller[0]
    worker = clowderd(roles=("worker",), config_extra={
        "data_dir": str(data), "node_name": "w1",
        "cluster": ctl.joining()})
    stub = worker_pb2_grpc.WorkerStub(worker.channel("worker"))  # insecure = true: no certificate to show

    def on_worker(replica_id: str) -> common_pb2.ReplicaStatus | None:
        return next((r for r in stub.ListReplicas(worker_pb2.ListReplicasRequest(), timeout=10).replicas
                     if r.replica_id == replica_id), None)

    wait_for("w1 to join", lambda: _known(ctl, "w1"))
    chat = common_pb2.ReplicaSpec(replica_id="chat-1", deployment="chat", image=image.name,
                                  manifest_digest=image.digest, generation=1)
    missing = common_pb2.ReplicaSpec(replica_id="missing-1", deployment="missing", image="missing:v1", generation=1)
    ctl.assign(chat, "w1")
    ctl.assign(missing, "w1")
    wait_for("chat-1 READY at the controller", lambda: ctl.replica("chat-1").observed_state == "READY",
             timeout=LOAD_TIMEOUT)
    failed = wait_for("missing-1 FAILED", lambda: (r := ctl.replica("missing-1")).observed_state == "FAILED" and r)
    assert "names no source to pull it from" in failed.observed_message
    ready = on_worker("chat-1")
    engine = psutil.Process(int(re.search(r"\(pid (\d+)\)", ready.message).group(1)))

    missing.generation = 2  # a changed spec replaces the replica
    ctl.assign(missing, "w1")
    wait_for("missing-1 generation 2", lambda: ctl.replica("missing-1").observed_generation == 2)

    direct = common_pb2.ReplicaSpec(replica_id="direct-1", deployment="direct", image="missing:v1")
    stub.LoadReplica(worker_pb2.LoadReplicaRequest(spec=direct), timeout=10)
    controller.append(ctl := ctl.restarted())
    back = time.time()
    wait_for("a heartbeat after the restart", lambda: ctl.node("w1").last_heartbeat > back + 0.5)
    # The snapshot after the restart keeps what is assigned and unloads what is not.
    wait_for("direct-1 unloaded", lambda: on_worker("direct-1").state == common_pb2.REPLICA_STATE_STOPPED)
    assert on_worker("chat-1").state_since == ready.state_since and engine.is_running()
    assert ctl.node("w1").state == "ready"

    ctl.unassign("chat-1")
    wait_for("chat-1 STOPPED", lambda: on_worker("chat-1").state == common_pb2.REPLICA_STATE_STOPPED)
    wait_for("the engine host to exit", lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE)
    reported = wait_for("a heartbeat without chat-1",
                        lambda: (ids := [r.replica_id for r in ctl.node("w1").replicas]) == ["missing-1"] and ids)
    assert reported == ["missing-1"]
    assert worker.stop() == 0


def _known(ctl: InProcessController, name: str) -> bool:
    try:
        ctl.node(name)
    except NotFound:
        return False
    return True
