"""push and pull against a real OCI registry (Debian's docker-registry, CNCF distribution 2.8)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests import modelgen, registry_proc
from tests.clowderd_proc import REPO_ROOT

pytestmark = pytest.mark.skipif(not shutil.which(registry_proc.BINARY), reason="docker-registry is not installed")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = registry_proc.RegistryProcess(tmp_path_factory.mktemp("registry"))
    reg.wait_ready()
    yield reg
    reg.stop()


def ctl(data_dir, *args, env=None, input=None, preexec_fn=None):
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_CONFIG_HOME": str(data_dir / "xdg"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "clowderctl.main", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, env=full_env, input=input, cwd=REPO_ROOT, timeout=120,
                          preexec_fn=preexec_fn)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one line a failed clowderctl command printed: exit status 1, no traceback."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def build_tiny(data_dir, model_dir, tag="tiny:v1"):
    (model_dir.parent / "Clowderfile").write_text(f"base: {model_dir}\n")
    r = ctl(data_dir, "build", "-q", "-f", str(model_dir.parent / "Clowderfile"), "-t", tag)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_push_then_pull_gives_byte_identical_manifest_and_blobs(registry, tmp_path, tiny_llama):
    src, dst = tmp_path / "src", tmp_path / "dst"
    digest = build_tiny(src, tiny_llama)
    dest = f"{registry.host}/models/tiny:v1"
    r = ctl(src, "push", "-q", "tiny:v1", dest)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest

    remote = httpx.get(f"http://{registry.host}/v2/models/tiny/manifests/v1",
                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert "sha256:" + hashlib.sha256(remote.content).hexdigest() == digest

    r = ctl(dst, "pull", "-o", "json", dest)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["digest"] == digest and result["name"] == dest
    registry_proc.assert_same_image(registry, dst, "models/tiny", "v1", digest)
    images = ctl(dst, "images", "-o", "json")
    assert dest in [row["name"] for row in json.loads(images.stdout)]


def test_pulled_layers_keep_the_chunk_index_a_local_build_gives(registry, tmp_path, tiny_llama):
    from clowderd.store.content import ContentStore

    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tiny(src, tiny_llama)
    dest = f"{registry.host}/chunks/tiny:v1"
    assert ctl(src, "push", "-q", "tiny:v1", dest).returncode == 0
    assert ctl(dst, "pull", "-q", dest).returncode == 0
    a, b = ContentStore(src / "store"), ContentStore(dst / "store")
    try:
        for blob in b.blobs():
            assert b.chunk_index(blob.digest) == a.chunk_index(blob.digest)
    finally:
        a.close()
        b.close()


def test_a_second_push_uploads_nothing_and_another_repository_mounts(registry, tmp_path, tiny_llama):
    src = tmp_path / "src"
    build_tiny(src, tiny_llama)
    assert ctl(src, "push", "-q", "tiny:v1", f"{registry.host}/a/tiny:v1").returncode == 0
    again = ctl(src, "push", "tiny:v1", f"{registry.host}/a/tiny:v1")
    assert again.returncode == 0 and "0 of 4 blobs uploaded" in again.stdout, again.stdout
    other = ctl(src, "push", "tiny:v1", f"{registry.host}/b/tiny:v1")
    assert other.returncode == 0 and "0 of 4 blobs uploaded" in other.stdout and "4 mounted" in other.stdout, other.stdout


def test_a_big_blob_is_pushed_in_chunks_and_pulled_back_whole(registry, tmp_path, monkeypatch):
    from clowderd.distribution import oci_client

    model = modelgen.write_llama(tmp_path / "m" / "model", hidden_size=256, intermediate_size=512, num_layers=2,
                                 num_heads=4, num_kv_heads=2, vocab_size=4096)
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tiny(src, model, "mid:v1")
    dest = f"{registry.host}/mid:v1"
    # 1 MiB uploads so that the ~4 MB weights take several PATCH requests.
    monkeypatch.setattr(oci_client, "MONOLITHIC_MAX", 1 << 20)
    monkeypatch.setattr(oci_client, "UPLOAD_CHUNK", 1 << 20)
    from clowderd.distribution.push import push
    from clowderd.distribution.pull import pull
    from clowderd.distribution.refs import parse_remote
    from clowderd.store.content import ContentStore

    s = ContentStore(src / "store")
    try:
        result = push(s, "mid:v1", parse_remote(dest))
    finally:
        s.close()
    assert result.uploaded_bytes > 3 << 20
    d = ContentStore(dst / "store")
    try:
        pulled = pull(d, parse_remote(dest))
        assert pulled.digest == result.digest
        weights = (model / "model.safetensors").read_bytes()
        digest = "sha256:" + hashlib.sha256(weights).hexdigest()
        assert d.path(digest).read_bytes() == weights
    finally:
        d.close()


def test_an_interrupted_download_continues_from_the_partial_file(registry, tmp_path, tiny_llama):
    from clowderd.distribution.pull import oci_ingest_ref, pull
    from clowderd.distribution.refs import parse_remote
    from clowderd.store.content import ContentStore

    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tiny(src, tiny_llama)
    dest = f"{registry.host}/resume/tiny:v1"
    assert ctl(src, "push", "-q", "tiny:v1", dest).returncode == 0
    weights = (tiny_llama / "model.safetensors").read_bytes()
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    d = ContentStore(dst / "store")
    try:
        half = len(weights) // 2
        with d.writer(oci_ingest_ref(digest)) as ingest:  # as a pull broken off half way left it
            ingest.write(weights[:half])
        result = pull(d, parse_remote(dest))
        assert result.resumed_bytes == half
        assert d.path(digest).read_bytes() == weights
    finally:
        d.close()


@pytest.mark.parametrize("ref, message", [
    ("tiny:v1", "names no registry"),
    ("127.0.0.1:1/Bad:v1", "lowercase"),
    ("ftp://host/x:1", "unknown scheme"),
])
def test_bad_references_are_refused_with_a_clear_error(tmp_path, ref, message):
    r = ctl(tmp_path / "d", "pull", ref)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr


def test_an_unknown_image_is_a_clear_error(registry, tmp_path):
    r = ctl(tmp_path / "d", "pull", f"{registry.host}/nothing/here:v9")
    assert r.returncode == 1
    assert "404" in r.stderr and "Traceback" not in r.stderr


def test_an_unreachable_registry_is_a_clear_error(tmp_path):
    from tests.clowderd_proc import free_port

    r = ctl(tmp_path / "d", "pull", f"127.0.0.1:{free_port()}/x:v1")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_login_stores_credentials_0600_and_logout_removes_them(registry, tmp_path):
    r = ctl(tmp_path / "d", "logout", registry.host)
    assert r.returncode == 1 and "not logged in" in r.stderr
    r = ctl(tmp_path / "d", "login", "-u", "me", "--password-stdin", registry.host, input="secret\n")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "d" / "xdg" / "clowder" / "auth.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert registry.host in json.loads(path.read_text())["auths"]
    assert ctl(tmp_path / "d", "logout", registry.host).returncode == 0
    assert registry.host not in json.loads(path.read_text())["auths"]
