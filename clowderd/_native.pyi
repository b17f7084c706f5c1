"""Typed boundary of the native extension built from native/ (see native/README.md).

Every function releases the GIL while it works on bytes. Buffers are any C-contiguous object
supporting the buffer protocol (bytes, bytearray, memoryview, mmap).
"""
from typing import Sequence

# FastCDC parameters used when none are given.
MIN_SIZE: int  # 8 KiB
AVG_SIZE: int  # 64 KiB
MAX_SIZE: int  # 128 KiB
# The BLAKE3 kernels this CPU runs, fastest first: some of "avx512", "avx2", "sse41", then "portable".
BLAKE3_KERNELS: tuple[str, ...]
# The one picked at import: BLAKE3_KERNELS[0].
BLAKE3_KERNEL: str

# One chunk: (offset in the input, length, 32-byte BLAKE3 id).
Chunk = tuple[int, int, bytes]

def blake3(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte BLAKE3 hash of data."""

def blake3_use_kernel(name: str) -> str:
    """Make `name` (one of BLAKE3_KERNELS) the BLAKE3 kernel of every later call, in every thread, and
    return the one it replaces. Every kernel gives the same hashes, so this only changes speed: it is
    for tests and benchmarks. Raises ValueError, naming the kernels this CPU runs, for any other name."""

def blake3_many(data: bytes | bytearray | memoryview, lengths: Sequence[int]) -> bytes:
    """The 32-byte BLAKE3 hashes of the pieces of data cut after each of lengths, concatenated (one
    call, the GIL released once). Raises ValueError unless the lengths add up to len(data)."""

def chunk(
    data: bytes | bytearray | memoryview,
    cuts: Sequence[int] = (),
    *,
    min_size: int = ...,
    avg_size: int = ...,
    max_size: int = ...,
    threads: int = 0,
) -> list[Chunk]:
    """Cut data into content-defined chunks and hash each with BLAKE3.

    Every offset in cuts (sorted, 0 < cut < len(data)) is forced to be a chunk boundary; between
    forced cuts FastCDC decides. The result does not depend on threads (0 means one per CPU).
    Empty data gives no chunks. avg_size must be a power of two, min_size >= 64 and
    min_size <= avg_size <= max_size. Raises ValueError for unsorted or out-of-range cuts or
    inconsistent sizes."""

def ingest(
    src_fd: int,
    dst_fd: int,
    cuts: Sequence[int] = (),
    *,
    min_size: int = ...,
    avg_size: int = ...,
    max_size: int = ...,
    threads: int = 0,
) -> tuple[bytes, list[Chunk]]:
    """One pass over the whole of src_fd (offset 0 to its size at the call): copy it to dst_fd
    (from dst_fd's offset 0; -1 means no copy), compute its sha256 and cut and hash its chunks as
    chunk() would, on `threads` chunker threads (0: one per online CPU but the one sha256 keeps).
    Returns (32-byte sha256 digest, chunks). Where dst_fd's filesystem takes direct I/O the copy is
    O_DIRECT writes from the source's page cache (dst_fd's flags are restored after); elsewhere
    written data is pushed to disk as it goes (sync_file_range). Either way the caller still fsyncs
    dst_fd before relying on it.
    Raises OSError (with errno, e.g. ENOSPC) on I/O failure and ValueError as chunk() does."""
