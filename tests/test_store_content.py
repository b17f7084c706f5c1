"""The content store: immutable blobs under their digest, ingested by content."""
import hashlib
import os
import stat
from pathlib import Path

import pytest

from clowderd import _native as native
from clowderd.errors import DigestMismatch, InvalidInput, NotFound, StoreError
from clowderd.store.content import ContentStore


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def store_files(store: ContentStore) -> set[str]:
    return {str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file()} - {"lock", "index.db", "index.db-wal", "index.db-shm"}


def test_ingested_blob_is_a_read_only_file_under_its_digest(store, tmp_path):
    data = os.urandom(300_000)
    res = store.ingest_file(write(tmp_path / "f", data))
    assert res.new and res.info.digest == sha256_digest(data) and res.info.layout == "file"
    path = store.path(res.info.digest)
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.read_bytes(res.info.digest) == data
    assert not list(store.tmp_dir.iterdir())


def test_ingesting_the_same_content_again_stores_nothing(store, tmp_path):
    data = os.urandom(200_000)
    first = store.ingest_file(write(tmp_path / "a", data))
    again = store.ingest_file(write(tmp_path / "b", data))
    assert not again.new and again.stored_bytes == 0 and again.info == first.info
    assert store.usage().blob_count == 1


def test_chunk_index_covers_the_blob_and_names_chunks_by_blake3(store, tmp_path):
    data = os.urandom(1_000_000)
    info = store.ingest_file(write(tmp_path / "f", data), cuts=[4096, 500_000]).info
    chunks = store.chunk_index(info.digest)
    assert chunks[0][0] == 0 and sum(length for _, length, _ in chunks) == len(data)
    assert {4096, 500_000} <= {off for off, _, _ in chunks}
    for off, length, cid in chunks:
        assert native.blake3(data[off:off + length]) == cid
        assert store.read_chunk(cid) == data[off:off + length]


def test_a_blob_sharing_most_chunks_is_stored_as_its_missing_chunks_only(store, tmp_path):
    base = bytearray(os.urandom(4_000_000))
    store.ingest_file(write(tmp_path / "base", bytes(base)), cuts=[1_000_000, 2_000_000, 3_000_000])
    variant = bytearray(base)
    variant[1_000_000:2_000_000] = os.urandom(1_000_000)  # one "tensor" of four changed
    res = store.ingest_file(write(tmp_path / "variant", bytes(variant)), cuts=[1_000_000, 2_000_000, 3_000_000])
    assert res.info.layout == "chunks"
    assert 1_000_000 <= res.stored_bytes < 1_300_000
    assert store.usage().stored_bytes < 5_400_000
    with store.open(res.info.digest) as f:
        assert f.read() == bytes(variant)
        f.seek(1_999_990)
        assert f.read(20) == bytes(variant[1_999_990:2_000_010])
    path = store.path(res.info.digest)  # materialized on demand
    assert path.read_bytes() == bytes(variant)
    assert store.info(res.info.digest).cached
    assert store.usage().cache_bytes == len(variant)


def test_ingest_bytes_stores_small_documents(store):
    data = b'{"a": 1}'
    info = store.ingest_bytes(data).info
    assert info.digest == sha256_digest(data) and store.read_bytes(info.digest) == data


def test_digest_mismatch_is_refused_and_leaves_the_store_unchanged(store, tmp_path):
    src = write(tmp_path / "f", os.urandom(100_000))
    before = store_files(store)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch, match=f"{src}.*expected {wrong}"):
        store.ingest_file(src, expected_digest=wrong)
    with pytest.raises(DigestMismatch):
        store.ingest_bytes(b"x", expected_digest=wrong)
    assert store_files(store) == before and store.usage().blob_count == 0


def test_missing_source_file_is_named(store, tmp_path):
    with pytest.raises(InvalidInput, match="nope"):
        store.ingest_file(tmp_path / "nope")


def test_unknown_and_malformed_digests_are_named(store):
    with pytest.raises(NotFound, match="sha256:" + "a" * 64):
        store.info("sha256:" + "a" * 64)
    with pytest.raises(InvalidInput, match="64 lowercase hex"):
        store.info("sha256:abc")
    with pytest.raises(InvalidInput, match="only sha256"):
        store.info("md5:abc")


def test_a_full_disk_is_refused_before_anything_is_written(tmp_path):
    store = ContentStore(tmp_path / "store", reserve_bytes=1 << 60)
    src = write(tmp_path / "f", os.urandom(10_000))
    with pytest.raises(StoreError, match="not enough space in the store"):
        store.ingest_file(src)
    assert store.usage().blob_count == 0 and not list(store.tmp_dir.iterdir())


def test_a_full_disk_at_commit_leaves_no_blob(small_fs, tmp_path):
    tiny_fs = small_fs(4 << 20)
    store = ContentStore(tiny_fs / "store", reserve_bytes=0)
    store.ingest_file(write(tmp_path / "small", os.urandom(1_000_000)))
    free = os.statvfs(tiny_fs).f_bavail * os.statvfs(tiny_fs).f_frsize
    before = store_files(store)
    with pytest.raises(StoreError, match="store"):
        # Fits the file system exactly: the bytes go in, the index update cannot.
        store.ingest_file(write(tmp_path / "exact", os.urandom(free)))
    assert store_files(store) == before and store.usage().blob_count == 1
    store.close()


def test_a_store_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=f"cannot use the store at {blocker}/store"):
        ContentStore(blocker / "store")


def test_threads_can_ingest_into_one_store_at_once(store, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    sources = [write(tmp_path / f"f{i}", os.urandom(2_000_000)) for i in range(6)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(store.ingest_file, sources))
    assert {r.info.digest for r in results} == {sha256_digest(p.read_bytes()) for p in sources}
    assert store.usage().blob_count == 6


def test_a_store_made_with_the_chunk_map_index_by_location_opens_without_it(tmp_path):
    import sqlite3

    ContentStore(tmp_path / "store").close()
    db = sqlite3.connect(tmp_path / "store" / "index.db")
    db.execute("CREATE INDEX chunks_by_location ON chunks (location)")  # as older stores have it
    db.commit()
    db.close()
    store = ContentStore(tmp_path / "store")
    try:
        names = [r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")]
        assert "chunks_by_location" not in names
    finally:
        store.close()


def test_no_code_outside_the_store_reads_or_writes_its_tables():
    """Callers use the store's methods (clowderd.store.protocols): its tables change with it."""
    import re

    root = Path(__file__).resolve().parent.parent
    table_access = re.compile(r"\b(store|index)\.db\b|\.db\.execute|\.transaction\(")
    offenders = [f"{path.relative_to(root)}:{n}" for package in ("clowderd", "clowderctl")
                 for path in (root / package).rglob("*.py") if not path.is_relative_to(root / "clowderd" / "store")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if table_access.search(line)]
    assert offenders == []
