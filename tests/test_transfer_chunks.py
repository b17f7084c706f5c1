"""Chunk-aware pulls between two real clowderd storage nodes (clowder://HOST:PORT/repo:tag)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clowderd.aimage.build import build
from clowderd.aimage.clowderfile import load_clowderfile
from clowderd.store.content import ContentStore
from tests import modelgen
from tests.clowderd_proc import REPO_ROOT

MID = dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=4096)


def ctl(data_dir, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "clowderctl.main", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def pull_json(data_dir, ref, *extra):
    r = ctl(data_dir, "pull", "-o", "json", *extra, ref)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def build_into(data_dir, model_dir, tag):
    cf = model_dir.parent / f"{model_dir.name}.Clowderfile"
    cf.write_text(f"base: {model_dir}\n")
    store = ContentStore(data_dir / "store")
    try:
        return build(store, load_clowderfile(cf), tag).manifest_digest
    finally:
        store.close()


@pytest.fixture
def nodes(clowderd):
    """Two storage nodes with their own data dirs: (source, destination)."""
    return clowderd(roles=("storage",)), clowderd(roles=("storage",))


def url(node, name):
    return f"clowder://{node.addresses['storage']}/{name}"


def blob_bytes(data_dir):
    store = ContentStore(data_dir / "store")
    try:
        return {b.digest: store.read_bytes(b.digest) for b in store.blobs()}, \
               {b.digest: store.chunk_index(b.digest) for b in store.blobs()}
    finally:
        store.close()


def test_a_pull_between_nodes_copies_every_blob_and_its_chunk_index(nodes, tiny_llama):
    src, dst = nodes
    digest = build_into(src.data_dir, tiny_llama, "tiny:v1")
    result = pull_json(dst.data_dir, url(src, "tiny:v1"))
    assert result["digest"] == digest
    assert result["name"] == f"{src.addresses['storage']}/tiny:v1"
    assert result["fetched_bytes"] == result["pulled_bytes"]  # nothing was here before
    (a_bytes, a_index), (b_bytes, b_index) = blob_bytes(src.data_dir), blob_bytes(dst.data_dir)
    assert a_bytes == b_bytes and a_index == b_index
    images = json.loads(ctl(dst.data_dir, "images", "-o", "json").stdout)
    assert result["name"] in [row["name"] for row in images]
    again = pull_json(dst.data_dir, url(src, "tiny:v1"))
    assert again["pulled_blobs"] == 0 and again["fetched_bytes"] == 0


def test_pulling_a_variant_onto_a_node_with_the_base_receives_only_changed_chunks(nodes, tmp_path):
    src, dst = nodes
    base = modelgen.write_llama(tmp_path / "base", **MID)
    modelgen.write_variant(base, tmp_path / "variant", change_fraction=0.1)
    build_into(src.data_dir, base, "mid:base")
    build_into(src.data_dir, tmp_path / "variant", "mid:ft")
    pull_json(dst.data_dir, url(src, "mid:base"))
    result = pull_json(dst.data_dir, url(src, "mid:ft"))
    variant_size = (tmp_path / "variant" / "model.safetensors").stat().st_size
    assert result["fetched_bytes"] <= 0.2 * variant_size, result
    assert result["local_bytes"] >= 0.75 * variant_size, result


def test_a_pull_killed_half_way_resumes_where_it_stopped(nodes, tmp_path):
    src, dst = nodes
    model = modelgen.write_llama(tmp_path / "m", **MID)
    digest = build_into(src.data_dir, model, "mid:v1")
    size = (model / "model.safetensors").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "clowderctl.main", "--data-dir", str(dst.data_dir), "pull", "-q",
                             "--streams", "1", "--limit-rate", str(size // 4), url(src, "mid:v1")],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        journals = list((dst.data_dir / "store" / "partial").glob("*.chunks.done"))
        if journals and sum(journals[0].read_bytes()[40:]) > 0.3 * (journals[0].stat().st_size - 40):
            journal = journals[0]
            break
        time.sleep(0.05)
    assert journal is not None, "the pull made no progress"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = journal.read_bytes()[40:]
    assert 0 < sum(done) < len(done)
    result = pull_json(dst.data_dir, url(src, "mid:v1"))
    assert result["digest"] == digest
    assert result["resumed_bytes"] > 0.25 * size
    assert result["fetched_bytes"] + result["resumed_bytes"] <= size * 1.05 + 100_000
    assert not list((dst.data_dir / "store" / "partial").iterdir())
    assert blob_bytes(dst.data_dir)[0] == blob_bytes(src.data_dir)[0]


def test_a_corrupt_chunk_on_the_source_is_reported_and_refetched_once_repaired(nodes, tiny_llama):
    src, dst = nodes
    build_into(src.data_dir, tiny_llama, "tiny:v1")
    weights = (tiny_llama / "model.safetensors").read_bytes()
    store = ContentStore(src.data_dir / "store")
    import hashlib

    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    path = store.blob_path(digest)
    store.close()
    offset = len(weights) // 2
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([weights[offset] ^ 0xFF]))
    r = ctl(dst.data_dir, "pull", url(src, "tiny:v1"))
    assert r.returncode == 1
    assert "corrupt" in r.stderr and "Traceback" not in r.stderr
    assert "tiny" not in ctl(dst.data_dir, "images").stdout
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([weights[offset]]))
    result = pull_json(dst.data_dir, url(src, "tiny:v1"))
    assert result["resumed_bytes"] > 0  # the chunks before the bad one were kept
    assert blob_bytes(dst.data_dir)[0][digest] == weights


@pytest.mark.parametrize("name, message", [
    ("nothing:here", "not found"),
    ("tiny@sha256:" + "0" * 64, "not in the store"),
])
def test_unknown_images_on_a_node_are_clear_errors(nodes, name, message):
    src, dst = nodes
    r = ctl(dst.data_dir, "pull", url(src, name))
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_an_unreachable_node_is_a_clear_error(tmp_path):
    from tests.clowderd_proc import free_port

    r = ctl(tmp_path / "d", "pull", f"clowder://127.0.0.1:{free_port()}/x:v1")
    assert r.returncode == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr
