"""Stored bytes read against the chunk index: the one check every reader of the store makes.

Each chunk of a blob has its BLAKE3 id in the blob's chunk index, taken when the content came in and
checked then against its sha256. Whoever hands stored bytes on (the OCI registry, the Registry
service, a model view before an engine loads it, the scrub, fsck) checks each chunk against its id
first. A mismatch, or bytes that cannot be read, quarantines the blob (ContentStore.quarantine, which
logs it) and raises the Quarantined error its readers get from then on.

BLAKE3 and pread release the GIL: a reader in a thread leaves the event loop free, and check_all
runs on every core.
"""
from __future__ import annotations

import bisect
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from clowderd import _native as native
from clowderd.errors import Quarantined
from clowderd.store.content import BlobInfo, Chunk, ContentStore, Corruption

ID_SIZE = 32
RUN_BYTES = 4 << 20  # bytes read and checked at once: one pread, one BLAKE3 call


def bad_chunks(data, lengths: Sequence[int], ids) -> list[int]:
    """The indexes k of the chunks in data (cut after each of lengths) whose BLAKE3 is not the
    k-th 32-byte id of ids (the ids concatenated). A data of the wrong length marks the chunks it
    does not fully hold as bad."""
    n = len(lengths)
    if not n:
        return []
    if len(data) == sum(lengths):
        got = native.blake3_many(data, lengths)
    else:
        view, pieces, pos = memoryview(data), [], 0
        for length in lengths:
            chunk = view[pos : pos + length]
            pieces.append(native.blake3(chunk) if len(chunk) == length else bytes(ID_SIZE))
            pos += length
        got = b"".join(pieces)
    if got == ids:
        return []
    return [k for k in range(n) if got[ID_SIZE * k : ID_SIZE * (k + 1)] != ids[ID_SIZE * k : ID_SIZE * (k + 1)]]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class BlobBytes:
    """A blob's bytes as stored, read a run of whole chunks at a time, every chunk checked against its
    id before the run is handed out. From the blob's own file (or `path`, a hard link to it such as a
    model view's file) when it has one, else, or with from_chunks, from wherever the chunk map says
    each chunk is. `found_by` names the reader in a quarantine. Raises Quarantined at once for a blob
    already in quarantine. Blocking: use it from a thread. Each read opens what it reads, so that
    reads may run in several threads at once and be abandoned at any point."""

    def __init__(self, store: ContentStore, digest: str, found_by: str, *, path: Path | None = None,
                 from_chunks: bool = False):
        self.store = store
        self.digest = digest
        self.found_by = found_by
        self.info = store.info(digest)
        self.chunks = store.chunk_index(digest)
        self._starts = [off for off, _, _ in self.chunks]
        self.path = None if from_chunks else path or (store.blob_path(digest) if self.info.has_file else None)
        self._cache = path is None and self.path is not None and self.info.layout == "chunks"

    def runs(self, start: int = 0, end: int | None = None, run_bytes: int = RUN_BYTES) -> list[tuple[int, int]]:
        """(i, j) for runs of chunks i..j-1 of about run_bytes each, in order, that together hold the
        bytes start..end-1 of the blob (end: its size). Chunks are read whole, so the first and last
        run may hold bytes before start and after end."""
        end = self.info.size if end is None else min(end, self.info.size)
        if start >= end:
            return []
        runs = []
        i = bisect.bisect_right(self._starts, start) - 1
        size = 0
        for k in range(i, len(self.chunks)):
            off, length, _ = self.chunks[k]
            if off >= end:
                break
            if k > i and size + length > run_bytes:
                runs.append((i, k))
                i, size = k, 0
            size += length
            last = k
        runs.append((i, last + 1))
        return runs

    def read(self, i: int, j: int) -> bytes:
        """The bytes of chunks i..j-1, each checked against its id."""
        run = self.chunks[i:j]
        if self.path is None:
            return self._read_from_chunk_map(run)
        start = run[0][0]
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            gone = isinstance(exc, FileNotFoundError) and self._cache
            if gone and not self.store.info(self.digest).has_file:  # gc dropped the copy meanwhile
                self.path = None
                return self._read_from_chunk_map(run)
            raise self._corrupt(Corruption(self.digest, str(self.path), 0, None,
                                           f"cannot be read: {exc.strerror}")) from None
        try:
            data = os.pread(fd, run[-1][0] + run[-1][1] - start, start)
        except OSError as exc:
            raise self._corrupt(Corruption(self.digest, str(self.path), start, run[0][2],
                                           f"cannot be read: {exc.strerror}")) from None
        finally:
            os.close(fd)
        bad = bad_chunks(data, [length for _, length, _ in run], b"".join(cid for _, _, cid in run))
        if bad:
            off, _, cid = run[bad[0]]
            raise self._corrupt(Corruption(self.digest, str(self.path), off, cid))
        return data

    def _read_from_chunk_map(self, run: Sequence[Chunk]) -> bytes:
        locations = self.store.chunk_locations([cid for _, _, cid in run])
        pieces = []
        fds: dict[str, int] = {}
        try:
            for _, length, cid in run:
                if cid not in locations:
                    raise self._corrupt(Corruption(self.digest, str(self.store.root), 0, cid,
                                                   "is not in the store's chunk map"))
                location, at, _ = locations[cid]
                path = self.store.location_path(location)
                try:
                    if location not in fds:
                        fds[location] = os.open(path, os.O_RDONLY)
                    data = os.pread(fds[location], length, at)
                except OSError as exc:
                    raise self._corrupt(Corruption(self.digest, str(path), at, cid,
                                                   f"cannot be read: {exc.strerror}")) from None
                if len(data) != length or native.blake3(data) != cid:
                    raise self._corrupt(Corruption(self.digest, str(path), at, cid))
                pieces.append(data)
        finally:
            for fd in fds.values():
                os.close(fd)
        return b"".join(pieces)

    def _corrupt(self, corruption: Corruption) -> Quarantined:
        return self.store.quarantine(corruption, self.found_by)


def check_all(blobs: Sequence[BlobBytes], threads: int = 0) -> list[Quarantined]:
    """Check every chunk of every blob on `threads` threads (0: one per CPU this process may use),
    reading nothing more of a blob once it is found corrupt. Returns the error of each blob found
    corrupt (each is quarantined)."""
    found: dict[str, Quarantined] = {}
    lock = threading.Lock()

    def check(unit: tuple[BlobBytes, int, int]) -> None:
        blob, i, j = unit
        if blob.digest in found:
            return
        try:
            blob.read(i, j)
        except Quarantined as exc:
            with lock:
                found.setdefault(blob.digest, exc)

    units = [(blob, i, j) for blob in blobs for i, j in blob.runs()]
    with ThreadPoolExecutor(max_workers=max(1, threads or usable_cpus())) as pool:
        list(pool.map(check, units))
    return list(found.values())


def stored_copies(store: ContentStore, info: BlobInfo, found_by: str) -> list[BlobBytes]:
    """Every form in which a blob's bytes are served: its own file, and for a chunked blob its chunks
    where the chunk map says they are (a chunked blob's materialized file is served as well)."""
    copies = [BlobBytes(store, info.digest, found_by)] if info.has_file else []
    if info.layout == "chunks":
        copies.append(BlobBytes(store, info.digest, found_by, from_chunks=True))
    return copies
