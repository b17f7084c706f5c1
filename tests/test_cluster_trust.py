"""Trust between the roles of a real cluster on loopback, tried as an attacker on the same network would:
no listener between roles takes a call without a certificate of the cluster CA, each method only from
the roles it is for, a revoked node is refused by every role at once, certificates rotate with no
restart, and `insecure = true` is said at every start."""
from __future__ import annotations

import datetime as dt
import queue
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from clowder.v1 import (common_pb2, controller_pb2, controller_pb2_grpc, inference_pb2, node_pb2, node_pb2_grpc,
                        registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc)
from clowderd.trust import certs
from clowderd.trust.ca import ClusterCA
from clowderd.trust.dial import Dialer
from clowderd.trust.identity import Material, NodeIdentity
from tests.clowderd_proc import ClowderdProcess
from tests.cluster_fixtures import clowderctl, clowderctl_env, start_node, token_file, wait_for
from tests.test_controller_deployments import GRACE, INTERVAL, LOAD_TIMEOUT, Admin, start_controller
from tests.trust_fixtures import channel_as, issue_identity, served_serial
from tests.worker_fixtures import build_chat_image

QUESTION = inference_pb2.ChatCompletionRequest(messages=[inference_pb2.ChatMessage(role="user", content="hi")])


@pytest.fixture
def cluster(clowderd, tmp_path_factory):
    """A controller and storage node holding tiny-chat:v1, deployed as chat on a worker+lb node w1."""
    data = tmp_path_factory.mktemp("controller") / "data"
    build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    controller = start_controller(clowderd, data, args=("--deploy", "chat=tiny-chat:v1"))
    node = start_node(clowderd, controller, "w1", ("worker", "lb"))
    (replica,) = wait_for("chat READY", lambda: Admin(controller).ready_replicas("chat"), timeout=LOAD_TIMEOUT)
    return controller, node, replica.replica_id


def generate(channel: grpc.Channel, replica_id: str) -> list[worker_pb2.GenerateResponse]:
    request = worker_pb2.GenerateRequest(replica_id=replica_id, request_id="t", chat=inference_pb2.ChatCompletionRequest(
        messages=QUESTION.messages, sampling=inference_pb2.SamplingParams(max_tokens=3)))
    return list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=30))


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def refusals(proc: ClowderdProcess) -> list[dict]:
    return [r for r in proc.log_records() if r["msg"] == "call refused"]


def test_no_listener_between_roles_answers_without_a_certificate_of_the_cluster(cluster, tmp_path):
    controller, node, replica_id = cluster
    worker = node.addresses["worker"]
    plain = grpc.insecure_channel(worker)
    bare_tls = grpc.secure_channel(worker, grpc.ssl_channel_credentials(root_certificates=controller.ca()),
                                   options=[("grpc.ssl_target_name_override", "clowder-worker")])
    stranger = Dialer(identity_of_another_cluster(tmp_path)).channel(worker, "worker")
    for channel in (plain, bare_tls, stranger):
        with channel:
            error = refused(lambda: generate(channel, replica_id))
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake itself is refused
    for listener in ("storage", "cluster"):
        with grpc.insecure_channel(controller.addresses[listener]) as channel:
            error = refused(lambda: node_pb2_grpc.NodeStub(channel).GetInfo(node_pb2.GetInfoRequest(), timeout=10))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert generate(channel_as(controller, node, "worker", "lb"), replica_id)[-1].finish_reason


def identity_of_another_cluster(tmp_path: Path) -> NodeIdentity:
    """An lb's certificate, from a CA that is not the cluster's."""
    other = ClusterCA.load_or_create(tmp_path / "other-cluster")
    key = certs.new_key()
    cert = other.issue(key.public_key(), node_id="node-x", name="x", roles=("lb",), lifetime=dt.timedelta(hours=1))
    return NodeIdentity(Material(certs.key_pem(key), certs.certificate_pem(cert), other.bundle))


def test_each_method_answers_only_the_roles_it_is_for_and_every_refusal_is_logged(cluster):
    controller, node, replica_id = cluster
    as_storage = channel_as(controller, node, "worker", "storage")
    error = refused(lambda: generate(as_storage, replica_id))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "Generate is open to lb" in error.details()
    as_lb = worker_pb2_grpc.WorkerStub(channel_as(controller, node, "worker", "lb"))
    for call in (lambda: as_lb.UnloadReplica(worker_pb2.UnloadReplicaRequest(replica_id=replica_id), timeout=10),
                 lambda: as_lb.LoadReplica(worker_pb2.LoadReplicaRequest(spec=common_pb2.ReplicaSpec(
                     replica_id="rogue-1", deployment="rogue", image="tiny-chat:v1")), timeout=10)):
        error = refused(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "open to controller" in error.details()
    assert [r.replica_id for r in as_lb.ListReplicas(worker_pb2.ListReplicasRequest(), timeout=10).replicas] == [
        replica_id]  # still there, still the only one
    logged = wait_for("the worker's log of three refusals", lambda: len(refusals(node)) >= 3 and refusals(node))
    assert {r["method"] for r in logged} == {"/clowder.v1.Worker/Generate", "/clowder.v1.Worker/UnloadReplica",
                                             "/clowder.v1.Worker/LoadReplica"}
    assert all(r["peer"].startswith("ipv4:127.0.0.1:") and r["code"] == "PERMISSION_DENIED" for r in logged)

    membership = controller_pb2_grpc.MembershipStub(channel_as(controller, controller, "cluster", "worker"))
    error = refused(lambda: next(iter(membership.WatchRoutes(controller_pb2.WatchRoutesRequest(), timeout=10))))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    w1_id = node.identity().node_id
    error = refused(lambda: membership.Heartbeat(controller_pb2.HeartbeatRequest(node_id=w1_id), timeout=10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "is not the caller's" in error.details()

    reader = registry_pb2_grpc.RegistryStub(channel_as(controller, controller, "storage", "worker"))
    got = reader.GetManifest(registry_pb2.GetManifestRequest(repository="tiny-chat", reference="v1"), timeout=10)
    assert got.digest.startswith("sha256:")  # the nodes of the cluster read chunks
    for call in (lambda: registry_pb2_grpc.RegistryStub(channel_as(controller, controller, "storage", "worker"))
                 .PutManifest(registry_pb2.PutManifestRequest(), timeout=10),):
        assert refused(call).code() == grpc.StatusCode.PERMISSION_DENIED  # nobody writes over gRPC


def test_a_revoked_node_is_refused_by_every_role_and_stops(clowderd, cluster):
    controller, node, replica_id = cluster
    other = start_node(clowderd, controller, "w2", ("worker",))
    wait_for("w2 ready", lambda: "w2" in clowderctl(controller, "nodes").stdout)
    revoked = other.identity()
    result = clowderctl(controller, "node", "revoke", "w2")
    assert result.stdout.strip() == "node w2 revoked: 1 certificate(s) refused from now on"
    assert other.wait(30) == 2
    assert "the cluster revoked this node's certificate" in other.stderr_text()
    as_revoked = Dialer(revoked)
    calls = {
        "the controller's cluster listener": lambda: controller_pb2_grpc.MembershipStub(as_revoked.channel(
            controller.addresses["cluster"], "controller")).Heartbeat(
            controller_pb2.HeartbeatRequest(node_id=revoked.node_id), timeout=10),
        "the storage node": lambda: registry_pb2_grpc.RegistryStub(as_revoked.channel(
            controller.addresses["storage"], "storage")).ListRepositories(
            registry_pb2.ListRepositoriesRequest(), timeout=10),
        "another worker": lambda: node_pb2_grpc.NodeStub(as_revoked.channel(
            node.addresses["worker"], "worker")).GetInfo(node_pb2.GetInfoRequest(), timeout=10),
    }
    for where, call in calls.items():
        # The other worker hears of the revocation through its trust watch: a moment later at most.
        error = wait_for(f"{where} to refuse the revoked certificate",
                         lambda: (e := _error(call)) and e.code() == grpc.StatusCode.UNAUTHENTICATED and e)
        assert "certificate revoked" in error.details(), where
    assert "w2" not in clowderctl(controller, "nodes").stdout
    events = clowderctl(controller, "events").stdout
    assert "NodeRevoked" in events
    assert generate(channel_as(controller, node, "worker", "lb"), replica_id)  # the others are unaffected


def _error(call) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as e:
        return e
    return None


def test_a_certificate_that_ends_while_its_complete_call_is_open_is_refused_at_the_next_request(cluster):
    controller, node, replica_id = cluster
    lifetime = 8.0
    ends = time.time() + lifetime
    as_lb = Dialer(issue_identity(controller, ("lb",), lifetime=dt.timedelta(seconds=lifetime)))
    channel = as_lb.channel(node.addresses["worker"], "worker")
    node.adopt(channel)
    requests: queue.Queue = queue.Queue()
    answers = worker_pb2_grpc.WorkerStub(channel).Complete(iter(requests.get, None), timeout=60)
    request = worker_pb2.GenerateRequest(replica_id=replica_id, request_id="t", chat=inference_pb2.ChatCompletionRequest(
        messages=QUESTION.messages, sampling=inference_pb2.SamplingParams(max_tokens=3)))
    requests.put(worker_pb2.CompleteRequest(tag=1, request=request))
    first = next(answers)
    assert first.tag == 1 and first.status_code == 0 and first.response.finish_reason
    wait_for("the certificate's end", lambda: time.time() > ends + 0.5, timeout=lifetime + 5)
    requests.put(worker_pb2.CompleteRequest(tag=2, request=request))
    error = refused(lambda: next(answers))
    requests.put(None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "certificate expired" in error.details()
    assert any(r["method"] == "/clowder.v1.Worker/Complete" for r in refusals(node))


def test_the_controllers_own_node_cannot_be_revoked(clowderd, tmp_path):
    controller = start_controller(clowderd, tmp_path / "data")
    result = clowderctl(controller, "node", "revoke", "ctl", check=False)
    assert result.returncode == 1 and "is the controller's own node" in result.stderr


def test_certificates_rotate_before_they_expire_without_a_restart(clowderd, tmp_path):
    lifetime = 12  # renewed at 2/3: 8 s after it was issued
    controller = start_controller(clowderd, tmp_path / "data", controller={"certificate_lifetime_seconds": lifetime})
    node = start_node(clowderd, controller, "w1", ("worker",))
    first = node.identity()
    assert first.holder.not_after - time.time() <= lifetime
    renewed = wait_for("the renewed certificate", lambda: (i := node.identity()).holder.serial != first.holder.serial
                       and i, timeout=lifetime + 20)
    assert renewed.node_id == first.node_id and renewed.material.key != first.material.key
    wait_for("the worker to present the new certificate",
             lambda: format(served_serial(node.addresses["worker"]), "x") == renewed.holder.serial)
    assert node.returncode is None and node.pid == node.proc.pid
    since = time.time()
    wait_for("a heartbeat with the new certificate", lambda: [
        r for r in controller.log_records() if r["msg"] == "renewed a node's certificate" and r["node"] == "w1"])
    admin = Admin(controller)
    wait_for("w1 heartbeating after the renewal", lambda: admin.stub.GetNode(
        controller_pb2.GetNodeRequest(name="w1"), metadata=admin.metadata, timeout=10
    ).last_heartbeat.ToNanoseconds() / 1e9 > since + INTERVAL)
    # Past the first certificate's end, the node still belongs: it renewed in time, and again.
    time.sleep(max(0.0, first.holder.not_after - time.time()) + GRACE)
    assert admin.stub.GetNode(controller_pb2.GetNodeRequest(name="w1"), metadata=admin.metadata,
                              timeout=10).state == controller_pb2.NODE_STATE_READY
    assert node.returncode is None


def test_insecure_is_said_at_every_start(clowderd, tmp_path):
    data = tmp_path / "data"
    for _ in range(2):
        proc = clowderd(config_extra={"data_dir": str(data), "cluster": {"insecure": True}})
        assert proc.stop() == 0
        warnings = [r for r in proc.log_records() if r["level"] == "warning" and r["msg"].startswith("insecure = true")]
        assert len(warnings) == 1
    assert not (data / "controller" / "ca.key").exists()
    assert "::" not in token_file(proc).read_text()


def test_clowderctl_pulls_from_a_storage_node_with_an_admin_certificate(clowderd, tmp_path_factory):
    data = tmp_path_factory.mktemp("controller") / "data"
    image = build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    controller = start_controller(clowderd, data)
    elsewhere = tmp_path_factory.mktemp("laptop")
    source = f"clowder://{controller.addresses['storage']}/tiny-chat:v1"
    env = {**clowderctl_env(controller), "CLOWDER_DATA_DIR": str(elsewhere)}
    without = subprocess.run([sys.executable, "-m", "clowderctl.main", "pull", source], capture_output=True,
                             text=True, timeout=60, env=env)
    assert without.returncode == 1, without.stderr
    assert "asks for a certificate of its cluster" in without.stderr
    token = (controller.data_dir / "controller" / "admin-token").read_text().strip()
    pulled = subprocess.run([sys.executable, "-m", "clowderctl.main", "pull", source, "-o", "json"],
                            capture_output=True, text=True, timeout=120, env={**env, "CLOWDER_TOKEN": token})
    assert pulled.returncode == 0, pulled.stderr
    assert image.digest in pulled.stdout
