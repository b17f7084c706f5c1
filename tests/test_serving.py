"""Serving end to end with real processes: one clowderd with all four roles and `--deploy` answers the
official openai client; an lb in front of a worker keeps answering, every call, while the controller
is killed and restarted; and a worker whose copy of the weights is corrupt fetches it again from the
storage node before the engine loads it, or fails the replica naming the blob when that copy is corrupt
too."""
from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import openai

from clowder.v1 import common_pb2
from clowderd.store.content import ContentStore
from tests.cluster_fixtures import start_node, wait_for
from tests.store_fixtures import flip_byte
from tests.test_controller_deployments import Admin, start_controller
from tests.worker_fixtures import build_chat_image

QUESTION = [{"role": "user", "content": "Hello there"}]


def lb_client(proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{proc.config['lb']['http_listen']}/v1", api_key="none", max_retries=0)


def answers(client: openai.OpenAI, model: str) -> bool:
    try:
        return bool(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4,
                                                   temperature=0).choices[0].message.content)
    except openai.APIError:
        return False


def test_one_clowderd_with_all_roles_serves_a_deployment_given_on_its_command_line(clowderd, tmp_path_factory):
    data = tmp_path_factory.mktemp("node") / "data"
    build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    proc = clowderd(config_extra={"data_dir": str(data)}, args=["--deploy", "chat=tiny-chat:v1"])
    client = lb_client(proc)
    wait_for("the deployment answers through the lb", lambda: answers(client, "chat"), timeout=120)
    assert [m.id for m in client.models.list().data] == ["chat"]
    streamed = client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    assert proc.stop() == 0


def test_no_call_fails_while_the_controller_is_killed_and_restarted(clowderd, tmp_path_factory):
    data = tmp_path_factory.mktemp("controller") / "data"
    build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    controller = start_controller(clowderd, data, args=["--deploy", "chat=tiny-chat:v1"])
    lb = start_node(clowderd, controller, "w1", ("worker", "lb"))
    client = lb_client(lb)
    wait_for("the deployment answers through the lb", lambda: answers(client, "chat"), timeout=120)

    results: list[bool] = []
    stop = threading.Event()

    def call_forever():
        while not stop.is_set():
            results.append(answers(client, "chat"))

    caller = threading.Thread(target=call_forever)
    caller.start()
    try:
        time.sleep(1.0)
        controller.send_signal(signal.SIGKILL)
        controller.wait()
        time.sleep(1.0)
        start_controller(clowderd, data, controller={"listen": controller.addresses["controller"],
                                                     "cluster_listen": controller.addresses["cluster"]},
                         storage={"listen": controller.addresses["storage"]})
        time.sleep(1.5)
    finally:
        stop.set()
        caller.join(30)
    assert len(results) > 10 and all(results), f"{results.count(False)} of {len(results)} calls failed"


def flip_stored_byte(data_dir: Path, digest: str) -> None:
    """Flip a byte in the middle of the blob's file in data_dir's store."""
    store = ContentStore(data_dir / "store")
    try:
        path = store.blob_path(digest)
    finally:
        store.close()
    flip_byte(path, path.stat().st_size // 2)


def start_cluster_with_the_image_on_both(clowderd, tmp_path_factory, *, corrupt_on_storage: bool = False,
                                         manifest_too: bool = False):
    """A controller + storage process and a worker + lb process, each store holding tiny-chat:v1, the
    worker's copy of the weights with a flipped byte (and of the manifest, and the storage node's copy of
    the weights, when asked); `chat` deployed. Returns (controller, worker, the weights' digest, the
    weights, the manifest's digest)."""
    models = tmp_path_factory.mktemp("models")
    data = tmp_path_factory.mktemp("controller") / "data"
    image = build_chat_image(data / "store", models, "tiny-chat:v1")
    worker_data = tmp_path_factory.mktemp("worker") / "data"
    assert build_chat_image(worker_data / "store", models, "tiny-chat:v1").digest == image.digest
    weights = (models / "model-0" / "model.safetensors").read_bytes()
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    flip_stored_byte(worker_data, digest)
    if manifest_too:
        flip_stored_byte(worker_data, image.digest)
    if corrupt_on_storage:
        flip_stored_byte(data, digest)
    controller = start_controller(clowderd, data, args=["--deploy", "chat=tiny-chat:v1"])
    worker = start_node(clowderd, controller, "w1", ("worker", "lb"), data_dir=str(worker_data))
    return controller, worker, digest, weights, image.digest


def quarantined_by(proc, digest: str) -> list[str]:
    return [r["found_by"] for r in proc.log_records()
            if r["msg"] == "corrupt blob quarantined" and r["digest"] == digest]


def test_weights_corrupt_on_the_worker_are_fetched_again_from_storage_before_the_engine_loads_them(
        clowderd, tmp_path_factory):
    controller, worker, digest, weights, _ = start_cluster_with_the_image_on_both(clowderd, tmp_path_factory)
    client = lb_client(worker)
    wait_for("the deployment answers through the lb", lambda: answers(client, "chat"), timeout=120)
    assert quarantined_by(worker, digest) == ["view"]
    assert any(r["msg"] == "quarantined blob repaired" and r["digest"] == digest for r in worker.log_records())
    store = ContentStore(worker.data_dir / "store")
    try:
        assert store.read_bytes(digest) == weights and store.quarantined() == []
    finally:
        store.close()
    assert quarantined_by(controller, digest) == []  # the storage node's copy was good


def test_a_corrupt_manifest_is_fetched_again_and_then_the_weights_it_hid(clowderd, tmp_path_factory):
    controller, worker, digest, _, manifest = start_cluster_with_the_image_on_both(clowderd, tmp_path_factory,
                                                                                  manifest_too=True)
    client = lb_client(worker)
    wait_for("the deployment answers through the lb", lambda: answers(client, "chat"), timeout=120)
    assert quarantined_by(worker, manifest) == ["read"] and quarantined_by(worker, digest) == ["view"]
    assert {r["digest"] for r in worker.log_records() if r["msg"] == "quarantined blob repaired"} == {manifest, digest}


def test_weights_corrupt_on_the_worker_and_on_the_storage_node_fail_the_replica_naming_the_blob(
        clowderd, tmp_path_factory):
    controller, worker, digest, _, _ = start_cluster_with_the_image_on_both(clowderd, tmp_path_factory,
                                                                            corrupt_on_storage=True)
    admin = Admin(controller)

    def failed() -> list[common_pb2.ReplicaStatus]:
        return [r for r in admin.deployment("chat").status.replicas
                if r.state == common_pb2.REPLICA_STATE_FAILED and digest in r.message]

    [replica] = wait_for("the replica FAILED naming the weights", failed, timeout=120)
    assert "model.safetensors" in replica.message and "could not be fetched again" in replica.message
    assert "corrupt" in replica.message and "quarantined" in replica.message  # what the storage node said
    assert quarantined_by(worker, digest) == ["view"] and quarantined_by(controller, digest) == ["fetch-chunks"]
    assert not answers(lb_client(worker), "chat")
