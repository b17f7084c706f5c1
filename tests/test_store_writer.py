"""Store ingests (ContentStore.writer): written at offsets, resumed by ref, committed under the expected
digest or aborted, one writer at a time."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from clowderd import _native as native
from clowderd.errors import DigestMismatch, InvalidInput, StoreError
from clowderd.store.content import ContentStore


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_an_ingest_written_in_order_resumes_by_its_ref_and_commits_under_its_digest(store):
    data = os.urandom(300_000)
    with store.writer("pull.one") as ingest:
        ingest.write(data[:100_000])
    (status,) = store.ingest_statuses()
    assert (status.ref, status.size, status.marks) == ("pull.one", 100_000, b"")
    with store.writer("pull.one") as ingest:  # as the next try of a broken-off transfer
        assert ingest.offset == 100_000
        ingest.write(data[100_000:])
        result = ingest.commit(sha256_digest(data))
    assert result.new and store.read_bytes(sha256_digest(data)) == data
    assert store.ingest_statuses() == [] and store.ingest_status("pull.one") is None


def test_a_commit_with_other_content_stores_nothing_and_ends_the_ingest(store):
    with store.writer("bad") as ingest:
        ingest.write(b"these are not the bytes")
        with pytest.raises(DigestMismatch, match=r"ingest bad: content has digest sha256:\w+, expected sha256:0+$"):
            ingest.commit("sha256:" + "0" * 64)
    assert store.blobs() == [] and store.ingest_statuses() == []


def test_marks_resume_under_their_key_and_start_over_under_another(store):
    key, other = bytes(32), b"\x01" * 32
    with store.writer("chunks", size=1 << 20, marks=4, marks_key=key) as ingest:
        ingest.write_at(0, b"a" * 1000)
        ingest.marks[0] = 1
        ingest.checkpoint()
        ingest.marks[1] = 1  # never checkpointed: not kept
    assert store.ingest_status("chunks").marks == b"\x01\x00\x00\x00"
    assert store.ingest_status("chunks").allocated == 1 << 20  # allocated up front
    with store.writer("chunks", size=1 << 20, marks=4, marks_key=key) as ingest:
        assert ingest.marks == bytearray(b"\x01\x00\x00\x00")
        assert os.pread(ingest.fileno(), 1000, 0) == b"a" * 1000
    with store.writer("chunks", size=1 << 20, marks=4, marks_key=other) as ingest:  # another chunk index
        assert ingest.marks == bytearray(4) and os.pread(ingest.fileno(), 1000, 0) == bytes(1000)
    with store.writer("chunks", size=2 << 20, marks=4, marks_key=other) as ingest:  # another size
        assert ingest.offset == 2 << 20 and ingest.marks == bytearray(4)


def test_an_assembled_ingest_is_moved_in_with_its_chunk_index(store):
    data = os.urandom(200_000)
    chunks = native.chunk(data)
    with store.writer("asm", size=len(data), marks=len(chunks), marks_key=bytes(32)) as ingest:
        ingest.write_at(len(data) // 2, data[len(data) // 2:])
        ingest.write_at(0, data[: len(data) // 2])
        result = ingest.commit_assembled(sha256_digest(data), chunks, hashlib.sha256(data).digest())
    assert result.new and store.chunk_index(sha256_digest(data)) == chunks
    assert store.ingest_statuses() == []


HOLD = """
import sys
from clowderd.store.content import ContentStore
ingest = ContentStore(sys.argv[1]).writer("held")
ingest.write(b"mine")
print("holding", flush=True)
sys.stdin.readline()
"""


def test_one_writer_at_a_time_per_ref_whether_in_this_process_or_another(store, tmp_path):
    with store.writer("held"):
        with pytest.raises(StoreError, match="ingest held in the store at .* is being written by another process"):
            store.writer("held")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store.root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert proc.stdout.readline().strip() == b"holding"
        with pytest.raises(StoreError, match="being written by another process"):
            store.abort_ingest("held")
        assert store.ingest_status("held").size == 4
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    store.abort_ingest("held")  # its writer is gone: the ingest can go
    assert store.ingest_statuses() == []


@pytest.mark.parametrize("ref", ["", "../escape", "a/b", ".hidden", "x" * 201])
def test_a_ref_that_is_not_a_plain_name_is_refused(store, ref):
    with pytest.raises(InvalidInput, match="ingest ref"):
        store.writer(ref)


def test_an_ingest_that_the_disk_cannot_hold_is_refused_naming_the_store(small_fs):
    store = ContentStore(small_fs(4 << 20) / "store", reserve_bytes=0)
    try:
        with pytest.raises(StoreError, match=rf"cannot allocate ingest big in the store at {store.root} for "
                                             r"8,388,608 bytes: No space left on device"):
            store.writer("big", size=8 << 20, marks=1, marks_key=bytes(32))
        assert store.ingest_statuses() == []  # and what the allocation took is free again
        with store.writer("fits", size=2 << 20) as ingest:
            assert ingest.offset == 2 << 20
    finally:
        store.close()
