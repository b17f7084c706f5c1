"""The worker role runs replicas of aimages on engine host processes (clowder.v1.Worker), tested
against a real clowderd whose store holds tiny chat llamas built beforehand."""
from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from clowder.v1 import common_pb2, inference_pb2, worker_pb2, worker_pb2_grpc
from clowderd.aimage.config import CONFIG_VERSION
from tests.clowderd_proc import ClowderdProcess, _default_config
from tests.worker_fixtures import Image, build_chat_image, start_worker, with_configuration

S = common_pb2.ReplicaState
LOAD_TIMEOUT = 60.0


# -- a worker ---------------------------------------------------------------------------------

@dataclass
class Worker:
    proc: ClowderdProcess
    stub: worker_pb2_grpc.WorkerStub
    images: dict[str, Image]

    @property
    def views(self) -> Path:
        return self.proc.data_dir / "store" / "views"

    def load(self, replica_id: str, aimage: Image | None = None, **spec) -> common_pb2.ReplicaStatus:
        """LoadReplica of aimage, or of the spec fields given (image, manifest_digest, sources)."""
        if aimage is not None:
            spec = {"image": aimage.name, "manifest_digest": aimage.digest, **spec}
        spec = common_pb2.ReplicaSpec(replica_id=replica_id, deployment=replica_id.rsplit("-", 1)[0],
                                      generation=1, **spec)
        return self.stub.LoadReplica(worker_pb2.LoadReplicaRequest(spec=spec), timeout=10)

    def status(self, replica_id: str) -> common_pb2.ReplicaStatus:
        found = [r for r in self.stub.ListReplicas(worker_pb2.ListReplicasRequest(), timeout=10).replicas
                 if r.replica_id == replica_id]
        assert found, f"replica {replica_id} not listed"
        return found[0]

    def wait_state(self, replica_id: str, *states: int, timeout: float = LOAD_TIMEOUT) -> common_pb2.ReplicaStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(replica_id)
            if status.state in states:
                return status
            if status.state in (S.REPLICA_STATE_FAILED, S.REPLICA_STATE_STOPPED) or time.monotonic() > deadline:
                pytest.fail(f"replica {replica_id} is {S.Name(status.state)} ({status.message}), expected "
                            f"{', '.join(S.Name(s) for s in states)}\n--- stderr ---\n{self.proc.stderr_text()}")
            time.sleep(0.1)

    def load_ready(self, replica_id: str, aimage: Image, **spec) -> int:
        """Load the replica, wait until it is READY; returns its engine host's pid."""
        self.load(replica_id, aimage, **spec)
        return engine_pid(self.wait_state(replica_id, S.REPLICA_STATE_READY))

    def unload(self, replica_id: str) -> common_pb2.ReplicaStatus:
        return self.stub.UnloadReplica(worker_pb2.UnloadReplicaRequest(replica_id=replica_id), timeout=30)

    def generate(self, replica_id: str, content: str = "Hello", **fields) -> list[worker_pb2.GenerateResponse]:
        return list(self.stub.Generate(chat_request(replica_id, content, **fields), timeout=30))


def chat_request(replica_id: str, content: str, *, adapter_digest: str = "", **sampling) -> worker_pb2.GenerateRequest:
    sampling = {"temperature": 0.0, "max_tokens": 8, **sampling}
    chat = inference_pb2.ChatCompletionRequest(
        model="tiny", messages=[inference_pb2.ChatMessage(role="user", content=content)],
        sampling=inference_pb2.SamplingParams(**sampling))
    return worker_pb2.GenerateRequest(replica_id=replica_id, request_id=f"req-{time.monotonic_ns()}",
                                      chat=chat, adapter_digest=adapter_digest)


def engine_pid(status: common_pb2.ReplicaStatus) -> int:
    m = re.search(r"\(pid (\d+)\)", status.message)
    assert m, f"no engine pid in the READY message {status.message!r}"
    return int(m.group(1))


def engines_of(proc: ClowderdProcess) -> list[psutil.Process]:
    """The engine host processes clowderd has running."""
    return [p for p in psutil.Process(proc.pid).children()
            if "clowderd.engines.host" in " ".join(p.cmdline())]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(condition, failure: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def text_of(responses: list[worker_pb2.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A worker whose store holds 'tiny-chat:v1' (with EP layer 'fr'), 'tiny-nosuch:v1' (the same with
    an engine this node does not know), 'tiny-solo:v1' (a base of its own, for tests that stop or kill
    its engine host), and three images on one more base: 'tiny-share-a:v1' and 'tiny-share-b:v1' with
    different EP layers both named 'fr', and 'tiny-share-f16:v1', tiny-share-a with other engine
    parameters."""
    workdir = tmp_path_factory.mktemp("worker")
    store_dir = workdir / "data" / "store"
    models = tmp_path_factory.mktemp("models")
    chat = build_chat_image(store_dir, models, "tiny-chat:v1", adapter="fr")
    nosuch = with_configuration(store_dir, chat, "tiny-nosuch:v1",
                                {"version": CONFIG_VERSION, "engine": {"name": "nosuch"}})
    share_a = build_chat_image(store_dir, models, "tiny-share-a:v1", seed=3, adapter="fr", adapter_seed=1)
    f16_engine = {"name": "transformers", "transformers": {"device": "cpu", "dtype": "bfloat16"}}
    images = {"chat": chat, "nosuch": nosuch,
              "solo": build_chat_image(store_dir, models, "tiny-solo:v1", seed=2),
              "share-a": share_a,
              "share-b": build_chat_image(store_dir, models, "tiny-share-b:v1", seed=3, adapter="fr", adapter_seed=2),
              "share-f16": with_configuration(store_dir, share_a, "tiny-share-f16:v1",
                                              {"version": CONFIG_VERSION, "engine": f16_engine})}
    proc = start_worker(workdir, workdir / "data")
    yield Worker(proc, worker_pb2_grpc.WorkerStub(proc.channel("worker")), images)
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def ready(worker):
    """The id of a READY replica of tiny-chat:v1, shared by the generation tests."""
    worker.load_ready("chat-0", worker.images["chat"])
    return "chat-0"


# -- lifecycle --------------------------------------------------------------------------------

def test_a_replica_loads_streams_a_generation_and_unloads_to_stopped(worker):
    status = worker.load("life-0", worker.images["chat"])
    assert status.state in (S.REPLICA_STATE_PENDING, S.REPLICA_STATE_LOADING)
    status = worker.wait_state("life-0", S.REPLICA_STATE_READY)
    assert (status.deployment, status.node_name, status.observed_generation) == ("life", "test-node", 1)
    pid = engine_pid(status)
    assert pid in [p.pid for p in engines_of(worker.proc)]
    assert (worker.views / "life-0" / "model.safetensors").exists()

    responses = worker.generate("life-0", max_tokens=6)
    assert text_of(responses)
    assert responses[0].HasField("queue_time")
    last = responses[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.usage.prompt_tokens > 0 and 0 < last.usage.completion_tokens <= 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert not any(r.finish_reason for r in responses[:-1])

    stopped = worker.unload("life-0")
    assert stopped.state == S.REPLICA_STATE_STOPPED
    wait_for(lambda: gone(pid), f"engine host {pid} still running")
    assert not (worker.views / "life-0").exists()
    assert worker.status("life-0").state == S.REPLICA_STATE_STOPPED


def test_load_replica_twice_keeps_the_one_replica_and_engine(worker, ready):
    first = worker.status(ready)
    engines = sorted(p.pid for p in engines_of(worker.proc))
    again = worker.load(ready, worker.images["chat"])
    assert again.state == S.REPLICA_STATE_READY
    assert engine_pid(again) == engine_pid(first)
    assert again.state_since == first.state_since
    assert [r.replica_id for r in worker.stub.ListReplicas(
        worker_pb2.ListReplicasRequest(deployment="chat")).replicas] == [ready]
    assert sorted(p.pid for p in engines_of(worker.proc)) == engines


def test_an_image_not_in_the_store_without_sources_fails_naming_the_image(worker):
    worker.load("missing-0", image="acme/absent:v9", manifest_digest="sha256:" + "0" * 64)
    status = worker.wait_state("missing-0", S.REPLICA_STATE_FAILED)
    assert "'acme/absent:v9'" in status.message and "no source" in status.message


def test_a_source_the_pull_policy_refuses_is_named_in_the_failure(worker):
    worker.load("refused-0", image="acme/absent:v9", manifest_digest="sha256:" + "0" * 64,
                sources=["127.0.0.1:9"])
    status = worker.wait_state("refused-0", S.REPLICA_STATE_FAILED)
    assert "'acme/absent:v9'" in status.message
    assert "127.0.0.1:9" in status.message and "pull_from" in status.message


def test_an_unknown_engine_in_the_configuration_fails_naming_it(worker):
    worker.load("nosuch-0", worker.images["nosuch"])
    status = worker.wait_state("nosuch-0", S.REPLICA_STATE_FAILED)
    assert "unknown engine 'nosuch'" in status.message
    assert not (worker.views / "nosuch-0").exists()


def test_unloading_a_replica_while_it_loads_stops_it_and_its_engine(worker):
    engines = {p.pid for p in engines_of(worker.proc)}
    worker.load("early-0", worker.images["solo"])
    worker.wait_state("early-0", S.REPLICA_STATE_LOADING)
    wait_for(lambda: {p.pid for p in engines_of(worker.proc)} - engines, "no engine host started")
    assert worker.unload("early-0").state == S.REPLICA_STATE_STOPPED
    wait_for(lambda: {p.pid for p in engines_of(worker.proc)} == engines, "the loading engine host is still running")
    assert not (worker.views / "early-0").exists()
    assert len(list(worker.views.glob("base-*"))) == len(engines)  # one base view per engine host


def test_unknown_replica_is_not_found_for_unload_and_generate(worker):
    with pytest.raises(grpc.RpcError) as e:
        worker.unload("nobody-0")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nobody-0" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        worker.generate("nobody-0")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nobody-0" in e.value.details()


def test_a_replica_id_that_cannot_name_a_view_is_invalid_argument(worker):
    with pytest.raises(grpc.RpcError) as e:
        worker.load("Bad/Id", worker.images["chat"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'Bad/Id'" in e.value.details()


# -- generation -------------------------------------------------------------------------------

def test_generate_on_a_replica_not_ready_is_unavailable_with_its_state(worker):
    worker.load("late-0", worker.images["nosuch"])
    worker.wait_state("late-0", S.REPLICA_STATE_FAILED)
    with pytest.raises(grpc.RpcError) as e:
        worker.generate("late-0")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "FAILED" in e.value.details() and "nosuch" in e.value.details()


def test_complete_answers_each_request_on_its_call_in_one_message_by_its_tag(worker, ready):
    streamed = worker.generate(ready, "Hello", max_tokens=12)
    requests = [worker_pb2.CompleteRequest(tag=7, request=chat_request(ready, "Hello", max_tokens=12)),
                worker_pb2.CompleteRequest(tag=8, request=chat_request("nobody-0", "Hello")),
                worker_pb2.CompleteRequest(tag=9, request=chat_request(ready, "Hello", max_tokens=12))]
    answers = {a.tag: a for a in worker.stub.Complete(iter(requests), timeout=30)}
    assert sorted(answers) == [7, 8, 9]  # the call ends once every request sent on it is answered
    for tag in (7, 9):
        whole = answers[tag].response
        assert answers[tag].status_code == 0
        assert whole.text == text_of(streamed) and whole.text
        assert whole.finish_reason == streamed[-1].finish_reason
        assert whole.usage == next(r.usage for r in streamed if r.HasField("usage"))
        assert whole.HasField("queue_time")
    assert answers[8].status_code == grpc.StatusCode.NOT_FOUND.value[0] and "nobody-0" in answers[8].status_message
    assert not answers[8].HasField("response")


def test_an_adapter_selected_by_digest_answers_differently_from_the_base(worker, ready):
    image = worker.images["chat"]
    base = text_of(worker.generate(ready, "Bonjour", max_tokens=12, adapter_digest=image.model_digest))
    for digest in image.adapters["fr"]:  # any layer of the EP layer selects it
        assert text_of(worker.generate(ready, "Bonjour", max_tokens=12, adapter_digest=digest)) != base
    assert text_of(worker.generate(ready, "Bonjour", max_tokens=12, adapter_digest=image.model_digest)) == base


def test_an_aimage_with_one_ep_layer_answers_through_it_unless_the_base_is_asked_for(worker, ready):
    image = worker.images["chat"]
    fr = text_of(worker.generate(ready, "Bonjour", max_tokens=12, adapter_digest=image.adapters["fr"][0]))
    assert text_of(worker.generate(ready, "Bonjour", max_tokens=12)) == fr
    assert text_of(worker.generate(ready, "Bonjour", max_tokens=12, adapter_digest=image.model_digest)) != fr


def test_an_adapter_digest_not_in_the_image_is_not_found(worker, ready):
    with pytest.raises(grpc.RpcError) as e:
        worker.generate(ready, adapter_digest="sha256:" + "1" * 64)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "sha256:" + "1" * 64 in e.value.details() and "fr (" in e.value.details()


def test_an_engine_validation_error_is_invalid_argument_with_its_message(worker, ready):
    with pytest.raises(grpc.RpcError) as e:
        worker.generate(ready, temperature=-1.0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()


def test_a_call_cancelled_by_its_client_ends_its_request_on_the_replica(worker, ready):
    engine = psutil.Process(engine_pid(worker.status(ready)))
    engine.suspend()  # the request stays open until the client cancels it
    try:
        call = worker.stub.Generate(chat_request(ready, "Hello"))
        wait_for(lambda: worker.status(ready).in_flight == 1, "the request is not in flight")
        call.cancel()
        wait_for(lambda: worker.status(ready).in_flight == 0, "the cancelled request is still in flight")
    finally:
        engine.resume()
    assert text_of(worker.generate(ready))  # the engine serves on


def test_an_image_missing_locally_is_pulled_from_a_clowder_storage_node(worker, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("storage")
    remote = build_chat_image(workdir / "data" / "store", tmp_path_factory.mktemp("models"), "tiny-remote:v1",
                              seed=3)
    config = _default_config(workdir, ("storage",))
    storage = ClowderdProcess(workdir, config, ("storage",))
    try:
        storage.wait_ready()
        worker.load("pulled-0", remote, sources=["clowder://127.0.0.1:9", f"clowder://{storage.addresses['storage']}"])
        worker.wait_state("pulled-0", S.REPLICA_STATE_READY)
        assert text_of(worker.generate("pulled-0"))
        assert worker.unload("pulled-0").state == S.REPLICA_STATE_STOPPED
    finally:
        assert storage.stop() == 0



# -- one engine host per base -----------------------------------------------------------------

def test_aimages_sharing_a_base_share_one_engine_host_each_with_its_own_ep_layer(worker):
    a = worker.load_ready("share-a-0", worker.images["share-a"])
    b = worker.load_ready("share-b-0", worker.images["share-b"])
    assert a == b
    assert "its base shared with 'share-a-0'" in worker.status("share-b-0").message
    # The weights' digests: both EP layers have the same adapter_config.json.
    fr_a, fr_b = (next(d for d in worker.images[image].adapters["fr"] if d not in worker.images[other].adapters["fr"])
                  for image, other in (("share-a", "share-b"), ("share-b", "share-a")))
    model = worker.images["share-a"].model_digest
    assert model == worker.images["share-b"].model_digest
    base = text_of(worker.generate("share-a-0", "Bonjour", max_tokens=12, adapter_digest=model))
    assert text_of(worker.generate("share-b-0", "Bonjour", max_tokens=12, adapter_digest=model)) == base
    answer_a = text_of(worker.generate("share-a-0", "Bonjour", max_tokens=12, adapter_digest=fr_a))
    answer_b = text_of(worker.generate("share-b-0", "Bonjour", max_tokens=12, adapter_digest=fr_b))
    assert len({base, answer_a, answer_b}) == 3, "both EP layers are named 'fr' but differ"
    with pytest.raises(grpc.RpcError) as e:  # one aimage's EP layer is not reachable through the other
        worker.generate("share-a-0", adapter_digest=fr_b)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    assert worker.unload("share-a-0").state == S.REPLICA_STATE_STOPPED
    assert not gone(a)
    assert text_of(worker.generate("share-b-0", "Bonjour", max_tokens=12, adapter_digest=fr_b)) == answer_b
    assert worker.unload("share-b-0").state == S.REPLICA_STATE_STOPPED
    wait_for(lambda: gone(a), f"engine host {a} still running after its last replica left")


def test_the_same_base_with_other_engine_parameters_gets_an_engine_host_of_its_own(worker):
    a = worker.load_ready("own-a-0", worker.images["share-a"])
    f16 = worker.load_ready("own-f16-0", worker.images["share-f16"])
    assert a != f16 and "shared" not in worker.status("own-f16-0").message
    for replica_id, pid in (("own-a-0", a), ("own-f16-0", f16)):
        assert worker.unload(replica_id).state == S.REPLICA_STATE_STOPPED
        wait_for(lambda: gone(pid), f"engine host {pid} still running")

# -- engine crashes and shutdown --------------------------------------------------------------

def test_killing_the_engine_fails_the_replica_and_its_open_stream_with_the_exit_status(worker):
    pid = worker.load_ready("crash-0", worker.images["solo"])
    engine = psutil.Process(pid)
    engine.suspend()  # the request below stays open in the engine until the kill
    outcome: dict = {}

    def stream():
        try:
            outcome["responses"] = worker.generate("crash-0")
        except grpc.RpcError as e:
            outcome["error"] = e

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(0.5)
    engine.send_signal(signal.SIGKILL)
    reader.join(15)
    assert not reader.is_alive(), "the stream hangs after the engine died"
    assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert "SIGKILL" in outcome["error"].details()
    status = worker.wait_state("crash-0", S.REPLICA_STATE_FAILED)
    assert f"pid {pid}" in status.message and "status -9 (killed by SIGKILL)" in status.message
    wait_for(lambda: not (worker.views / "crash-0").exists(), "the failed replica's view was not removed")
    assert worker.unload("crash-0").state == S.REPLICA_STATE_STOPPED


def test_sigterm_with_a_ready_replica_exits_0_and_leaves_no_engine(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("worker-sigterm")
    chat = build_chat_image(workdir / "data" / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    proc = start_worker(workdir, workdir / "data")
    try:
        w = Worker(proc, worker_pb2_grpc.WorkerStub(proc.channel("worker")), {})
        pid = w.load_ready("term-0", chat)
        assert proc.stop(signal.SIGTERM) == 0
        assert gone(pid)
        assert list(w.views.iterdir()) == []
    finally:
        proc.stop()
