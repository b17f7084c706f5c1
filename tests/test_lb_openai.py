"""The lb's OpenAI-compatible HTTP API and its gRPC twin, in front of a real worker clowderd serving a tiny
chat llama, driven by the official `openai` client: methods, streaming, errors, retries, cancellation."""
from __future__ import annotations

import json
import re
import socket
import sqlite3
import ssl
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from clowder.v1 import inference_pb2, inference_pb2_grpc, worker_pb2
from clowderd.lb.routes import Endpoint
from clowderd.middleware.auth import key_digest
from tests.cluster_fixtures import start_node
from tests.lb_fixtures import LbServer, tiny_route, worker  # noqa: F401  (fixture: a worker serving a tiny chat llama)
from tests.tls_certs import make_tls_files

QUESTION = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def lb(worker, tmp_path_factory):
    server = LbServer(tmp_path_factory.mktemp("lb"), max_body_bytes=64 * 1024)
    server.put_route(tiny_route(worker))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(lb):
    return openai.OpenAI(base_url=lb.base_url, api_key="unused", max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(model=kw.pop("model", "tiny"), messages=kw.pop("messages", QUESTION),
                                          temperature=0, max_tokens=kw.pop("max_tokens", 8), **kw)


# -- methods ------------------------------------------------------------------------------------

def test_models_lists_each_deployment_by_name(client):
    models = {m.id: m for m in client.models.list().data}
    assert models["tiny"].created == 1_700_000_000 and models["tiny"].owned_by == "clowder"


def test_a_chat_completion_answers_with_usage_and_the_aimage_as_fingerprint(client, worker):
    response = chat(client)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0 and 0 < response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.model == "tiny" and response.id.startswith("chatcmpl-")
    assert response.system_fingerprint == worker[2].digest


def test_a_streamed_chat_gives_the_same_text_and_ends_with_usage(client):
    whole = chat(client).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_a_stream_ends_with_done_and_carries_the_overhead_header(lb):
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{lb.base_url}/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert float(r.headers["x-clowder-lb-overhead-ms"]) >= 0
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_completions_stream_and_not_and_echo_the_prompt(client):
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0)
    assert whole.choices[0].text and whole.id.startswith("cmpl-")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    echoed = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon" + whole.choices[0].text


def test_n_choices_are_generated_each_with_its_index(client):
    response = chat(client, n=3, max_tokens=4)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content for c in response.choices)
    assert response.usage.completion_tokens <= 12


# -- errors -------------------------------------------------------------------------------------

def test_an_unknown_model_is_404_naming_it(client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model="nosuch")
    assert "'nosuch'" in e.value.message and "/v1/models" in e.value.message


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "tiny"}).encode(), 400, "messages"),
    (json.dumps({"model": "tiny", "messages": QUESTION, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "messages": [{"role": "king", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"model": "tiny", "messages": QUESTION, "tools": [{"type": "function"}]}).encode(), 400, "tools"),
    (json.dumps({"model": "tiny", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
])
def test_bad_requests_get_openai_error_json_naming_the_field(lb, body, status, words):
    r = httpx.post(f"{lb.base_url}/chat/completions", content=body, timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def _with(**fields) -> bytes:
    return json.dumps({"model": "tiny", "messages": QUESTION, **fields}).encode()


@pytest.mark.parametrize("body, field", [
    (_with(max_tokens=10 ** 12), "max_tokens"),
    (_with(max_tokens=2 ** 32), "max_tokens"),
    (_with(max_completion_tokens=2 ** 32), "max_completion_tokens"),
    (_with(top_k=2 ** 32), "top_k"),
    (_with(n=2 ** 40), "n"),
    (_with(seed=2 ** 63), "seed"),
    (_with(seed=-1), "seed"),
    (_with(temperature=10 ** 400), "temperature"),  # an integer no float holds
    (_with(top_p=-10 ** 400), "top_p"),
    (_with(metadata={"k" * 65: "v"}), "metadata"),
    (_with(metadata={"k": "v" * 513}), "metadata.k"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}', "messages[0].name"),
    (b'{"model": "\\ud800", "messages": []}', "model"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "user": "\\udbff\\udbff"}', "user"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop[0]"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "metadata": {"\\ud800": "v"}}',
     "metadata: a key"),
])
def test_values_no_worker_could_take_are_400_naming_the_field(lb, body, field):
    """Numbers past the range of the worker's protobuf fields (or of a float) and strings holding a lone
    surrogate were internal errors (500) once they reached the worker request; they are the caller's."""
    r = httpx.post(f"{lb.base_url}/chat/completions", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(f"{field}: "), error
    assert error["type"] == "invalid_request_error" and len(error["message"]) < 300


@pytest.mark.parametrize("depth, allowed", [(32, True), (33, False), (30_000, False)])
def test_json_nested_too_deep_is_400_in_openai_json(lb, depth, allowed):
    nested = "[" * (depth - 2) + "]" * (depth - 2)  # the body's object and metadata are the other two levels
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "metadata": {"x": '
    r = httpx.post(f"{lb.base_url}/chat/completions", content=f"{body}{nested}}}}}", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    if allowed:  # deep enough to pass the JSON check: the field's own check answers
        assert message.startswith("metadata: must be an object of strings"), message
    else:
        assert "deeper than 32 levels" in message, message


def test_a_huge_seed_wraps_between_the_choices_of_one_call(client):
    response = chat(client, n=2, seed=2 ** 63 - 1, max_tokens=4)
    assert [c.index for c in response.choices] == [0, 1]


def test_grpc_requests_are_checked_as_the_http_ones(lb):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(lb.grpc_address))
    messages = [inference_pb2.ChatMessage(role="user", content="Hello there")]
    for sampling, field in ((inference_pb2.SamplingParams(n=2 ** 32 - 1), "n"),
                            (inference_pb2.SamplingParams(seed=-5), "seed"),
                            (inference_pb2.SamplingParams(temperature=float("nan")), "temperature"),
                            (inference_pb2.SamplingParams(stop=["a", "b", "c", "d", "e"]), "stop")):
        with pytest.raises(grpc.RpcError) as e:
            stub.ChatCompletion(inference_pb2.ChatCompletionRequest(model="tiny", messages=messages,
                                                                    sampling=sampling), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(f"{field}: ")
    with pytest.raises(grpc.RpcError) as e:
        stub.Completion(inference_pb2.CompletionRequest(model="tiny", prompt="Once upon", sampling=inference_pb2.
                                                        SamplingParams(max_tokens=2 ** 32 - 1)), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.value.details()  # the engine's
    wrapped = stub.ChatCompletion(inference_pb2.ChatCompletionRequest(
        model="tiny", messages=messages, sampling=inference_pb2.SamplingParams(seed=2 ** 63 - 1, n=2, max_tokens=2)),
        timeout=30)
    assert len(wrapped.choices) == 2


def test_max_tokens_beyond_the_context_is_400_from_the_engine(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=1_000_000)
    assert "max_tokens" in e.value.message


def test_a_body_over_the_limit_is_413(lb):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (70 * 1024)}]}
    r = httpx.post(f"{lb.base_url}/chat/completions", json=big, timeout=10)
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]


def test_an_unknown_path_is_404_in_openai_json(lb):
    r = httpx.get(f"{lb.base_url}/embeddings", timeout=10)
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]


# -- routing ------------------------------------------------------------------------------------

def test_a_replica_failing_before_the_first_byte_is_retried_on_another(lb, client, worker):
    address = worker[0].addresses["worker"]
    lb.put_route(tiny_route(worker, "flaky", endpoints=[
        Endpoint("gone-0", address),                    # the worker does not know it: NOT_FOUND
        Endpoint("chat-0", "127.0.0.1:9"),              # nothing listens there: UNAVAILABLE
        Endpoint("chat-1", address)]))
    for _ in range(3):
        assert chat(client, model="flaky").choices[0].message.content


def test_no_ready_replica_is_503_with_the_last_reason(lb, client, worker):
    lb.put_route(tiny_route(worker, "down", endpoints=[Endpoint("gone-0", worker[0].addresses["worker"])]))
    with pytest.raises(openai.InternalServerError) as e:
        chat(client, model="down")
    assert e.value.status_code == 503
    assert "'down' has no ready replica" in e.value.message and "gone-0" in e.value.message


def test_a_caller_that_goes_away_cancels_the_generation_on_the_replica(lb, worker):
    _, stub, _ = worker
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 2000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{lb.base_url}/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.monotonic() + 10
    while any(r.in_flight for r in stub.ListReplicas(worker_pb2.ListReplicasRequest()).replicas):
        assert time.monotonic() < deadline, "the generation went on after the caller left"
        time.sleep(0.05)


def test_a_caller_that_hangs_up_before_a_whole_answer_cancels_the_generation_on_the_replica(lb, client, worker):
    _, stub, _ = worker
    body = json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 2000, "temperature": 0,
                       "ignore_eos": True}).encode()
    address = httpx.URL(lb.base_url)

    def in_flight() -> int:
        return sum(r.in_flight for r in stub.ListReplicas(worker_pb2.ListReplicasRequest()).replicas)

    def calls_gone() -> int:  # calls the lb's audit log records as ended by their caller (499)
        log = lb.policy.audit_log
        return sum(json.loads(line)["status"] == 499 for line in log.read_text().splitlines()) if log.exists() else 0

    gone_before = calls_gone()

    with socket.create_connection((address.host, address.port), timeout=10) as caller:
        caller.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: lb\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not in_flight():
            assert time.monotonic() < deadline, "the call never reached the replica"
            time.sleep(0.05)
    hung_up = time.monotonic()
    while in_flight():
        assert time.monotonic() < hung_up + 10, "the generation went on after the caller hung up"
        time.sleep(0.05)
    while calls_gone() == gone_before:  # not a call that ran to its end: one cancelled by the hang-up
        assert time.monotonic() < hung_up + 10, "the lb did not record the call as ended by its caller"
        time.sleep(0.05)
    assert chat(client).choices[0].message.content  # the lb's call to the worker still serves the next ones


# -- gRPC ---------------------------------------------------------------------------------------

def test_the_same_methods_over_grpc_stream_and_not(lb, client):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(lb.grpc_address))
    request = inference_pb2.ChatCompletionRequest(
        model="tiny", messages=[inference_pb2.ChatMessage(role="user", content="Hello there")],
        sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=8))
    whole = stub.ChatCompletion(request, timeout=30)
    assert whole.choices[0].message.content == chat(client).choices[0].message.content
    chunks = list(stub.StreamChatCompletion(request, timeout=30))
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "tiny" in [m.id for m in stub.ListModels(inference_pb2.ListModelsRequest()).data]
    with pytest.raises(grpc.RpcError) as e:
        stub.ChatCompletion(inference_pb2.ChatCompletionRequest(model="nosuch", messages=request.messages))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_lb_role_of_clowderd_serves_http_and_grpc(clowderd):
    controller = clowderd(roles=("controller",))
    proc = start_node(clowderd, controller, "lb-1", ("lb",))
    base = f"http://{proc.config['lb']['http_listen']}/v1"
    assert httpx.get(f"{base}/models", timeout=10).json() == {"object": "list", "data": []}
    r = httpx.post(f"{base}/chat/completions", json={"model": "m", "messages": QUESTION}, timeout=10)
    assert r.status_code == 404 and "'m'" in r.json()["error"]["message"]
    stub = inference_pb2_grpc.InferenceStub(proc.channel("lb"))
    with pytest.raises(grpc.RpcError) as e:
        stub.ChatCompletion(inference_pb2.ChatCompletionRequest(
            model="m", messages=[inference_pb2.ChatMessage(role="user", content="hi")]), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert proc.stop() == 0
    assert proc.identity().holder.roles == ("lb",)


# -- HTTPS --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("lb-tls"))


def trusting(base_url: str, ca: Path | None) -> openai.OpenAI:
    """The official client, trusting `ca` alone (None: the system's CAs)."""
    verify = ssl.create_default_context(cafile=str(ca)) if ca else True
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                         http_client=httpx.Client(verify=verify, timeout=30))


def test_https_answers_a_client_that_trusts_the_ca_and_no_other(worker, tls, tmp_path_factory):
    server = LbServer(tmp_path_factory.mktemp("lb-https"), tls=tls)
    try:
        server.put_route(tiny_route(worker))
        assert server.base_url.startswith("https://")
        assert chat(trusting(server.base_url, tls.ca)).choices[0].message.content
        with pytest.raises(openai.APIConnectionError) as e:
            chat(trusting(server.base_url, None))
        assert "CERTIFICATE_VERIFY_FAILED" in repr(e.value.__cause__)
    finally:
        server.stop()


def test_the_lb_role_of_clowderd_serves_https_with_its_tls_settings(clowderd, tls):
    controller = clowderd(roles=("controller",))
    proc = start_node(clowderd, controller, "lb-1", ("lb",), lb={"tls_cert": str(tls.cert), "tls_key": str(tls.key)})
    base = f"https://{proc.config['lb']['http_listen']}/v1"
    assert trusting(base, tls.ca).models.list().data == []
    with pytest.raises(openai.APIConnectionError) as e:
        trusting(base, None).models.list()
    assert "CERTIFICATE_VERIFY_FAILED" in repr(e.value.__cause__)
    # Its gRPC Inference service presents the same certificate.
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())
    with grpc.secure_channel(proc.addresses["lb"], credentials) as channel:
        assert list(inference_pb2_grpc.InferenceStub(channel).ListModels(
            inference_pb2.ListModelsRequest(), timeout=10).data) == []
    assert proc.stop() == 0


# -- middleware through the lb ------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(worker, client, tmp_path_factory):
    """An lb with API keys (alice in 'research', bob in no group), serving 'tiny' as it is and four
    deployments of it with configured middleware; and the words of the plain greedy answer."""
    workdir = tmp_path_factory.mktemp("lb-guarded")
    keys = workdir / "keys.toml"
    keys.write_text(f'[users.alice]\ngroups = ["research"]\nkeys = ["{key_digest("ck-alice")}"]\n'
                    f'[users.bob]\nkeys = ["{key_digest("ck-bob")}"]\n')
    answer = chat(client).choices[0].message.content
    words = [w for w in re.findall(r"\w+", answer) if len(w) > 1]
    assert len(words) >= 2, f"the tiny model's answer {answer!r} has too few words for these tests"
    server = LbServer(workdir, keys_file=keys)
    configs = {"tiny": {}, "research-only": {"access_groups": ["research"]},
               "redacting": {"filters": {"output": {"redact": [words[0]], "replacement": "###"}}},
               "blocking": {"filters": {"output": {"block": [words[1]]}}},
               "screening": {"filters": {"input": {"block": ["forbidden"]}}},
               "briefed": {"prompts": {"system": "You are a terse assistant."}, "security": {"max_input_bytes": 50}},
               "chatty": {"conversation": {"enabled": True, "max_messages": 4}},
               "summarising": {"conversation": {"enabled": True, "max_messages": 2, "policy": "summarise"}}}
    for name, config in configs.items():
        server.put_route(tiny_route(worker, name, config))
    yield server, answer, words
    server.stop()


def keyed(server, key: str | None):
    return openai.OpenAI(base_url=server.base_url, api_key=key or "", max_retries=0)


def test_an_lb_with_keys_refuses_callers_without_a_valid_one(guarded):
    server, _, _ = guarded
    with pytest.raises(openai.AuthenticationError) as e:
        chat(keyed(server, "ck-nobody"))
    assert "not valid" in e.value.message
    r = httpx.post(f"{server.base_url}/chat/completions", json={"model": "tiny", "messages": QUESTION}, timeout=10)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    assert chat(keyed(server, "ck-bob")).choices[0].message.content


def test_access_groups_admit_members_only(guarded):
    server, answer, _ = guarded
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(keyed(server, "ck-bob"), model="research-only")
    assert "research" in e.value.message and "'bob'" in e.value.message
    assert chat(keyed(server, "ck-alice"), model="research-only").choices[0].message.content == answer


def test_models_need_a_valid_key_and_list_only_what_the_caller_may_call(guarded):
    server, _, _ = guarded
    r = httpx.get(f"{server.base_url}/models", timeout=10)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        keyed(server, "ck-nobody").models.list()
    assert "not valid" in e.value.message
    everything = {"tiny", "research-only", "redacting", "blocking", "screening", "briefed", "chatty", "summarising"}
    assert {m.id for m in keyed(server, "ck-alice").models.list().data} == everything
    assert {m.id for m in keyed(server, "ck-bob").models.list().data} == everything - {"research-only"}
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(server.grpc_address))
    with pytest.raises(grpc.RpcError) as e:
        stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = stub.ListModels(inference_pb2.ListModelsRequest(), metadata=[("authorization", "Bearer ck-bob")],
                             timeout=10)
    assert {m.id for m in listed.data} == everything - {"research-only"}


def test_without_keys_a_deployment_restricted_to_groups_is_not_listed(lb, client, worker):
    lb.put_route(tiny_route(worker, "members-only", {"access_groups": ["research"]}))
    listed = {m.id for m in client.models.list().data}
    assert "tiny" in listed and "members-only" not in listed
    with pytest.raises(openai.PermissionDeniedError):  # as calling it is refused
        chat(client, model="members-only")


def whole_word(word: str) -> str:
    """A filter rule's matches in ASCII text: the whole word, or with -s or -es."""
    return rf"(?<!\w){re.escape(word)}(?:s|es)?(?!\w)"


def test_output_words_are_redacted_in_whole_and_streamed_answers(guarded):
    server, answer, words = guarded
    alice = keyed(server, "ck-alice")
    expected = re.sub(whole_word(words[0]), "###", answer, flags=re.IGNORECASE)
    assert chat(alice, model="redacting").choices[0].message.content == expected
    streamed = chat(alice, model="redacting", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_a_blocked_output_word_ends_the_answer_before_it_with_content_filter(guarded):
    server, answer, words = guarded
    response = chat(keyed(server, "ck-alice"), model="blocking")
    hit = re.search(whole_word(words[1]), answer, flags=re.IGNORECASE)
    assert response.choices[0].finish_reason == "content_filter"
    assert response.choices[0].message.content == answer[:hit.start()]


@pytest.mark.parametrize("message, field", [
    ({"role": "user", "content": "Is for\u200bbidden fruit sweet?"}, "messages[0].content"),
    ({"role": "user", "content": "Hi", "name": "ＦＯＲＢＩＤＤＥＮ"}, "messages[0].name"),
    ({"role": "user", "content": [{"type": "text", "text": "All "}, {"type": "text", "text": "Forbiddens"}]},
     "messages[0].content"),
])
def test_a_blocked_input_word_is_refused_however_it_is_written(guarded, message, field):
    server, _, _ = guarded
    with pytest.raises(openai.BadRequestError) as e:
        chat(keyed(server, "ck-alice"), model="screening", messages=[message])
    assert f"input-filter: {field}: the input contains the blocked word" in e.value.message
    assert chat(keyed(server, "ck-alice"), model="screening").choices[0].message.content


def test_the_system_prompt_is_prepended_and_the_input_limit_enforced(guarded, client):
    server, _, _ = guarded
    alice = keyed(server, "ck-alice")
    plain = chat(alice).usage.prompt_tokens
    assert chat(alice, model="briefed").usage.prompt_tokens > plain
    with pytest.raises(openai.APIStatusError) as e:
        chat(alice, model="briefed", messages=[{"role": "user", "content": "y" * 60}])
    assert e.value.status_code == 413 and "max_input_bytes" in e.value.message


def converse(client, model: str, content: str, conversation_id: str | None = None):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=6,
        metadata={"conversation_id": conversation_id} if conversation_id else None)
    return raw.headers["x-clowder-conversation-id"], raw.parse()


def test_a_conversation_puts_the_earlier_messages_back_and_trims_the_oldest(guarded):
    server, _, _ = guarded
    alice = keyed(server, "ck-alice")
    conversation_id, first = converse(alice, "chatty", "Hello there")
    assert conversation_id.startswith("conv-")
    history = [{"role": "user", "content": "Hello there"},
               {"role": "assistant", "content": first.choices[0].message.content}]
    for content in ("And then?", "Why so?", "Tell me more"):
        same_id, reply = converse(alice, "chatty", content, conversation_id)
        assert same_id == conversation_id
        kept = history[-4:]  # max_messages
        explicit = chat(alice, model="tiny", messages=kept + [{"role": "user", "content": content}], max_tokens=6)
        assert reply.usage.prompt_tokens == explicit.usage.prompt_tokens
        assert reply.choices[0].message.content == explicit.choices[0].message.content
        history += [{"role": "user", "content": content},
                    {"role": "assistant", "content": reply.choices[0].message.content}]


def test_a_conversation_is_its_starters_alone(guarded):
    server, _, _ = guarded
    conversation_id, _ = converse(keyed(server, "ck-alice"), "chatty", "Hello there")
    with pytest.raises(openai.NotFoundError) as e:
        converse(keyed(server, "ck-bob"), "chatty", "Hi", conversation_id)
    assert conversation_id in e.value.message
    with pytest.raises(openai.BadRequestError):
        converse(keyed(server, "ck-alice"), "chatty", "Hi", "no spaces allowed")


def test_summarise_replaces_what_no_longer_fits_by_the_models_summary(guarded):
    server, _, _ = guarded
    alice = keyed(server, "ck-alice")
    conversation_id, _ = converse(alice, "summarising", "Hello there")
    converse(alice, "summarising", "And then?", conversation_id)
    converse(alice, "summarising", "Why so?", conversation_id)
    db = sqlite3.connect(server.policy.data_dir / "conversations.sqlite")
    summary, messages = db.execute("SELECT summary, messages FROM conversations WHERE id = ?",
                                   (conversation_id,)).fetchone()
    assert summary  # written by the model from the two oldest messages
    assert [m["content"] for m in json.loads(messages) if m["role"] == "user"] == ["And then?", "Why so?"]
