"""Resumable pull state under the store's partial_dir (kept by gc for a week).

A chunk pull assembles a blob at `<hex>.chunks.part`, a file of the blob's full size written at
chunk offsets, and records which chunks are in place in the journal `<hex>.chunks.done`:

    magic (8 bytes) | BLAKE3 of the packed chunk index (32 bytes) | one byte per chunk (1 = done)

A checkpoint first fdatasyncs the data file, then writes and fsyncs the journal, so a chunk is
never marked done before its bytes are on disk. A journal for another chunk index (the blob's
index changed on the source) or a data file of the wrong size starts the blob over. An flock on
the journal keeps two pulls of one blob apart.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from clowderd.distribution.errors import TransferError
from clowderd.store.content import ContentStore, parse_digest

MAGIC = b"CLWPART1"
_HEADER = len(MAGIC) + 32


def _reserve(fd: int, size: int) -> None:
    """Allocate the data file's blocks up front: chunks written into allocated blocks cost the
    filesystem less (about 1.6x faster pwrite on ext4 than into a sparse file), and a full disk
    shows now rather than half way. A filesystem without fallocate keeps the sparse file."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise TransferError(f"not enough disk space for a {size:,}-byte blob ({exc.strerror})") from None
        # EOPNOTSUPP, EINVAL...: not supported here; the sparse file still works


class PartialBlob:
    def __init__(self, store: ContentStore, digest: str, size: int, index_key: bytes, nchunks: int):
        hexpart = parse_digest(digest)
        self.digest = digest
        self.path = store.partial_dir / f"{hexpart}.chunks.part"
        self.journal_path = store.partial_dir / f"{hexpart}.chunks.done"
        self._journal = os.open(self.journal_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._journal)
            raise TransferError(f"blob {digest} is being pulled by another process ({self.journal_path} is locked)") from None
        header = MAGIC + index_key
        old = os.pread(self._journal, _HEADER + nchunks, 0)
        resumable = (old[:_HEADER] == header and len(old) == _HEADER + nchunks
                     and self.path.exists() and self.path.stat().st_size == size)
        self.done = bytearray(old[_HEADER:]) if resumable else bytearray(nchunks)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if resumable else os.O_TRUNC), 0o600)
        if not resumable:
            os.ftruncate(self.fd, size)
            try:
                _reserve(self.fd, size)
            except TransferError:
                self.close()
                raise
            os.ftruncate(self._journal, 0)
            os.pwrite(self._journal, header + bytes(self.done), 0)
            os.fsync(self._journal)
        self.resumed_chunks = sum(self.done)

    def checkpoint(self) -> None:
        snapshot = bytes(self.done)  # only chunks written before this point are marked
        os.fdatasync(self.fd)
        os.pwrite(self._journal, snapshot, _HEADER)
        os.fsync(self._journal)

    def close_data(self) -> Path:
        """Close the data file (before it is moved into the store) and return its path."""
        os.close(self.fd)
        self.fd = -1
        return self.path

    def discard(self) -> None:
        """Forget this partial blob: the pull finished (or its content was wrong)."""
        self.path.unlink(missing_ok=True)
        self.journal_path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        os.close(self._journal)
