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
from clowderd.trust.dial import Dialer
from tests import modelgen
from tests.clowderd_proc import REPO_ROOT

MID = dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=4096)
BIG = dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4, vocab_size=8192)


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


def kill_when(data_dir, ref, streams, rate, ready, timeout=60):
    """Start `clowderctl pull` of ref, SIGKILL it once ready(marks) holds for the resume marks of
    its biggest chunk ingest (as checkpointed), and return those marks as the kill left them."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "clowderctl.main", "--data-dir", str(data_dir), "pull", "-q",
                             "--streams", str(streams), "--limit-rate", str(rate), ref],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = ContentStore(data_dir / "store")
    try:
        deadline = time.monotonic() + timeout
        ref_seen = None
        while time.monotonic() < deadline and proc.poll() is None:
            ingests = [s for s in store.ingest_statuses() if s.ref.endswith(".chunks")]
            biggest = max(ingests, key=lambda s: s.size, default=None)
            if biggest is not None and biggest.size > 1 << 20 and ready(biggest.marks):
                ref_seen = biggest.ref
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert ref_seen is not None, f"the pull never got there (exit {proc.returncode}): {proc.stderr.read()}"
        return store.ingest_status(ref_seen).marks
    finally:
        proc.stderr.close()
        store.close()


def marked_bytes(marks, chunks):
    return sum(n for (_, n, _), m in zip(chunks, marks) if m)


def weights_chunks(data_dir, model):
    import hashlib

    digest = "sha256:" + hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    store = ContentStore(data_dir / "store")
    try:
        return store.chunk_index(digest)
    finally:
        store.close()


def test_a_pull_killed_half_way_resumes_where_it_stopped(nodes, tmp_path):
    src, dst = nodes
    model = modelgen.write_llama(tmp_path / "m", **MID)
    digest = build_into(src.data_dir, model, "mid:v1")
    size = (model / "model.safetensors").stat().st_size
    marks = kill_when(dst.data_dir, url(src, "mid:v1"), 1, size // 4, lambda m: sum(m) > 0.3 * len(m))
    assert 0 < sum(marks) < len(marks)
    result = pull_json(dst.data_dir, url(src, "mid:v1"))
    assert result["digest"] == digest
    assert result["resumed_bytes"] == marked_bytes(marks, weights_chunks(src.data_dir, model)) > 0.25 * size
    assert result["fetched_bytes"] + result["resumed_bytes"] <= size * 1.05 + 100_000
    store = ContentStore(dst.data_dir / "store")
    assert store.ingest_statuses() == []
    store.close()
    assert blob_bytes(dst.data_dir)[0] == blob_bytes(src.data_dir)[0]


def test_a_pull_over_4_streams_killed_keeps_every_whole_window_past_the_first_gap(nodes, tmp_path):
    src, dst = nodes
    model = modelgen.write_llama(tmp_path / "m", **BIG)  # 59 MB: 4 fetch units, 1 MiB windows
    build_into(src.data_dir, model, "big:v1")
    size = (model / "model.safetensors").stat().st_size
    chunks = weights_chunks(src.data_dir, model)

    def past_a_gap(marks):  # marked chunks after an unmarked one: the streams ahead kept theirs
        gap = marks.find(0)
        return 0 <= gap < marks.rfind(1) and sum(marks) > 0.2 * len(marks)

    marks = kill_when(dst.data_dir, url(src, "big:v1"), 4, size // 4, past_a_gap)
    kept = marked_bytes(marks, chunks)
    assert marked_bytes(marks[: marks.find(0)], chunks) < kept
    result = pull_json(dst.data_dir, url(src, "big:v1"))
    assert result["resumed_bytes"] == kept
    assert result["fetched_bytes"] + result["resumed_bytes"] == size  # nothing kept was fetched again
    assert blob_bytes(dst.data_dir)[0] == blob_bytes(src.data_dir)[0]


def test_a_corrupt_chunk_on_the_source_is_reported_quarantined_there_and_refetched_once_repaired(nodes, tiny_llama):
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
    assert "corrupt" in r.stderr and digest in r.stderr and "Traceback" not in r.stderr
    assert "tiny" not in ctl(dst.data_dir, "images").stdout
    store = ContentStore(src.data_dir / "store")
    assert [q.digest for q in store.quarantined()] == [digest]
    store.close()
    r = ctl(dst.data_dir, "pull", url(src, "tiny:v1"))  # the source no longer serves it
    assert r.returncode == 1 and "DATA_LOSS" in r.stderr and "quarantined" in r.stderr
    build_into(src.data_dir, tiny_llama, "tiny:v1")  # the same content again repairs it
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


def test_fetch_chunks_packed_and_unpacked_give_the_same_chunks(nodes, tiny_llama):
    from clowder.v1 import registry_pb2
    from clowderd.distribution.chunk_client import ChunkSource, _parse_packed

    src, _ = nodes
    build_into(src.data_dir, tiny_llama, "tiny:v1")
    weights = (tiny_llama / "model.safetensors").read_bytes()
    import hashlib

    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    source = ChunkSource(src.addresses["storage"], 1, Dialer(None))  # a storage node of no cluster
    try:
        _, chunks = source.chunk_index(digest)
        ids = [c[2] for c in chunks]
        old = [(c.id, c.data) for m in source.stubs[0].FetchChunks(
            registry_pb2.FetchChunksRequest(ids=ids, blob_digest=digest)) for c in m.chunks]
        packed = []
        for raw in source.fetchers[0](registry_pb2.FetchChunksRequest(ids=ids, blob_digest=digest, packed=True,
                                                                       batch_bytes=1)):
            got_ids, lengths, data = _parse_packed(raw)
            pos = 0
            for k, n in enumerate(lengths):
                packed.append((bytes(got_ids[32 * k : 32 * k + 32]), bytes(data[pos : pos + n])))
                pos += n
        assert old == packed == [(cid, weights[off : off + n]) for off, n, cid in chunks]
    finally:
        source.close()


def test_the_store_takes_an_assembled_file_only_with_its_digest_and_a_chunk_list_that_fits(tmp_path):
    import hashlib

    from clowderd import _native as native
    from clowderd.errors import DigestMismatch, InvalidInput

    store = ContentStore(tmp_path / "store")
    try:
        data = os.urandom(300_000)
        chunks = native.chunk(data)
        sha = hashlib.sha256(data).digest()
        digest = "sha256:" + sha.hex()

        def assembled(content=data):
            ingest = store.writer("x", size=len(content))
            ingest.write_at(0, content)
            return ingest

        with pytest.raises(DigestMismatch):  # the caller's hash is not the digest's
            assembled().commit_assembled(digest, chunks, hashlib.sha256(b"other").digest())
        with pytest.raises(InvalidInput):  # the chunks do not tile the file
            assembled().commit_assembled(digest, chunks[:-1], sha)
        with pytest.raises(DigestMismatch):  # a sampled chunk does not match its id
            assembled(b"\0" * len(data)).commit_assembled(digest, chunks, sha)
        assert not store.exists(digest) and store.ingest_statuses() == []
        result = assembled().commit_assembled(digest, chunks, sha)
        assert result.new and store.read_bytes(digest) == data and store.chunk_index(digest) == chunks
        assert store.ingest_statuses() == []
    finally:
        store.close()


def test_a_packed_batch_lands_at_every_offset_of_each_chunk_and_skips_corrupt_ones(tmp_path):
    import hashlib

    from clowderd import _native as native
    from clowderd.distribution.assembly import WindowAssembly
    from clowderd.distribution.chunk_client import _BlobAssembly, _RateLimit
    from clowderd.distribution.progress import Progress

    a, b, c = os.urandom(5000), os.urandom(7000), os.urandom(3000)
    layout = [a, b, a, c, b]  # a and b twice
    chunks, off = [], 0
    for piece in layout:
        chunks.append((off, len(piece), native.blake3(piece)))
        off += len(piece)
    fd = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, off)
    done = bytearray(len(chunks))
    sink = WindowAssembly(fd, off, chunks, done)
    asm = _BlobAssembly(done, chunks, sink, Progress(), "k", _RateLimit(None))
    ids = [native.blake3(p) for p in (a, b, c)]
    bad = asm.put_batch(b"".join(ids), [len(a), len(b), len(c)], a + b[:-1] + b"x" + c)
    assert bad == [ids[1]] and list(asm.positions) == [ids[1]]
    assert asm.put_batch(ids[1], [len(b)], b) == [] and not asm.positions
    assert sink.finish() == hashlib.sha256(b"".join(layout)).digest()
    assert all(done)
    assert os.pread(fd, off, 0) == b"".join(layout)
    assert asm.stats.fetched_bytes == len(a) + len(c) + len(b) and asm.stats.local_bytes == len(a) + len(b)
    os.close(fd)


def test_a_node_lists_its_repositories_and_their_tags(nodes, tiny_llama):
    import grpc

    from clowder.v1 import registry_pb2, registry_pb2_grpc

    src, _ = nodes
    build_into(src.data_dir, tiny_llama, "team/tiny:v1")
    build_into(src.data_dir, tiny_llama, "team/tiny:v2")
    with grpc.insecure_channel(src.addresses["storage"]) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        assert list(stub.ListRepositories(registry_pb2.ListRepositoriesRequest()).repositories) == ["team/tiny"]
        tags = stub.ListTags(registry_pb2.ListTagsRequest(repository="team/tiny")).tags
        assert sorted(tags) == ["v1", "v2"]
        with pytest.raises(grpc.RpcError) as err:
            stub.ListTags(registry_pb2.ListTagsRequest(repository="nothere"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
