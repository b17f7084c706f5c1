"""A blob transfer that the connection breaks off in the middle (closed early, reset) is one clear
error line from clowderctl, and a pull keeps what arrived and resumes from there the next time.

The registry here is a small real HTTP server in a thread (one manifest, two blobs), because a
real registry cannot be made to drop a connection half way through a body on cue; clowderctl runs
as a subprocess against it, nothing is mocked."""
from __future__ import annotations

import fcntl
import hashlib
import http.server
import json
import re
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from clowderd.distribution.pull import oci_ingest_ref
from clowderd.store.content import ContentStore
from tests.store_fixtures import fill
from tests.test_distribution_oci import build_tiny, ctl, error_line

REPO = "models/tiny"
CONFIG = b"{}"
LAYER = bytes(range(256)) * 1024  # 256 KiB, not a whole number of any read size
SENT = 100_003  # what a broken GET sends of LAYER's body before the connection goes


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


MANIFEST = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": _digest(CONFIG), "size": len(CONFIG)},
    "layers": [{"mediaType": "application/octet-stream", "digest": _digest(LAYER), "size": len(LAYER)}],
}).encode()
BLOBS = {_digest(CONFIG): CONFIG, _digest(LAYER): LAYER}
CORRUPT_LAYER = LAYER[:SENT] + bytes([LAYER[SENT] ^ 0xFF]) + LAYER[SENT + 1:]  # what a bad disk or proxy serves


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def handle(self) -> None:
        try:
            first = self.request.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first == b"\x16":  # the client's TLS probe (a ClientHello): this registry speaks plain HTTP
            return
        super().handle()

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_POST(self) -> None:  # an upload session
        fake = self.server.fake
        fake.requests.append((self.command, self.path, None))
        if not re.fullmatch(r"/v2/[a-z0-9/]+/blobs/uploads/", self.path):
            return self._send(404, b"{}", {"Content-Type": "application/json"}, True)
        self.send_response(202)
        self.send_header("Location", f"{self.path}{len(fake.requests)}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:  # a monolithic blob upload (?digest=) or a manifest
        fake = self.server.fake
        fake.requests.append((self.command, self.path, None))
        length = int(self.headers.get("Content-Length") or 0)
        if fake.break_off and length > SENT:
            fake.received.append(self.rfile.read(SENT))
            self.close_connection = True
            if fake.break_off == "reset":
                self.server.to_reset.add(self.request)
            return
        content = self.rfile.read(length)
        if m := re.search(r"[?&]digest=(sha256(?::|%3A)[0-9a-f]{64})", self.path):
            digest = m.group(1).replace("%3A", ":")
            if _digest(content) != digest:
                return self._send(400, b'{"errors": [{"code": "DIGEST_INVALID"}]}', {}, True)
            fake.uploaded[digest] = content
        else:
            fake.uploaded[self.path] = content
        self._send(201, b"", {"Docker-Content-Digest": _digest(content)}, True)

    def _answer(self, body: bool) -> None:
        fake = self.server.fake
        fake.requests.append((self.command, self.path, self.headers.get("Range")))
        if fake.token_answer is not None:
            if self.path.startswith("/token"):
                content_type, content = fake.token_answer
                return self._send(200, content, {"Content-Type": content_type}, body)
            if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                return self._send(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}', {
                    "Content-Type": "application/json",
                    "WWW-Authenticate": f'Bearer realm="http://{fake.host}/token",service="fake"'}, body)
        if self.path == "/v2/":
            return self._send(200, b"{}", {"Content-Type": "application/json"}, body)
        if self.path == f"/v2/{REPO}/manifests/v1":
            return self._send(200, MANIFEST, {"Content-Type": "application/vnd.oci.image.manifest.v1+json",
                                              "Docker-Content-Digest": _digest(MANIFEST)}, body)
        m = re.fullmatch(rf"/v2/{REPO}/blobs/(sha256:[0-9a-f]{{64}})", self.path)
        if not m or m.group(1) not in BLOBS:  # (blobs pushed here are only kept for the test to look at)
            return self._send(404, b'{"errors": [{"code": "BLOB_UNKNOWN", "message": "no such blob"}]}',
                              {"Content-Type": "application/json"}, body)
        data = BLOBS[m.group(1)]
        start = 0
        r = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if body and r and fake.serves_ranges:
            start = int(r.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if fake.serves_ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))  # all of it, even when breaking off
        self.end_headers()
        if not body:
            return
        if fake.corrupt and data is LAYER:
            self.wfile.write(CORRUPT_LAYER[start:])
            return
        if fake.break_off and data is LAYER:
            self.wfile.write(data[start:start + SENT])
            self.wfile.flush()
            self.close_connection = True
            if fake.break_off == "reset":
                _wait_acknowledged(self.request)
                self.server.to_reset.add(self.request)
            return
        if fake.midway is not None and data is LAYER:
            self.wfile.write(data[start:start + SENT])
            self.wfile.flush()
            fake.midway()
            start += SENT
        self.wfile.write(data[start:])

    def _send(self, status: int, content: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(content))}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(content)


def _wait_acknowledged(sock: socket.socket, timeout: float = 10.0) -> None:
    """Until the peer's kernel has everything sent (the send queue is empty), so that a reset
    cannot overtake the bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0] == 0:
            return
        time.sleep(0.01)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeRegistry):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake
        self.to_reset: set[socket.socket] = set()

    def shutdown_request(self, request) -> None:
        if request in self.to_reset:  # close with an RST, not a FIN
            self.to_reset.discard(request)
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close()
            return
        super().shutdown_request(request)


class FakeRegistry:
    """A plain-HTTP OCI registry that serves MANIFEST (models/tiny:v1) and BLOBS and takes
    monolithic uploads into `uploaded`. With break_off ("close" or "reset") a GET of LAYER sends
    its headers (the full Content-Length), SENT bytes of the body, and then closes or resets the
    connection; a PUT of more than SENT bytes reads SENT of them and does the same. midway() is
    called after SENT bytes of a GET of LAYER, before the rest. Without serves_ranges a GET ignores
    Range and no Accept-Ranges is sent. With token_answer (content type, body) every request wants a
    Bearer token and the token service, /token, answers that."""

    def __init__(self):
        self.break_off: str | None = None
        self.corrupt = False  # serve CORRUPT_LAYER for LAYER (same length, one byte flipped)
        self.midway: Callable[[], None] | None = None
        self.serves_ranges = True
        self.token_answer: tuple[str, bytes] | None = None
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.received: list[bytes] = []  # the bodies of broken-off uploads, as far as they came
        self.uploaded: dict[str, bytes] = {}  # blob digest (or manifest path) -> content pushed
        self._server = _Server(self)
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def blob_gets(self, digest: str) -> list[str | None]:
        """The Range header of each GET of blob digest, in order."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith(digest)]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def kept_bytes(data_dir, digest: str) -> bytes | None:
    """What an interrupted pull of blob digest left in the store for the next pull, if anything."""
    store = ContentStore(data_dir / "store")
    try:
        if store.ingest_status(oci_ingest_ref(digest)) is None:
            return None
        with store.writer(oci_ingest_ref(digest)) as ingest, ingest.reader() as f:
            return f.read()
    finally:
        store.close()


@pytest.fixture
def fake_registry() -> Iterator[FakeRegistry]:
    reg = FakeRegistry()
    yield reg
    reg.stop()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_blob_download_broken_off_mid_body_is_one_error_line_and_the_next_pull_resumes(fake_registry, tmp_path, how):
    data_dir = tmp_path / "d"
    ref = f"{fake_registry.host}/{REPO}:v1"
    layer = _digest(LAYER)

    fake_registry.break_off = how
    line = error_line(ctl(data_dir, "pull", "-q", ref))
    assert line.startswith(f"error: {fake_registry.host}: download of blob {layer} broke off after "
                           f"{SENT:,} of {len(LAYER):,} bytes"), line
    assert f"the {SENT:,} bytes that arrived are kept: run the same pull again to resume" in line
    assert kept_bytes(data_dir, layer) == LAYER[:SENT]
    assert fake_registry.blob_gets(layer) == [None]
    images = ctl(data_dir, "images", "-o", "json")
    assert images.returncode == 0 and ref not in [row["name"] for row in json.loads(images.stdout)]  # no name yet

    fake_registry.break_off = None
    r = ctl(data_dir, "pull", "-o", "json", ref)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert fake_registry.blob_gets(layer) == [None, f"bytes={SENT}-"]
    assert result["digest"] == _digest(MANIFEST) and result["name"] == ref
    assert (result["resumed_bytes"], result["fetched_bytes"]) == (SENT, len(LAYER) - SENT)
    assert kept_bytes(data_dir, layer) is None
    store = ContentStore(data_dir / "store")
    try:
        assert store.read_bytes(layer) == LAYER
        assert store.read_bytes(_digest(MANIFEST)) == MANIFEST
    finally:
        store.close()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_blob_upload_broken_off_mid_body_is_one_error_line_and_the_next_push_completes(
        fake_registry, tmp_path, tiny_llama, how):
    data_dir = tmp_path / "d"
    digest = build_tiny(data_dir, tiny_llama)
    weights = (tiny_llama / "model.safetensors").read_bytes()
    assert len(weights) > SENT
    dest = f"{fake_registry.host}/pushed/tiny:v1"

    fake_registry.break_off = how
    line = error_line(ctl(data_dir, "push", "-q", "tiny:v1", dest))
    assert re.fullmatch(rf"error: {re.escape(fake_registry.host)}: upload of blob {_digest(weights)} broke off "
                        rf"after [0-9,]+ of {len(weights):,} bytes \(.+\); run the same push again "
                        r"\(blobs the registry has by then are skipped\)", line), line
    assert fake_registry.received == [weights[:SENT]]
    assert _digest(weights) not in fake_registry.uploaded

    fake_registry.break_off = None
    r = ctl(data_dir, "push", "-q", "tiny:v1", dest)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest
    assert fake_registry.uploaded[_digest(weights)] == weights
    assert _digest(fake_registry.uploaded["/v2/pushed/tiny/manifests/v1"]) == digest


def test_a_blob_that_arrives_with_other_content_is_refused_and_nothing_of_it_is_kept(fake_registry, tmp_path):
    data_dir = tmp_path / "d"
    ref = f"{fake_registry.host}/{REPO}:v1"
    layer = _digest(LAYER)

    fake_registry.corrupt = True
    line = error_line(ctl(data_dir, "pull", "-q", ref))
    assert line.startswith(f"error: {fake_registry.host}/{REPO}: blob {layer} arrived with other content ("), line
    assert f"expected {layer}" in line and line.endswith("nothing of it was kept")
    store = ContentStore(data_dir / "store")
    try:
        assert store.ingest_statuses() == []
        assert not store.exists(layer) and not store.exists(_digest(MANIFEST))
    finally:
        store.close()

    fake_registry.corrupt = False
    r = ctl(data_dir, "pull", "-o", "json", ref)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_bytes"] == 0  # started over: the bad bytes were not resumed


def test_a_token_service_that_answers_other_than_json_is_one_error_line(fake_registry, tmp_path):
    fake_registry.token_answer = ("text/html", b"<html><body>\nSign in to continue</body></html>\n")
    line = error_line(ctl(tmp_path / "d", "pull", "-q", f"{fake_registry.host}/{REPO}:v1"))
    assert line == (f"error: {fake_registry.host}: token service http://{fake_registry.host}/token answered "
                        "with text/html, not a JSON token (it begins b'<html><body>\\nSign in to continue</body>"
                        "</html>\\n')")


@pytest.mark.parametrize("ranges", [True, False], ids=["registry-serves-ranges", "registry-ignores-ranges"])
def test_a_disk_that_fills_up_mid_blob_is_one_error_line_and_keeps_only_what_a_resume_can_use(
        fake_registry, small_fs, ranges):
    fs = small_fs(80 << 20)  # room for the store's 64 MiB reserve and the image, until another writer fills it
    data_dir = fs / "d"
    ContentStore(data_dir / "store").close()
    ref = f"{fake_registry.host}/{REPO}:v1"
    layer = _digest(LAYER)
    fake_registry.serves_ranges = ranges
    fake_registry.midway = lambda: fill(fs, leave=64 << 10)  # the disk fills while the layer arrives

    line = error_line(ctl(data_dir, "pull", "-q", ref))
    m = re.fullmatch(rf"error: {re.escape(fake_registry.host)}: download of blob {layer} stopped after ([0-9,]+) of "
                     rf"{len(LAYER):,} bytes: cannot write ingest {layer[7:]}\.oci in the store at "
                     rf"{re.escape(str(data_dir / 'store'))}: No space left on device; (.*)", line)
    assert m, line
    written = int(m.group(1).replace(",", ""))
    assert 0 < written < len(LAYER)
    if ranges:
        assert m.group(2) == f"the {written:,} bytes written are kept for the next pull to resume from"
        assert kept_bytes(data_dir, layer) == LAYER[:written]
    else:  # a pull would start over: the bytes would only keep the disk full
        assert m.group(2) == "nothing of it was kept (the registry does not serve byte ranges: a pull starts over)"
        assert kept_bytes(data_dir, layer) is None

    fake_registry.midway = None
    (fs / "filler").unlink()
    r = ctl(data_dir, "pull", "-o", "json", ref)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_bytes"] == (written if ranges else 0)
    assert fake_registry.blob_gets(layer)[-1] == (f"bytes={written}-" if ranges else None)
    store = ContentStore(data_dir / "store")
    try:
        assert store.read_bytes(layer) == LAYER and store.ingest_statuses() == []
    finally:
        store.close()
