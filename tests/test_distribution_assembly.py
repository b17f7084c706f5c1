"""WindowAssembly: a pulled blob placed piece by piece in any order, hashed in order, written whole."""
from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest

from clowderd.distribution import assembly
from clowderd.distribution.assembly import WindowAssembly, window_size
from clowderd.distribution.errors import TransferError


def blob_with_chunks(size: int, seed: int):
    rng = random.Random(seed)
    data = rng.randbytes(size)
    chunks, off = [], 0
    while off < size:
        n = min(size - off, rng.randint(1, 40_000))
        chunks.append((off, n, b""))
        off += n
    return data, chunks


def open_part(tmp_path, size):
    path = tmp_path / "blob.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    return path, fd


@pytest.mark.parametrize("direct", ["o_direct", "refused", "misaligned"])
def test_pieces_in_any_order_from_many_threads_assemble_the_blob_and_its_sha256(tmp_path, monkeypatch, direct):
    if direct == "refused":  # as on a filesystem that refuses O_DIRECT
        monkeypatch.setattr(assembly, "open_direct", lambda path: -1)
    if direct == "misaligned":  # as on a device that wants coarser alignment: its writes fail with EINVAL
        monkeypatch.setattr(assembly, "ALIGN", 1)
    size = 3 * (1 << 20) + 123  # 64 KiB windows: many more than AHEAD, so far pieces go to disk first
    assert window_size(size) == 64 << 10
    data, chunks = blob_with_chunks(size, seed=1)
    path, fd = open_part(tmp_path, size)
    done = bytearray(len(chunks))
    for i in range(0, len(chunks), 7):  # an interrupted pull left these in the file
        off, n, _ = chunks[i]
        os.pwrite(fd, data[off : off + n], off)
        done[i] = 1
    todo = [c for i, c in enumerate(chunks) if not done[i]]
    random.Random(2).shuffle(todo)
    sink = WindowAssembly(fd, path, size, chunks, done)

    def place(part):
        for off, n, _ in part:
            sink.put(off, data[off : off + n])

    threads = [threading.Thread(target=place, args=(todo[k::3],)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.finish() == hashlib.sha256(data).digest()
    assert all(done)
    assert os.fstat(fd).st_size == size
    assert os.pread(fd, size + 1, 0) == data
    os.close(fd)


def test_bytes_placed_twice_are_refused(tmp_path):
    size = 1 << 20
    data, chunks = blob_with_chunks(size, seed=3)
    path, fd = open_part(tmp_path, size)
    sink = WindowAssembly(fd, path, size, chunks, bytearray(len(chunks)))
    try:
        sink.put(0, data[:1000])
        with pytest.raises(TransferError, match="arrived twice"):
            sink.put(0, data[: window_size(size)])
        with pytest.raises(TransferError, match="outside the blob"):
            sink.put(size - 10, b"x" * 11)
    finally:
        sink.stop()
        os.close(fd)


def test_a_stopped_assembly_keeps_the_windows_it_wrote_and_marks_only_their_chunks(tmp_path):
    size = 2 << 20
    data, chunks = blob_with_chunks(size, seed=4)
    path, fd = open_part(tmp_path, size)
    done = bytearray(len(chunks))
    sink = WindowAssembly(fd, path, size, chunks, done)
    half = size // 2
    sink.put(0, data[:half])  # the second half never comes: the pull failed
    sink.stop()  # returns: nothing waits for the missing bytes
    marked = [c for i, c in enumerate(chunks) if done[i]]
    assert marked and marked == chunks[: len(marked)]
    end = marked[-1][0] + marked[-1][1]
    assert end <= half
    assert os.pread(fd, end, 0) == data[:end]
    os.close(fd)
