"""Fuzzing the lb's OpenAI-compatible HTTP API: valid and nearly valid bodies, wrong types, huge numbers,
odd Unicode (lone surrogates, invisible and fullwidth characters), deep nesting, raw bytes, wrong content
types, odd methods and paths, streamed and not, against a real lb in front of a worker serving a tiny
llama. Every answer is a success or an error in OpenAI's JSON with a message, never a 500, and the lb
still answers afterwards. `-m slow` runs many more cases."""
from __future__ import annotations

import json
import string

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_fixtures import Cases, fuzz_client
from tests.lb_fixtures import LbServer, tiny_route, worker  # noqa: F401  (fixture: a worker serving a tiny chat llama)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
MANY = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
cases = Cases()

ODD_TEXT = ["", "Hello there", "\ud800", "a\udfffb", "\u200b\u200d\ufeff", "ｆｕｌｌｗｉｄｔｈ", "\x00", "e\u0301",
            "\U0001f600" * 3, "\u202eevil", "x" * 5000, "ß", "İ", "\n\r\t"]
texts = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=30))
huge = st.sampled_from([10 ** 12, 2 ** 32, 2 ** 31, 2 ** 63, 2 ** 64, -1, -(2 ** 63) - 1, 10 ** 400, 0, 1e308,
                        float("inf"), float("nan"), -0.0, 1e-320])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), huge, st.floats(allow_nan=True), texts)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=12)
ROLES = ["system", "developer", "user", "assistant", "tool", "king", "", "USER"]
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.one_of(
    texts, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=2),
    json_values)}, optional={"name": texts, "tool_calls": json_values}), max_size=3)
FIELDS = {  # each field of a request, with the values a client might send, right or wrong
    "max_tokens": st.one_of(st.integers(1, 3), huge, scalars), "max_completion_tokens": st.one_of(st.integers(1, 3), huge),
    "temperature": st.one_of(st.floats(0, 2), huge, scalars), "top_p": st.one_of(st.floats(0, 1), huge, scalars),
    "top_k": st.one_of(st.integers(0, 50), huge), "n": st.one_of(st.integers(1, 2), huge, scalars),
    "seed": st.one_of(st.integers(0, 2 ** 63 - 1), huge, scalars), "stop": st.one_of(texts, st.lists(texts, max_size=6)),
    "stream": st.one_of(st.booleans(), scalars), "stream_options": st.one_of(
        st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), scalars)}), json_values),
    "presence_penalty": st.one_of(st.floats(-2, 2), huge), "frequency_penalty": st.one_of(st.just(0), huge),
    "repetition_penalty": st.one_of(st.just(1), huge), "user": texts, "echo": st.one_of(st.booleans(), scalars),
    "metadata": st.one_of(st.dictionaries(texts, texts, max_size=3), json_values), "logprobs": scalars,
    "tools": st.one_of(st.just([]), json_values), "response_format": st.one_of(st.just({"type": "text"}), json_values),
    "ignore_eos": st.one_of(st.booleans(), scalars), "prompt": st.one_of(texts, st.lists(texts, max_size=2), json_values),
    "extra_field": json_values,
}
requests = st.fixed_dictionaries(
    {"model": st.one_of(st.just("tiny"), texts, scalars), "messages": st.one_of(messages, json_values)},
    optional=FIELDS)


def deep(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + \
        b"[" * depth + b"]" * depth + b"}"


def capped(request: dict) -> dict:
    """A request that asks for at most a few tokens unless it sets a limit itself: the tiny model left
    alone would generate up to its context."""
    return request if "max_tokens" in request or "max_completion_tokens" in request else {**request, "max_tokens": 2}


bodies = st.one_of(
    requests.map(lambda r: json.dumps(capped(r)).encode()),
    st.builds(deep, st.sampled_from([1, 31, 32, 33, 500, 5000, 100_000])),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100),
    requests.map(lambda r: json.dumps(capped(r)).encode()[:-3]),  # cut short
    st.sampled_from([b"", b"null", b"\xff\xfe{}", json.dumps({"a": 1}).encode("utf-16"), b"{" * 3000, b"1e999999",
                     b'{"model": "tiny", "messages": [], "max_tokens": 1' + b"0" * 5000 + b"}"]),
)
content_types = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain",
                                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""])
paths = st.one_of(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/tiny",
                                   "/v1/embeddings", "/", "/v1", "//v1//chat/completions", "/v1/chat/completions/",
                                   "/v1/%00", "/v1/chat%2Fcompletions", "/health", "/v1/" + "x" * 5000, "/v1/é"]),
                  st.text(alphabet=string.ascii_letters + string.digits + "/._-%~", max_size=40).map(lambda p: "/" + p))
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND"])


@pytest.fixture(scope="module")
def lb(worker, tmp_path_factory):
    server = LbServer(tmp_path_factory.mktemp("lb-fuzz"))
    server.put_route(tiny_route(worker))
    server.put_route(tiny_route(worker, "filtered", {"filters": {"input": {"block": ["bad"]},
                                                                  "output": {"redact": [{"word": "e", "match": "substring"}]}},
                                                     "security": {"max_input_bytes": 200}}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(lb, request):
    with fuzz_client(request, f"http://127.0.0.1:{lb.http_port}", "OpenAI", cases, timeout=60) as c:
        yield c


def check(r: httpx.Response) -> httpx.Response:
    """No 500, and every error in OpenAI's JSON with a message, also one sent inside a stream."""
    cases.count += 1
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:500])
    if r.status_code >= 400 and r.request.method != "HEAD":  # a HEAD answer has no body
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in r.text.split("\n") if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        for line in lines[:-1]:
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event or event["error"]["message"], event
    return r


def post(client: httpx.Client, path: str, body: bytes, content_type: str | None) -> httpx.Response:
    headers = {"content-type": content_type} if content_type is not None else {}
    return check(client.post(path, content=body, headers=headers))


def fuzz_bodies(client, path, body, content_type):
    post(client, path, body, content_type)


def fuzz_methods_and_paths(client, method, path, body):
    check(client.request(method, path, content=body))


strategies_bodies = dict(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=bodies,
                         content_type=content_types)
strategies_paths = dict(method=methods, path=paths, body=st.one_of(st.just(b""), bodies))
test_request_bodies_get_answers_or_openai_errors = FAST(given(**strategies_bodies)(fuzz_bodies))
test_methods_and_paths_get_answers_or_openai_errors = FAST(given(**strategies_paths)(fuzz_methods_and_paths))
test_many_request_bodies = pytest.mark.slow(MANY(given(**strategies_bodies)(fuzz_bodies)))
test_many_methods_and_paths = pytest.mark.slow(MANY(given(**strategies_paths)(fuzz_methods_and_paths)))


@FAST
@given(body=requests.map(lambda r: capped({**r, "model": "filtered"})))
def test_a_deployment_with_middleware_answers_or_refuses_in_openai_json(client, body):
    post(client, "/v1/chat/completions", json.dumps(body).encode(), "application/json")


def test_the_lb_still_answers_after_the_fuzzing(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "Hello there"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
