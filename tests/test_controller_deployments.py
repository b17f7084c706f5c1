"""Deployments end to end, with real processes on loopback: a controller + storage process whose store
holds the tiny chat llama, workers that pull it from there, and clowderctl. Replicas spread over two
workers and a killed worker's replica is placed on the other (the seconds it takes are printed);
a rolling update keeps a READY replica throughout; a controller killed and restarted disturbs no
replica and the route watch resumes; a high-priority deployment preempts a preemptible one, whose
unschedulable reason `clowderctl deployment describe` shows."""
from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc, inference_pb2, worker_pb2, worker_pb2_grpc
from clowderd.lb.route_watch import RouteWatch
from clowderd.lb.routes import RouteTable
from tests.clowderd_proc import ClowderdProcess, deep_merge
from tests.cluster_fixtures import clowderctl, start_worker, token_file, wait_for
from tests.trust_fixtures import channel_as, dialer_as
from tests.worker_fixtures import CPU_ENGINE, build_chat_image, with_configuration

INTERVAL, GRACE = 0.5, 2.0
LOAD_TIMEOUT = 120.0
READY = common_pb2.REPLICA_STATE_READY


def start_controller(clowderd, data_dir: Path, **extra: Any) -> ClowderdProcess:
    """The controller and storage roles on data_dir, whose store holds the images."""
    config = {"node_name": "ctl", "data_dir": str(data_dir),
              "controller": {"heartbeat_interval_seconds": INTERVAL, "heartbeat_grace_seconds": GRACE}}
    args = extra.pop("args", ())
    return clowderd(roles=("controller", "storage"), config_extra=deep_merge(config, extra), args=args)


class Admin:
    """The admin API, with the controller's admin token."""

    def __init__(self, controller: ClowderdProcess):
        self.channel = controller.channel("controller")
        self.stub = controller_pb2_grpc.ControllerStub(self.channel)
        token = (controller.data_dir / "controller" / "admin-token").read_text().strip()
        self.metadata = (("authorization", f"Bearer {token}"),)

    def deployment(self, name: str) -> controller_pb2.Deployment:
        return self.stub.GetDeployment(controller_pb2.GetDeploymentRequest(name=name), metadata=self.metadata,
                                       timeout=10)

    def ready_replicas(self, name: str) -> list[common_pb2.ReplicaStatus]:
        return [r for r in self.deployment(name).status.replicas if r.state == READY]


def engine_pid(replica: common_pb2.ReplicaStatus) -> int:
    return int(re.search(r"\(pid (\d+)\)", replica.message).group(1))


@pytest.fixture
def images(tmp_path_factory):
    """The controller's data dir, its store holding tiny-chat:v1 and tiny-chat:v2 (another configuration on
    the same weights)."""
    data = tmp_path_factory.mktemp("controller") / "data"
    v1 = build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    v2 = with_configuration(data / "store", v1, "tiny-chat:v2", {"engine": CPU_ENGINE, "priority": 1})
    return data, v1, v2


def test_replicas_spread_over_two_workers_and_a_killed_workers_replica_moves_to_the_other(clowderd, images):
    data, v1, _ = images
    controller = start_controller(clowderd, data, controller={"strategy": "spread"})
    workers = {name: start_worker(clowderd, controller, name) for name in ("w1", "w2")}
    admin = Admin(controller)

    deployed = clowderctl(controller, "deploy", "chat", "tiny-chat:v1", "--replicas", "2", "--wait",
                          "--timeout", str(LOAD_TIMEOUT))
    assert "chat: READY 2/2 ready" in deployed.stdout
    replicas = admin.ready_replicas("chat")
    assert sorted(r.node_name for r in replicas) == ["w1", "w2"]
    assert admin.deployment("chat").status.manifest_digest == v1.digest
    on_w2 = next(r for r in replicas if r.node_name == "w2")

    workers["w2"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    moved = wait_for("both replicas READY on w1", lambda: len(ready := admin.ready_replicas("chat")) == 2 and all(
        r.node_name == "w1" for r in ready) and ready, timeout=GRACE + 30)
    failover = time.monotonic() - killed
    print(f"\nfailover: the replica of the killed worker was READY on the other {failover:.1f}s after kill -9 "
          f"(heartbeat grace {GRACE:g}s, interval {INTERVAL:g}s)")
    assert on_w2.replica_id not in {r.replica_id for r in moved}  # placed anew, with a new id
    assert failover < GRACE + 15
    describe = clowderctl(controller, "deployment", "describe", "chat").stdout
    assert f"replica {on_w2.replica_id}: node w2 is unreachable; a new replica takes its place" in describe


def test_a_rolling_update_keeps_a_replica_ready_and_a_controller_restart_disturbs_none(clowderd, images):
    data, v1, v2 = images
    controller = start_controller(clowderd, data, args=("--deploy", "chat=tiny-chat:v1"))
    worker = start_worker(clowderd, controller, "w1")
    admin = Admin(controller)
    first = wait_for("chat READY from --deploy", lambda: admin.ready_replicas("chat"), timeout=LOAD_TIMEOUT)[0]

    routes, watch = RouteTable(), None
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start_watch() -> RouteWatch:
        route_watch = RouteWatch(routes, lambda: controller.addresses["cluster"], dialer_as(controller, "lb"))
        asyncio.ensure_future(route_watch.run())
        return route_watch

    watch = asyncio.run_coroutine_threadsafe(start_watch(), loop).result(10)
    wait_for("the route of chat", lambda: (route := routes.get("chat")) and route.endpoints)

    clowderctl(controller, "update", "chat", "tiny-chat:v2")
    while True:
        deployment = admin.deployment("chat")
        ready = [r for r in deployment.status.replicas if r.state == READY]
        assert ready, f"no READY replica during the rolling update: {deployment.status}"
        assert routes.get("chat").endpoints, "the route lost every endpoint during the rolling update"
        if deployment.status.state == controller_pb2.DEPLOYMENT_STATE_READY:
            break
        time.sleep(0.1)
    assert deployment.status.manifest_digest == v2.digest
    (second,) = [r for r in deployment.status.replicas if r.state != common_pb2.REPLICA_STATE_TERMINATING]
    assert second.replica_id != first.replica_id
    wait_for("the old replica to go (its node stopped it)",
             lambda: len(admin.deployment("chat").status.replicas) == 1)
    # The new replica was READY before the old one went (the polls above may see only the end: both
    # images share their base, so the new replica joins the engine host already loaded).
    events = [(e.reason, e.message) for e in admin.stub.ListEvents(controller_pb2.ListEventsRequest(
        object_kind="Deployment", object_name="chat"), metadata=admin.metadata, timeout=10).events]
    new_ready = next(i for i, (reason, message) in enumerate(events)
                     if reason == "ReplicaReady" and message.startswith(f"replica {second.replica_id} is READY"))
    old_removed = next(i for i, (reason, message) in enumerate(events)
                       if reason == "ReplicaRemoved" and message.startswith(f"replica {first.replica_id}:"))
    assert new_ready < old_removed, events
    wait_for("the route to the new replica only",
             lambda: [e.replica_id for e in routes.get("chat").endpoints] == [second.replica_id])

    engine = psutil.Process(engine_pid(second))
    on_worker = worker_pb2_grpc.WorkerStub(channel_as(controller, worker, "worker", "lb"))
    before = on_worker.ListReplicas(worker_pb2.ListReplicasRequest(deployment="chat"), timeout=10).replicas
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    wait_for("the route watch to notice", lambda: not watch.connected.is_set())
    assert [e.replica_id for e in routes.get("chat").endpoints] == [second.replica_id]  # kept while away
    controller = start_controller(clowderd, data, **{r: {"listen": controller.addresses[r]}
                                                      for r in ("controller", "storage")})
    wait_for("the route watch to resume", watch.connected.is_set, timeout=20)
    assert [e.replica_id for e in routes.get("chat").endpoints] == [second.replica_id]
    admin = Admin(controller)
    back = time.time()
    wait_for("a heartbeat after the restart", lambda: _heartbeat_after(admin, back))
    assert [r.replica_id for r in admin.ready_replicas("chat")] == [second.replica_id]
    after = on_worker.ListReplicas(worker_pb2.ListReplicasRequest(deployment="chat"), timeout=10).replicas
    assert [(r.replica_id, r.state_since) for r in after if r.state == READY] == \
        [(r.replica_id, r.state_since) for r in before if r.state == READY]
    assert engine.is_running()
    loop.call_soon_threadsafe(loop.stop)


def _heartbeat_after(admin: Admin, since: float) -> bool:
    node = admin.stub.GetNode(controller_pb2.GetNodeRequest(name="w1"), metadata=admin.metadata, timeout=10)
    return node.last_heartbeat.ToNanoseconds() / 1e9 > since + INTERVAL


def test_a_high_priority_deployment_preempts_a_preemptible_one_whose_reason_describe_shows(clowderd, images):
    data, v1, _ = images
    share = psutil.virtual_memory().total * 0.6 / (1 << 30)  # two replicas do not fit on one node
    with_configuration(data / "store", v1, "tiny-chat:big",
                       {"engine": CPU_ENGINE, "placement": {"memory_gib": round(share, 2)}})
    controller = start_controller(clowderd, data)
    start_worker(clowderd, controller, "w1")
    admin = Admin(controller)

    clowderctl(controller, "deploy", "low", "tiny-chat:big", "--priority", "0", "--preemptible", "--wait",
               "--timeout", str(LOAD_TIMEOUT))
    (low,) = admin.ready_replicas("low")
    clowderctl(controller, "deploy", "high", "tiny-chat:big", "--priority", "10", "--no-preemptible", "--wait",
               "--timeout", str(LOAD_TIMEOUT))
    assert [r.node_name for r in admin.ready_replicas("high")] == ["w1"]
    evicted = wait_for("low unschedulable", lambda: (d := admin.deployment("low")).status.state ==
                       controller_pb2.DEPLOYMENT_STATE_UNSCHEDULABLE and d)
    (pending,) = evicted.status.replicas
    assert pending.replica_id == low.replica_id and pending.state == common_pb2.REPLICA_STATE_PENDING
    describe = clowderctl(controller, "deployment", "describe", "low").stdout
    assert "preempted by deployment 'high' (priority 10)" in describe
    assert "0/1 nodes can take a replica of 'low': 1 short of memory" in describe
    assert "Preempted" in describe and "Unschedulable" in describe

    refused = clowderctl(controller, "deploy", "third", "tiny-chat:big", "--wait", "--timeout", "2", check=False)
    assert refused.returncode == 1
    assert "deployment third is not READY after 2s (UNSCHEDULABLE): 0/1 nodes can take a replica of 'third'" \
        in refused.stderr


def test_the_route_watch_is_open_to_the_lb_role_only_and_the_join_token_opens_nothing(clowderd, tmp_path):
    controller = start_controller(clowderd, tmp_path / "data")
    request = controller_pb2.WatchRoutesRequest()
    with dialer_as(controller, "lb").channel(controller.addresses["cluster"], "controller") as channel:
        snapshot = next(iter(controller_pb2_grpc.MembershipStub(channel).WatchRoutes(request, timeout=5)))
    assert (snapshot.type, list(snapshot.routes)) == (controller_pb2.WATCH_EVENT_TYPE_SNAPSHOT, [])
    assert snapshot.revision > 0
    join_token = token_file(controller).read_text().strip()
    with dialer_as(controller, "worker").channel(controller.addresses["cluster"], "controller") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(controller_pb2_grpc.MembershipStub(channel).WatchRoutes(
                request, metadata=(("authorization", f"Bearer {join_token}"),), timeout=5)))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "open to lb" in refused.value.details()


def test_deploy_placement_options_override_the_configuration_and_name_what_keeps_nodes_out(clowderd, images):
    data, _, _ = images
    controller = start_controller(clowderd, data)
    start_worker(clowderd, controller, "w1", labels={"zone": "earth"})
    admin = Admin(controller)
    wait_for("w1 joined", lambda: clowderctl(controller, "nodes").stdout.count("w1"))

    fits = clowderctl(controller, "deploy", "chat", "tiny-chat:v1", "--dry-run", "--node-selector", "zone=earth")
    assert "w1" in fits.stdout, fits.stdout
    for args, reason in ((("--node-selector", "zone=mars"), "1 without the labels zone=mars"),
                         (("--gpus", "2"), "1 with fewer than 2 GPU(s)"),
                         (("--gpus", "1", "--gpu-model", "H100", "--gpu-memory", "80GiB"),
                          "1 with fewer than 1 GPU(s) of model H100")):
        refused = clowderctl(controller, "deploy", "chat", "tiny-chat:v1", "--dry-run", *args)
        assert "0/1 nodes can take a replica of 'chat'" in refused.stdout and reason in refused.stdout, refused.stdout
    with pytest.raises(grpc.RpcError):  # nothing was created by the dry runs
        admin.deployment("chat")

    bad = clowderctl(controller, "deploy", "chat", "tiny-chat:v1", "--gpu-memory", "lots", check=False)
    assert bad.returncode == 2 and "Invalid value for '--gpu-memory': 'lots' is not a size" in bad.stderr


def _long_call(controller: ClowderdProcess, worker: ClowderdProcess, replica_id: str,
               tokens: int) -> tuple[threading.Thread, dict]:
    """A completion of exactly `tokens` tokens, streamed from the worker in a thread (as an lb of controller's
    cluster); its outcome lands in the dict: finish (the last finish reason), tokens (completion tokens),
    error (a status code), ended."""
    stub = worker_pb2_grpc.WorkerStub(channel_as(controller, worker, "worker", "lb"))
    sampling = inference_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
    request = worker_pb2.GenerateRequest(replica_id=replica_id, request_id="long-call",
                                         completion=inference_pb2.CompletionRequest(prompt="Once", sampling=sampling))
    outcome: dict[str, Any] = {"finish": None, "tokens": 0, "text": 0, "error": None}

    def run() -> None:
        try:
            for response in stub.Generate(request, timeout=120):
                outcome["text"] += len(response.text)
                outcome["finish"] = response.finish_reason or outcome["finish"]
                outcome["tokens"] = response.usage.completion_tokens or outcome["tokens"]
        except grpc.RpcError as e:
            outcome["error"] = e.code()
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_undeploy_with_a_grace_lets_a_running_call_finish_and_without_one_cuts_it_at_the_default(
        clowderd, tmp_path_factory):
    data = tmp_path_factory.mktemp("controller") / "data"
    # Deep enough that a call of `tokens` tokens outlasts the worker's default grace of 5 s.
    build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "slow-chat:v1",
                     shape={"hidden_size": 128, "intermediate_size": 256, "num_layers": 32})
    controller = start_controller(clowderd, data)
    worker = start_worker(clowderd, controller, "w1")
    admin = Admin(controller)
    tokens = 2000
    for name, grace in (("patient", ("--grace", "90")), ("hasty", ())):
        clowderctl(controller, "deploy", name, "slow-chat:v1", "--wait", "--timeout", str(LOAD_TIMEOUT))
        (replica,) = admin.ready_replicas(name)
        thread, outcome = _long_call(controller, worker, replica.replica_id, tokens)
        time.sleep(1.0)  # the call is under way
        clowderctl(controller, "undeploy", name, *grace)
        undeployed = time.monotonic()
        thread.join(120)
        print(f"\n{name}: the call ended {outcome['ended'] - undeployed:.1f}s after the undeploy: {outcome}")
        if grace:
            assert (outcome["error"], outcome["finish"], outcome["tokens"]) == (None, "length", tokens)
            assert outcome["ended"] - undeployed > 5.0  # past the default grace
        else:  # cut when the default grace ran out, with an error, not left waiting
            assert outcome["text"] > 0 and outcome["finish"] is None and outcome["error"] is not None
            assert 5.0 <= outcome["ended"] - undeployed < 5.0 + 10.0
        wait_for(f"{name} gone from the worker", lambda: not admin.stub.ListDeployments(
            controller_pb2.ListDeploymentsRequest(), metadata=admin.metadata, timeout=10).deployments)

    bad = clowderctl(controller, "undeploy", "nothing", "--grace", "-1", check=False)
    assert bad.returncode == 2 and "--grace" in bad.stderr
