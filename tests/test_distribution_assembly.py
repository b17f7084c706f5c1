"""WindowAssembly: a pulled blob placed piece by piece in any order, each window written whole as it
completes, hashed in order."""
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


def open_direct(path) -> int:
    """A descriptor that writes past the page cache, or -1 where the filesystem refuses it."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return -1


@pytest.mark.parametrize("direct", ["o_direct", "refused", "misaligned"])
def test_pieces_in_any_order_from_many_threads_assemble_the_blob_and_its_sha256(tmp_path, monkeypatch, direct):
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
    direct_fd = -1 if direct == "refused" else open_direct(path)  # refused: as on a filesystem without O_DIRECT
    sink = WindowAssembly(fd, size, chunks, done, direct_fd=direct_fd)

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
    if direct_fd >= 0:
        os.close(direct_fd)


def test_bytes_placed_twice_are_refused(tmp_path):
    size = 1 << 20
    data, chunks = blob_with_chunks(size, seed=3)
    path, fd = open_part(tmp_path, size)
    sink = WindowAssembly(fd, size, chunks, bytearray(len(chunks)))
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
    sink = WindowAssembly(fd, size, chunks, done)
    half = size // 2
    sink.put(0, data[:half])  # the second half never comes: the pull failed
    sink.stop()  # returns: nothing waits for the missing bytes
    marked = [c for i, c in enumerate(chunks) if done[i]]
    assert marked and marked == chunks[: len(marked)]
    end = marked[-1][0] + marked[-1][1]
    assert end <= half
    assert os.pread(fd, end, 0) == data[:end]
    os.close(fd)


def test_a_stopped_assembly_keeps_every_whole_window_not_only_those_before_the_first_gap(tmp_path):
    size = 4 << 20  # 128 KiB windows
    data, chunks = blob_with_chunks(size, seed=5)
    w = window_size(size)
    path, fd = open_part(tmp_path, size)
    done = bytearray(len(chunks))
    sink = WindowAssembly(fd, size, chunks, done, direct_fd=open_direct(path))
    # As from several streams, one lagging: windows 1-3 and 20-40 arrive whole (20-40 partly past
    # the windows held in memory, so through the page cache), window 0 only in part.
    for lo, hi in ((w, 4 * w), (20 * w, 40 * w), (0, w // 2)):
        sink.put(lo, data[lo:hi])
    sink.stop()
    whole = [(w, 4 * w), (20 * w, 40 * w)]
    expected = [1 if any(lo <= off and off + n <= hi for lo, hi in whole) else 0 for off, n, _ in chunks]
    assert done == bytearray(expected)
    assert sum(expected) > len(chunks) // 3
    for lo, hi in whole:
        assert os.pread(fd, hi - lo, lo) == data[lo:hi]
    os.close(fd)
