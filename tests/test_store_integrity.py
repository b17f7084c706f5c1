"""Stored bytes read against the chunk index (clowderd.store.verify), and the quarantine of a corrupt
blob in the store: no longer served, listed by fsck, repaired by the same content coming in again."""
import hashlib
import logging
import os

import pytest

from clowderd import _native as native
from clowderd.errors import NotFound, Quarantined
from clowderd.store import fsck, gc
from clowderd.store.verify import BlobBytes, bad_chunks, check_all
from tests.store_fixtures import flip_byte


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_all(store, digest: str, found_by: str = "test", **kw) -> bytes:
    blob = BlobBytes(store, digest, found_by, **kw)
    return b"".join(blob.read(i, j) for i, j in blob.runs())


@pytest.fixture
def base_and_variant(store):
    """A blob kept whole and a variant of it kept as chunks (its new chunks in a pack)."""
    base = os.urandom(1 << 20)
    variant = base[: 700_000] + os.urandom(400_000)
    store.ingest_bytes(base)
    assert store.ingest_bytes(variant).info.layout == "chunks"
    return base, variant


def test_bad_chunks_names_exactly_the_corrupt_ones():
    pieces = [os.urandom(n) for n in (100, 70_000, 131_072, 9)]
    ids = b"".join(native.blake3(p) for p in pieces)
    data = b"".join(pieces)
    lengths = [len(p) for p in pieces]
    assert bad_chunks(data, lengths, ids) == []
    broken = bytearray(data)
    broken[150] ^= 1
    broken[-1] ^= 1
    assert bad_chunks(bytes(broken), lengths, ids) == [1, 3]
    assert bad_chunks(data[:-1], lengths, ids) == [3]  # a short read


@pytest.mark.parametrize("start, end", [(0, None), (0, 1), (70_000, 70_001), (123_456, 900_000), (2_999_999, None)])
def test_runs_are_whole_chunks_that_cover_the_range_asked(store, start, end):
    data = os.urandom(3_000_000)
    digest = store.ingest_bytes(data).info.digest
    blob = BlobBytes(store, digest, "test")
    runs = blob.runs(start, end, run_bytes=256 << 10)
    chunks = blob.chunks
    first, last = chunks[runs[0][0]], chunks[runs[-1][1] - 1]
    assert first[0] <= start and last[0] + last[1] >= (end or len(data))
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # in order, nothing skipped
    assert all(j - i == 1 or sum(c[1] for c in chunks[i:j]) <= 256 << 10 for i, j in runs)
    got = b"".join(blob.read(i, j) for i, j in runs)
    assert got[start - first[0] : (end or len(data)) - first[0]] == data[start:end]


def test_a_corrupt_read_quarantines_the_blob_logs_it_and_it_is_no_longer_served(store, caplog):
    data = os.urandom(500_000)
    digest = store.ingest_bytes(data).info.digest
    flip_byte(store.blob_path(digest), 300_000)
    with caplog.at_level(logging.ERROR, logger="clowderd.store"):
        with pytest.raises(Quarantined) as raised:
            read_all(store, digest, "oci-get")
    assert raised.value.digest == digest
    record = next(r for r in caplog.records if r.getMessage() == "corrupt blob quarantined")
    chunk_start = max(off for off, _, _ in store.chunk_index(digest) if off <= 300_000)
    assert (record.digest, record.path, record.offset, record.found_by) == (
        digest, str(store.blob_path(digest)), chunk_start, "oci-get")
    assert not store.exists(digest)
    for read in (store.info, store.read_bytes, store.path):
        with pytest.raises(Quarantined, match=f"blob {digest} is quarantined.*offset {chunk_start:,} of "
                                              f"{store.blob_path(digest)}.*found by oci-get"):
            read(digest)
    assert isinstance(raised.value, NotFound)  # to a puller it is missing: it fetches it again
    assert [q.digest for q in store.quarantined()] == [digest]


def test_ingesting_the_same_content_again_repairs_a_quarantined_blob(store, tmp_path):
    data = os.urandom(500_000)
    digest = store.ingest_bytes(data).info.digest
    flip_byte(store.blob_path(digest), 10)
    with pytest.raises(Quarantined):
        read_all(store, digest)
    (tmp_path / "again").write_bytes(data)
    result = store.ingest_file(tmp_path / "again")
    assert result.new and result.info.digest == digest
    assert store.exists(digest) and store.quarantined() == []
    assert read_all(store, digest) == data == store.read_bytes(digest)


def test_a_chunked_blob_corrupt_in_a_pack_is_repaired_as_a_whole_file_that_its_chunks_are_read_from(
        store, base_and_variant):
    base, variant = base_and_variant
    pack = next(store.pack_dir.glob("*.pack"))
    flip_byte(pack, 1000)
    with pytest.raises(Quarantined, match=str(pack)):
        read_all(store, digest_of(variant))
    assert store.exists(digest_of(base))  # only the blob read is quarantined
    store.ingest_bytes(variant)
    info = store.info(digest_of(variant))
    assert (info.layout, info.cached) == ("file", False) and store.quarantined() == []
    ids = [cid for _, _, cid in store.chunk_index(digest_of(variant))]
    assert {loc for loc, _, _ in store.chunk_locations(ids).values()} == {f"blob:{digest_of(variant)[7:]}"}
    assert read_all(store, digest_of(variant), from_chunks=True) == variant
    assert fsck.check(store).ok


def test_fsck_quarantines_what_it_finds_and_lists_every_quarantined_blob_with_what_was_found(store, base_and_variant):
    base, variant = base_and_variant
    flip_byte(store.blob_path(digest_of(base)), 5)
    report = fsck.check(store)
    # The base's own file is corrupt, and the variant reads that chunk from it through the chunk map.
    assert sorted(p.digest for p in report.problems) == sorted([digest_of(base), digest_of(variant)])
    assert all("offset 0 of" in p.what and p.what.endswith("(quarantined by fsck)") for p in report.problems)
    assert {q.digest for q in store.quarantined()} == {digest_of(base), digest_of(variant)}
    again = fsck.check(store)
    assert [p.what for p in again.problems] == [p.what for p in report.problems]


def test_a_missing_blob_file_is_quarantined_as_unreadable(store):
    digest = store.ingest_bytes(os.urandom(1000)).info.digest
    store.blob_path(digest).unlink()
    with pytest.raises(Quarantined, match="cannot be read: No such file"):
        read_all(store, digest)


def test_gc_forgets_the_quarantine_of_a_blob_it_removes(store):
    digest = store.ingest_bytes(os.urandom(1000)).info.digest
    flip_byte(store.blob_path(digest), 0)
    with pytest.raises(Quarantined):
        read_all(store, digest)
    gc.collect(store)  # nothing names the blob
    assert store.quarantined() == [] and store.usage().blob_count == 0


def test_check_all_names_each_corrupt_blob_once_and_reads_the_others_whole(store):
    blobs = [os.urandom(3 << 20) for _ in range(4)]
    digests = [store.ingest_bytes(b).info.digest for b in blobs]
    for digest in digests[1:3]:
        flip_byte(store.blob_path(digest), 1 << 20)
        flip_byte(store.blob_path(digest), 2 << 20)
    found = check_all([BlobBytes(store, d, "view") for d in digests], threads=4)
    assert sorted(e.digest for e in found) == sorted(digests[1:3])
    assert store.exists(digests[0]) and store.exists(digests[3])


def test_a_small_blob_read_whole_is_checked_against_its_digest(store):
    digest = store.ingest_bytes(b'{"schemaVersion": 2}').info.digest
    flip_byte(store.blob_path(digest), 3)
    with pytest.raises(Quarantined, match="holds content with digest sha256:.*found by read"):
        store.read_bytes(digest)
    assert [q.digest for q in store.quarantined()] == [digest]
