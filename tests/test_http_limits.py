"""Every HTTP server of clowderd (the lb's OpenAI API and the storage role's OCI API, both served by
clowderd.httpserver) holds its clients to its limits: a request head that does not arrive in time, a body
that stalls and headers over the size limit are answered 408 or 431 and the connection is closed, while a
slow but live upload and a big legal one go through. Raw sockets against one real clowderd running both."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time

import httpx
import pytest

from clowderd.config import ConfigError, build_config
from tests.clowderd_proc import ClowderdProcess, _default_config, deep_merge

HEAD_S, BODY_S, MAX_HEADER = 1.0, 2.0, 16384
SLACK_S = 15.0  # how late a close may come on a busy machine
CHAT = b'{"model": "nosuch", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("http-limits")
    limits = {"http_header_timeout_seconds": HEAD_S, "http_body_timeout_seconds": BODY_S,
              "http_max_header_bytes": MAX_HEADER}
    roles = ("controller", "storage", "lb")  # an lb belongs to a cluster: this one has its controller beside it
    config = deep_merge(_default_config(workdir, roles), {"storage": limits, "lb": limits})
    proc = ClowderdProcess(workdir, config, roles)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0


def address(node, server: str) -> tuple[str, int]:
    host, port = node.config[server]["http_listen"].rsplit(":", 1)
    return host, int(port)


def upload_path(server: str, body: bytes) -> str:
    """Where a POST of `body` is a whole request: a chat call, or a monolithic blob upload."""
    if server == "lb":
        return "/v1/chat/completions"
    return f"/v2/limits/blobs/uploads/?digest=sha256:{hashlib.sha256(body).hexdigest()}"


def head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: test", *headers, "", ""]).encode()


def until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """What the server sent until it closed the connection, and how long that took from now."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - start


def dribble(sock: socket.socket, data: bytes, every_s: float) -> threading.Thread:
    """Send `data` a few bytes at a time, `every_s` apart, until done or the server closes."""
    def run():
        for i in range(0, len(data), 4):
            try:
                sock.sendall(data[i:i + 4])
            except OSError:
                return
            time.sleep(every_s)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head_part, _, body = answer.partition(b"\r\n\r\n")
    return int(head_part.split(b" ", 2)[1]), body


def assert_error(server: str, answer: bytes, status: int, words: str) -> None:
    """The status, and for the lb OpenAI's error JSON (clients parse it), naming what went wrong."""
    code, body = status_and_body(answer)
    assert code == status, answer[:500]
    message = json.loads(body)["error"]["message"] if server == "lb" else body.decode()
    assert words in message, message


@pytest.mark.parametrize("server", ["lb", "storage"])
@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"],
                         ids=["nothing", "half-a-head"])
def test_a_head_that_does_not_arrive_in_time_is_408_and_closed(node, server, sent):
    with socket.create_connection(address(node, server)) as sock:
        sock.sendall(sent)
        answer, seconds = until_closed(sock, HEAD_S + SLACK_S)
    assert HEAD_S - 0.1 <= seconds < HEAD_S + SLACK_S
    assert_error(server, answer, 408, f"did not arrive within {HEAD_S:g} s")


@pytest.mark.parametrize("server", ["lb", "storage"])
def test_the_head_timeout_holds_for_the_next_request_on_a_kept_alive_connection(node, server):
    first = head("GET", "/v1/models" if server == "lb" else "/v2/")
    with socket.create_connection(address(node, server)) as sock:
        sock.sendall(first + b"GET / HTTP/1.1\r\nHost")
        answer, seconds = until_closed(sock, HEAD_S + SLACK_S)
    assert seconds < HEAD_S + SLACK_S
    assert status_and_body(answer)[0] == 200
    assert_error(server, answer[answer.index(b"HTTP/1.1 408"):], 408, "did not arrive")


@pytest.mark.parametrize("server", ["lb", "storage"])
def test_a_head_sent_byte_by_byte_still_ends_at_the_head_timeout(node, server):
    with socket.create_connection(address(node, server)) as sock:
        start = time.monotonic()
        dribble(sock, head("GET", "/", *[f"X-Slow-{i}: {'v' * 20}" for i in range(200)]), 0.05)
        answer, _ = until_closed(sock, HEAD_S + SLACK_S)
        seconds = time.monotonic() - start
    assert HEAD_S - 0.1 <= seconds < HEAD_S + SLACK_S
    assert_error(server, answer, 408, "did not arrive")


@pytest.mark.parametrize("server", ["lb", "storage"])
def test_a_body_shorter_than_declared_is_408_and_closed_after_the_body_timeout(node, server):
    with socket.create_connection(address(node, server)) as sock:
        sock.sendall(head("POST", upload_path(server, b"x" * 100), "Content-Length: 100") + CHAT[:10])
        answer, seconds = until_closed(sock, BODY_S + SLACK_S)
    assert BODY_S - 0.1 <= seconds < BODY_S + SLACK_S
    assert_error(server, answer, 408, f"no byte of it for {BODY_S:g} s")


@pytest.mark.parametrize("server", ["lb", "storage"])
def test_a_slow_but_live_upload_is_not_cut(node, server):
    body = CHAT.replace(b'"hi"', b'"' + b"h" * 80 + b'"')
    every_s = 0.15
    assert len(body) / 4 * every_s > 2 * BODY_S  # the upload lasts well past the body timeout
    with socket.create_connection(address(node, server)) as sock:
        sock.sendall(head("POST", upload_path(server, body), "Content-Type: application/json",
                          f"Content-Length: {len(body)}"))
        dribble(sock, body, every_s).join()
        sock.settimeout(SLACK_S)
        answer = sock.recv(65536)
    if server == "lb":  # the whole body was read: the call got as far as looking up its model
        assert_error(server, answer, 404, "'nosuch'")
    else:
        assert status_and_body(answer)[0] == 201, answer


@pytest.mark.parametrize("server", ["lb", "storage"])
@pytest.mark.parametrize("headers", [[f"X-Big: {'b' * 100_000}"], [f"X-Many-{i}: {'m' * 1000}" for i in range(40)]],
                         ids=["one-100KB-header", "40-1KB-headers"])
def test_headers_over_the_limit_are_431_and_closed(node, server, headers):
    with socket.create_connection(address(node, server)) as sock:
        try:
            sock.sendall(head("GET", "/v1/models" if server == "lb" else "/v2/", *headers))
        except OSError:
            pass  # closed as soon as the limit was passed, before all was sent
        answer, _ = until_closed(sock, SLACK_S)
    assert_error(server, answer, 431, f"over this server's limit of {MAX_HEADER} bytes")


@pytest.mark.parametrize("server", ["lb", "storage"])
def test_a_request_that_is_not_http_is_400_in_the_apis_error_format_and_closed(node, server):
    with socket.create_connection(address(node, server)) as sock:
        sock.sendall(b"G\x01T / HTTP/1.1\r\nHost: test\r\n\r\n")
        answer, _ = until_closed(sock, SLACK_S)
    assert_error(server, answer, 400, "invalid HTTP request")


@pytest.mark.parametrize("server", ["lb", "storage"])
def test_headers_under_the_limit_are_served(node, server):
    host, port = address(node, server)
    path = "/v1/models" if server == "lb" else "/v2/"
    r = httpx.get(f"http://{host}:{port}{path}", headers={"Authorization": "Bearer " + "k" * 12_000}, timeout=30)
    assert r.status_code in (200, 401) and r.headers["content-type"].startswith("application/json")


def test_a_big_upload_to_the_oci_api_goes_through(node):
    host, port = address(node, "storage")
    blob = os.urandom(48 << 20)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=120) as client:
        r = client.post("/v2/limits/big/blobs/uploads/", params={"digest": digest}, content=blob)
        assert r.status_code == 201, r.text
        assert int(client.head(f"/v2/limits/big/blobs/{digest}").headers["content-length"]) == len(blob)


@pytest.mark.parametrize("key, value, words", [
    ("lb.http_header_timeout_seconds", 0, "expected a number of seconds from 0.1 to 3600"),
    ("storage.http_body_timeout_seconds", "60", "expected a number of seconds"),
    ("lb.http_max_header_bytes", 100, "expected a number of bytes from 1024 to 1048576"),
])
def test_limit_settings_are_checked_naming_the_key(tmp_path, key, value, words):
    section, name = key.split(".")
    path = tmp_path / "clowderd.toml"
    path.write_text(f"[{section}]\n{name} = {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as e:
        build_config(str(path), {})
    assert str(e.value).startswith(f"{path}: {key}: {words}")
    limits = build_config(None, {}).lb_http.limits
    assert (limits.header_timeout_seconds, limits.body_timeout_seconds, limits.max_header_bytes) == (20, 60, 32768)
