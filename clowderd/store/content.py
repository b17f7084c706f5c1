"""The content store: immutable blobs under their sha256 digest, cut into BLAKE3-named chunks.

Read it as three small interfaces, after containerd's content store (clowderd.store.protocols names
them for callers, who use these methods and never the store's tables):
- Provider: info(), exists(), read_bytes(), open(), chunk_index(), path()
- Ingester: ingest_file(), ingest_bytes(): write to a temp file, check the digest, fsync, rename;
  writer(): a resumable ingest by ref (clowderd.store.writer)
- Manager: blobs(), usage(), quarantined() (gc, store/gc.py, removes what nothing references)

A blob whose stored bytes a reader finds corrupt (a chunk that does not hash to its id in the blob's
chunk index) is quarantined (quarantine()): it stays in the index, but exists() says no and info(),
and with it every read, raises Quarantined naming what was found. A pull skips only what exists, so it
fetches the blob again, and ingesting the same content (a pull, a push, a build) repairs it: the
verified new file replaces the old one, and the chunk map points at it.

A blob is kept in one of two layouts. The first time content arrives it is kept as a whole file,
blobs/sha256/<hex>, read-only, ready to be hard-linked into a model directory. A blob most of whose
chunks the node already has is kept as chunks only: its missing chunks go into a pack file and its
chunk index says where the rest already are. Such a blob gets a whole file again (a materialized
copy, which gc may drop) when something needs it as a file.
"""
from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import io
import logging
import mmap
import os
import secrets
import shutil
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from clowderd import _native as native
from clowderd.errors import DigestMismatch, InvalidInput, NotFound, Quarantined, StoreError
from clowderd.store import db
from clowderd.store import writer as ingests
from clowderd.store.writer import BlobWriter, IngestStatus

log = logging.getLogger("clowderd.store")

# A blob is kept as chunks (not as a whole file) when at least this share of its bytes is
# already in the store; below it, pointing into other files is not worth the indirection.
DEDUP_MIN_SHARE = 0.10

# Bytes an ingest leaves free on the store's filesystem, so that a full store does not also
# starve the database, the logs and the engines sharing the disk.
DEFAULT_RESERVE_BYTES = 64 << 20

_RECORD = struct.Struct("<QI32s")  # offset, length, BLAKE3 id: one chunk-index record

Chunk = tuple[int, int, bytes]


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    layout: str  # 'file' or 'chunks'
    cached: bool  # a 'chunks' blob that also has a materialized whole file
    chunk_count: int

    @property
    def has_file(self) -> bool:
        return self.layout == "file" or self.cached


@dataclass(frozen=True)
class IngestResult:
    info: BlobInfo
    new: bool  # False when the store already had this blob
    stored_bytes: int  # bytes this ingest added to the store (0 for a blob it already had)


@dataclass(frozen=True)
class Corruption:
    """Stored bytes of a blob that are not what its chunk index says: a chunk that does not hash to its
    id, or a file that cannot be read."""
    digest: str  # the blob
    path: str  # the file the bytes were read from
    offset: int  # where the chunk starts in that file
    chunk_id: bytes | None  # None: the file as a whole (missing, unreadable, of the wrong size or digest)
    problem: str = "is corrupt: its bytes do not hash to its id"

    def __str__(self) -> str:
        if self.chunk_id is None:
            return f"{self.path}: {self.problem}"
        return f"chunk {self.chunk_id.hex()} at offset {self.offset:,} of {self.path} {self.problem}"


@dataclass(frozen=True)
class QuarantineRecord:
    digest: str
    reason: str  # str(Corruption)
    found_by: str
    found: float  # Unix time

    def error(self) -> Quarantined:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.found))
        return Quarantined(self.digest, f"blob {self.digest} is quarantined on this node since {when}: "
                                        f"{self.reason} (found by {self.found_by}); it is not served until "
                                        "a push or pull of it repairs it")


@dataclass(frozen=True)
class Usage:
    blob_count: int
    logical_bytes: int  # sum of the sizes of all blobs
    file_bytes: int  # whole blob files that hold chunks other blobs point into
    pack_bytes: int  # pack files
    cache_bytes: int  # materialized copies of chunked blobs (reclaimable)

    @property
    def stored_bytes(self) -> int:
        return self.file_bytes + self.pack_bytes


def parse_digest(digest: str) -> str:
    """Return the hex part of a sha256 digest string, or raise InvalidInput naming it."""
    algo, sep, hexpart = digest.partition(":")
    if not sep or algo != "sha256":
        raise InvalidInput(f"digest {digest!r}: only sha256 digests are supported")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidInput(f"digest {digest!r}: expected 64 lowercase hex characters after 'sha256:'")
    return hexpart


def tiling_error(chunks: Sequence[Chunk], size: int) -> str | None:
    """None when chunks lie end to end from offset 0 to size, else what is wrong with them."""
    pos = 0
    for off, length, _ in chunks:
        if off != pos or length <= 0:
            return f"does not tile the blob (at offset {pos})"
        pos += length
    return None if pos == size else f"covers {pos} of its {size} bytes"


def location_digest(location: str) -> str | None:
    """The digest of the blob whose own file a chunk-map location is ('blob:<hex>'); None for a pack."""
    kind, _, name = location.partition(":")
    return f"sha256:{name}" if kind == "blob" else None


def pack_chunk_index(chunks: Sequence[Chunk]) -> bytes:
    return b"".join(_RECORD.pack(off, length, cid) for off, length, cid in chunks)


def unpack_chunk_index(data: bytes) -> list[Chunk]:
    return list(_RECORD.iter_unpack(data))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ContentStore:
    """A node's content store rooted at a directory (normally <data-dir>/store)."""

    def __init__(self, root: Path, reserve_bytes: int = DEFAULT_RESERVE_BYTES):
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self.blob_dir = self.root / "blobs" / "sha256"
        self.pack_dir = self.root / "packs"
        self.tmp_dir = self.root / "tmp"
        self.partial_dir = self.root / "partial"  # transfers that resume after a restart
        self.view_dir = self.root / "views"
        self._lock_path = self.root / "lock"
        try:
            for d in (self.blob_dir, self.pack_dir, self.tmp_dir, self.partial_dir, self.view_dir):
                d.mkdir(parents=True, exist_ok=True)
            self._lock_path.touch(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use the store at {self.root}: {exc.strerror} "
                             "(run as the user clowderd runs as, or choose another --data-dir)") from exc
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self.db.execute("SELECT 1")  # open (and create) the index now, so a bad store fails here
        self.remove_stale_temp_files()

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection to the index: a transaction never spans two threads."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = db.connect(self.root / "index.db")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the store index {self.root / 'index.db'}: {exc}") from exc
            self._local.conn = conn
            self._connections.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        self._local = threading.local()

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def shared_lock(self):
        """Held by writers that add content (ingest, build, views); many at once."""
        return self._flock(fcntl.LOCK_SH)

    def exclusive_lock(self):
        """Held by gc: no writer may pin content while unreferenced content is removed."""
        return self._flock(fcntl.LOCK_EX)

    def remove_stale_temp_files(self) -> list[str]:
        """Remove what killed writers left under tmp_dir (a build's scratch directory, an ingest's
        copy); returns the names removed. Called whenever a store is opened.

        The rule: everything under tmp_dir is made and removed by a holder of the shared lock
        (ingests, builds, materializations) or of the exclusive one (gc), for as long as it
        exists. So whoever gets the exclusive lock sees only files whose writer is gone. The
        lock is only tried, never waited for: while any writer is at work (a clowderd beside
        this clowderctl, say), nothing is removed, and the next opening of the store sweeps."""
        fd = os.open(self._lock_path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
            removed = []
            for entry in self.tmp_dir.iterdir():
                try:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                except OSError:  # gone already, or not ours to remove (another user's): gc will say
                    continue
                removed.append(entry.name)
            return removed
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing; a database failure (a full disk, say) comes out as StoreError."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise StoreError(f"the store index {self.root / 'index.db'} cannot be updated: {exc}") from exc

    # -- paths -----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / parse_digest(digest)

    def location_path(self, location: str) -> Path:
        kind, _, name = location.partition(":")
        if kind == "blob":
            return self.blob_dir / name
        if kind == "pack":
            return self.pack_dir / f"{name}.pack"
        raise StoreError(f"store index names an unknown chunk location {location!r}")

    def _temp_path(self, suffix: str) -> Path:
        return self.tmp_dir / f"{secrets.token_hex(8)}.{suffix}"

    # -- Provider --------------------------------------------------------------------------
    def info(self, digest: str) -> BlobInfo:
        """The blob's size and layout; NotFound when the store lacks it, Quarantined when it is corrupt."""
        parse_digest(digest)
        row = self.db.execute(
            "SELECT b.digest, size, layout, cached, chunk_count, reason, found_by, found FROM blobs b "
            "LEFT JOIN quarantine q ON q.digest = b.digest WHERE b.digest = ?", (digest,)
        ).fetchone()
        if row is None:
            raise NotFound(f"blob {digest} is not in the store")
        if row[5] is not None:
            raise QuarantineRecord(digest, *row[5:]).error()
        return BlobInfo(row[0], row[1], row[2], bool(row[3]), row[4])

    def exists(self, digest: str) -> bool:
        """Whether the store has the blob and serves it (a quarantined blob is to be fetched again)."""
        return self.db.execute("SELECT 1 FROM blobs WHERE digest = ? AND digest NOT IN (SELECT digest FROM quarantine)",
                               (digest,)).fetchone() is not None

    def chunk_index(self, digest: str) -> list[Chunk]:
        row = self.db.execute("SELECT records FROM chunk_indexes WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            raise NotFound(f"blob {digest} is not in the store")
        return unpack_chunk_index(row[0])

    def read_bytes(self, digest: str) -> bytes:
        """The whole content of a (small) blob: manifests, configurations. Checked against its digest:
        content that does not match quarantines the blob and raises Quarantined."""
        with self.open(digest) as f:
            data = f.read()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            path = self.blob_path(digest) if self.info(digest).has_file else None
            raise self.quarantine(self.content_mismatch(digest, path, actual), "read")
        return data

    def content_mismatch(self, digest: str, path: Path | None, actual: str) -> Corruption:
        """What is wrong with a blob whose bytes hash to `actual`: read from its file at path, or
        assembled from its chunks (path None: the chunk index no longer describes the content)."""
        if path is None:
            return Corruption(digest, str(self.root / "index.db"), 0, None,
                              f"has a chunk index of content with digest {actual}")
        return Corruption(digest, str(path), 0, None, f"holds content with digest {actual}")

    def open(self, digest: str) -> BinaryIO:
        """A readable, seekable file object over the blob's bytes."""
        info = self.info(digest)
        if info.has_file:
            return open(self.blob_path(digest), "rb")
        return io.BufferedReader(_ChunkedReader(self, info.size, self.chunk_index(digest)), 1 << 20)

    def read_chunk(self, chunk_id: bytes) -> bytes:
        row = self.db.execute("SELECT location, offset, length FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
        if row is None:
            raise NotFound(f"chunk {chunk_id.hex()} is not in the store")
        location, offset, length = row
        with open(self.location_path(location), "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        if len(data) != length:
            raise StoreError(f"{self.location_path(location)}: short read for chunk {chunk_id.hex()}")
        return data

    def path(self, digest: str) -> Path:
        """The path of the blob's whole, read-only file, materializing it from chunks if needed."""
        info = self.info(digest)
        if not info.has_file:
            with self.shared_lock():
                self._materialize(info)
        return self.blob_path(digest)

    # -- Ingester --------------------------------------------------------------------------
    def ingest_file(self, src: Path, cuts: Sequence[int] = (), expected_digest: str | None = None) -> IngestResult:
        """Store a copy of the file at src. cuts are offsets forced to be chunk boundaries (tensor
        boundaries of a safetensors file). Raises DigestMismatch when expected_digest is given
        and the content does not match; the store is then unchanged."""
        src = Path(src)
        with self.shared_lock():
            return self._ingest_file(src, cuts, expected_digest, move=False)

    def ingest_temp_file(self, path: Path, cuts: Sequence[int] = (), expected_digest: str | None = None) -> IngestResult:
        """Store a file that the store itself wrote under tmp_dir or partial_dir (an upload, a
        conversion, an assembled pull) by moving it in rather than copying it: no second copy on
        disk. The file is consumed whether or not the ingest succeeds."""
        path = self._own_file(path)
        with self.shared_lock():
            try:
                return self._ingest_file(path, cuts, expected_digest, move=True)
            finally:
                path.unlink(missing_ok=True)

    def ingest_assembled_file(self, path: Path, digest: str, chunks: Sequence[Chunk], sha256: bytes) -> IngestResult:
        """Move in a file that this process assembled under tmp_dir or partial_dir from verified
        chunks (a chunk pull), with `chunks` as its chunk index, taking the sha256 the caller
        computed instead of reading the whole file again.

        The caller vouches for two things, both computed in this process: `sha256` is the hash of
        the exact bytes of the file as it is now (hashed from the very buffers that were written to
        it, or read back from it, with nothing writing to it since), and every chunk's bytes were
        checked against its BLAKE3 id before they were written. That is the check ingest_temp_file makes, only done while the
        file was being assembled, so no blob becomes visible before its sha256 is verified. The
        store still checks what is cheap: that sha256 is digest's, that the chunks tile the file
        from 0 to its size, and the BLAKE3 of a few chunks (first, last, some between), so a
        caller handing the wrong file or list is caught. The file is consumed either way."""
        path = self._own_file(path)
        with self.shared_lock():
            try:
                parse_digest(digest)
                if "sha256:" + sha256.hex() != digest:
                    raise DigestMismatch(f"{path}: content has digest sha256:{sha256.hex()}, expected {digest}")
                chunks = list(chunks)
                fd = os.open(path, os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                    if why := tiling_error(chunks, size):
                        raise InvalidInput(f"{path}: the chunk list {why}")
                    sample = {0, len(chunks) - 1, *range(0, len(chunks), max(1, len(chunks) // 6))} if chunks else set()
                    for i in sorted(sample):
                        off, length, cid = chunks[i]
                        if native.blake3(os.pread(fd, length, off)) != cid:
                            raise DigestMismatch(f"{path}: chunk {i} ({cid.hex()}) does not match its id")
                finally:
                    os.close(fd)
                return self._commit(path, digest, size, chunks)
            finally:
                path.unlink(missing_ok=True)

    def _own_file(self, path: Path) -> Path:
        """path, if the store itself wrote it (under tmp_dir or partial_dir) and may move it in."""
        path = Path(path)
        if not any(path.resolve().is_relative_to(d.resolve()) for d in (self.tmp_dir, self.partial_dir)):
            raise InvalidInput(f"{path}: only files under {self.tmp_dir} or {self.partial_dir} can be moved into the store")
        return path

    def writer(self, ref: str, *, size: int | None = None, marks: int = 0, marks_key: bytes = b"") -> BlobWriter:
        """Open the ingest `ref`, resuming what an earlier writer of that ref left (see writer.py):
        write at offsets, then commit with the expected digest, or abort."""
        return BlobWriter(self, ingests.check_ref(ref), size, marks, marks_key)

    def ingest_status(self, ref: str) -> IngestStatus | None:
        """What the ingest `ref` holds on disk, or None when there is none."""
        return ingests.status(self, ref)

    def ingest_statuses(self) -> list[IngestStatus]:
        """Every ingest on disk, open or left for a resume."""
        return ingests.statuses(self)

    def abort_ingest(self, ref: str) -> None:
        """Remove the ingest `ref`; StoreError when another writer holds it open."""
        self.writer(ref).abort()

    def _ingest_file(self, src: Path, cuts: Sequence[int], expected_digest: str | None, move: bool) -> IngestResult:
        try:
            src_fd = os.open(src, os.O_RDONLY)
        except OSError as exc:
            raise InvalidInput(f"{src}: {exc.strerror}") from exc
        tmp = src if move else self._temp_path("ingest")
        try:
            size = os.fstat(src_fd).st_size
            if move:
                sha, chunks = native.ingest(src_fd, -1, cuts)
            else:
                self.check_free_space(size, str(src))
                dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    try:
                        sha, chunks = native.ingest(src_fd, dst_fd, cuts)
                    except OSError as exc:
                        raise self._write_error(exc, src) from exc
                finally:
                    os.close(dst_fd)
            digest = "sha256:" + sha.hex()
            if expected_digest is not None and digest != expected_digest:
                raise DigestMismatch(f"{src}: content has digest {digest}, expected {expected_digest}")
            return self._commit(tmp, digest, size, chunks)
        finally:
            os.close(src_fd)
            if not move:
                tmp.unlink(missing_ok=True)

    def ingest_bytes(self, data: bytes, expected_digest: str | None = None) -> IngestResult:
        """Store a small blob given in memory (a manifest, a configuration)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if expected_digest is not None and digest != expected_digest:
            raise DigestMismatch(f"content has digest {digest}, expected {expected_digest}")
        with self.shared_lock():
            if self.exists(digest):
                return IngestResult(self.info(digest), new=False, stored_bytes=0)
            return self._ingest_bytes(data, digest)

    def _ingest_bytes(self, data: bytes, digest: str) -> IngestResult:
        tmp = self._temp_path("ingest")
        try:
            self.check_free_space(len(data), "a blob")
            try:
                with open(tmp, "xb") as f:
                    f.write(data)
            except OSError as exc:
                raise self._write_error(exc, None) from exc
            return self._commit(tmp, digest, len(data), native.chunk(data))
        finally:
            tmp.unlink(missing_ok=True)

    def check_free_space(self, size: int, what: str) -> None:
        """Refuse, before writing anything, to write size bytes that would eat the reserve."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if size + self.reserve_bytes > free:
            raise StoreError(
                f"not enough space in the store at {self.root} for {what} ({size:,} bytes): "
                f"{free:,} bytes are free and {self.reserve_bytes:,} are kept in reserve"
            )

    def _write_error(self, exc: OSError, src: Path | None) -> StoreError:
        what = f" while storing {src}" if src else ""
        return StoreError(f"cannot write to the store at {self.root}{what}: {exc.strerror or exc}")

    def _commit(self, tmp: Path, digest: str, size: int, chunks: list[Chunk]) -> IngestResult:
        """Move a verified temp file into the store in the layout its chunks call for."""
        if self.quarantine_record(digest) is not None:
            return self._repair(tmp, digest, size, chunks)
        if self.exists(digest):
            return IngestResult(self.info(digest), new=False, stored_bytes=0)
        ids = list({cid for _, _, cid in chunks})
        known = self.known_chunks(ids)
        known_bytes = sum(length for _, length, cid in chunks if cid in known)
        if size and known_bytes >= DEDUP_MIN_SHARE * size:
            return self._commit_chunked(tmp, digest, size, chunks, known)
        return self._commit_file(tmp, digest, size, chunks)

    def chunk_locations(self, ids: Sequence[bytes]) -> dict[bytes, tuple[str, int, int]]:
        """Where the chunk map says each of ids is stored: (location, offset, length), for the
        ids this node has."""
        found: dict[bytes, tuple[str, int, int]] = {}
        ids = list(ids)
        for i in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
            batch = ids[i : i + 500]
            marks = ",".join("?" * len(batch))
            for cid, location, offset, length in self.db.execute(
                f"SELECT id, location, offset, length FROM chunks WHERE id IN ({marks})", batch
            ):
                found[cid] = (location, offset, length)
        return found

    def known_chunks(self, ids: Sequence[bytes]) -> set[bytes]:
        """Which of ids this node's chunk map has."""
        return set(self.chunk_locations(ids))

    def _move_into_place(self, tmp: Path, digest: str) -> Path:
        """Make a verified temp file the blob's whole, read-only file (durably); returns its path."""
        final = self.blob_path(digest)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise self._write_error(exc, None) from exc
        finally:
            os.close(fd)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        _fsync_dir(self.blob_dir)
        return final

    def _commit_file(self, tmp: Path, digest: str, size: int, chunks: list[Chunk]) -> IngestResult:
        # Only a blob kept whole needs its temp file on disk; a chunked one keeps just a pack.
        final = self._move_into_place(tmp, digest)
        location = f"blob:{parse_digest(digest)}"
        try:
            with self.transaction() as tx:
                self._insert_blob(tx, digest, size, "file", chunks)
                tx.executemany(  # in id order: B-tree inserts in key order touch each page once
                    "INSERT OR IGNORE INTO chunks (id, location, offset, length) VALUES (?, ?, ?, ?)",
                    sorted((cid, location, off, length) for off, length, cid in chunks),
                )
        except StoreError:
            if not self.exists(digest):  # unless a concurrent ingest of the same content won
                final.unlink(missing_ok=True)
            raise
        return IngestResult(self.info(digest), new=True, stored_bytes=size)

    def _commit_chunked(self, tmp: Path, digest: str, size: int, chunks: list[Chunk], known: set[bytes]) -> IngestResult:
        missing: dict[bytes, tuple[int, int]] = {}
        for off, length, cid in chunks:
            if cid not in known and cid not in missing:
                missing[cid] = (off, length)
        pack_name = None
        pack_rows = []
        if missing:
            pack_name, pack_rows = self._write_pack(tmp, missing)
        try:
            with self.transaction() as tx:
                self._insert_blob(tx, digest, size, "chunks", chunks)
                tx.executemany(
                    "INSERT OR IGNORE INTO chunks (id, location, offset, length) VALUES (?, ?, ?, ?)",
                    sorted((cid, f"pack:{pack_name}", off, length) for cid, off, length in pack_rows),
                )
        except StoreError:
            if pack_name:
                (self.pack_dir / f"{pack_name}.pack").unlink(missing_ok=True)
            raise
        return IngestResult(self.info(digest), new=True, stored_bytes=sum(r[2] for r in pack_rows))

    def _write_pack(self, src: Path, wanted: dict[bytes, tuple[int, int]]) -> tuple[str, list[tuple[bytes, int, int]]]:
        """Copy the wanted (offset, length) ranges of src into a new pack file; returns its name
        and (chunk id, offset in pack, length) rows."""
        name = secrets.token_hex(16)
        tmp = self._temp_path("pack")
        rows = []
        try:
            with open(src, "rb") as fin, open(tmp, "xb") as fout:
                pos = 0
                for cid, (off, length) in wanted.items():
                    copied = 0
                    while copied < length:
                        n = os.copy_file_range(fin.fileno(), fout.fileno(), length - copied, off + copied, pos + copied)
                        if n == 0:
                            raise StoreError(f"{src}: ended early while writing a pack")
                        copied += n
                    rows.append((cid, pos, length))
                    pos += length
                os.fsync(fout.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, self.pack_dir / f"{name}.pack")
            _fsync_dir(self.pack_dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._write_error(exc, None) from exc
        return name, rows

    @staticmethod
    def _insert_blob(tx: sqlite3.Connection, digest: str, size: int, layout: str, chunks: list[Chunk]) -> None:
        tx.execute(
            "INSERT INTO blobs (digest, size, layout, cached, chunk_count, created) VALUES (?, ?, ?, 0, ?, ?)",
            (digest, size, layout, len(chunks), time.time()),
        )
        tx.execute("INSERT INTO chunk_indexes (digest, records) VALUES (?, ?)", (digest, pack_chunk_index(chunks)))

    # -- materialization -------------------------------------------------------------------
    def _materialize(self, info: BlobInfo) -> None:
        """Assemble a chunked blob into a whole file, checking its digest before it is visible."""
        self.check_free_space(info.size, f"a copy of {info.digest}")
        tmp = self._temp_path("materialize")
        try:
            with open(tmp, "xb") as fout:
                out = fout.fileno()
                for off, length, cid in self.chunk_index(info.digest):
                    data = self.read_chunk(cid)
                    if native.blake3(data) != cid:
                        location, at, _ = self.chunk_locations([cid])[cid]
                        where = Corruption(info.digest, str(self.location_path(location)), at, cid)
                        raise self.quarantine(where, "materialize")
                    os.pwrite(out, data, off)
                os.fsync(out)
            actual = "sha256:" + file_sha256(tmp)
            if actual != info.digest:
                raise StoreError(f"blob {info.digest} assembles to {actual}; run 'clowderctl fsck'")
            os.chmod(tmp, 0o444)
            os.replace(tmp, self.blob_path(info.digest))
            _fsync_dir(self.blob_dir)
        except OSError as exc:
            raise self._write_error(exc, None) from exc
        finally:
            tmp.unlink(missing_ok=True)
        with self.transaction() as tx:
            tx.execute("UPDATE blobs SET cached = 1 WHERE digest = ?", (info.digest,))

    # -- quarantine ------------------------------------------------------------------------
    def quarantine(self, corruption: Corruption, found_by: str) -> Quarantined:
        """Stop serving a blob whose stored bytes were found corrupt, and log it (once, however many
        readers find it). Returns the error its readers get from now on, for the finder to raise.

        Only the blob read is quarantined: another blob that shares the bad chunk through the chunk
        map is quarantined when a read or the scrub comes to it."""
        now = time.time()
        with self.transaction() as tx:
            added = tx.execute(
                "INSERT OR IGNORE INTO quarantine (digest, reason, found_by, found) "
                "SELECT digest, ?, ?, ? FROM blobs WHERE digest = ?",
                (str(corruption), found_by, now, corruption.digest),
            ).rowcount
        if added:
            log.error("corrupt blob quarantined", extra={
                "digest": corruption.digest, "path": corruption.path, "offset": corruption.offset,
                "chunk": corruption.chunk_id.hex() if corruption.chunk_id else None, "problem": corruption.problem,
                "found_by": found_by})
        return QuarantineRecord(corruption.digest, str(corruption), found_by, now).error()

    def quarantine_record(self, digest: str) -> QuarantineRecord | None:
        row = self.db.execute("SELECT digest, reason, found_by, found FROM quarantine WHERE digest = ?",
                              (digest,)).fetchone()
        return QuarantineRecord(*row) if row else None

    def quarantined(self) -> list[QuarantineRecord]:
        """Every blob in quarantine, by digest."""
        rows = self.db.execute("SELECT digest, reason, found_by, found FROM quarantine ORDER BY digest")
        return [QuarantineRecord(*r) for r in rows]

    def _repair(self, tmp: Path, digest: str, size: int, chunks: list[Chunk]) -> IngestResult:
        """Replace a quarantined blob's stored bytes with a verified temp file of its content. The blob
        is kept whole from now on, and every chunk of it is read from that file: a chunk that was
        corrupt in a pack or in another blob's file is then read from good bytes by every blob that
        shares it. A model view keeps its link to the old file until it is made again."""
        final = self._move_into_place(tmp, digest)
        location = f"blob:{parse_digest(digest)}"
        with self.transaction() as tx:
            tx.execute("UPDATE blobs SET size = ?, layout = 'file', cached = 0, chunk_count = ? WHERE digest = ?",
                       (size, len(chunks), digest))
            tx.execute("UPDATE chunk_indexes SET records = ? WHERE digest = ?", (pack_chunk_index(chunks), digest))
            tx.executemany("INSERT OR REPLACE INTO chunks (id, location, offset, length) VALUES (?, ?, ?, ?)",
                           sorted((cid, location, off, length) for off, length, cid in chunks))
            tx.execute("DELETE FROM quarantine WHERE digest = ?", (digest,))
        log.warning("quarantined blob repaired", extra={"digest": digest, "path": str(final)})
        return IngestResult(self.info(digest), new=True, stored_bytes=size)

    # -- Manager ---------------------------------------------------------------------------
    def blobs(self) -> list[BlobInfo]:
        rows = self.db.execute("SELECT digest, size, layout, cached, chunk_count FROM blobs ORDER BY digest")
        return [BlobInfo(r[0], r[1], r[2], bool(r[3]), r[4]) for r in rows]

    def usage(self) -> Usage:
        blob_count, logical = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM blobs").fetchone()
        file_bytes = self.db.execute("SELECT coalesce(sum(size), 0) FROM blobs WHERE layout = 'file'").fetchone()[0]
        cache_bytes = self.db.execute(
            "SELECT coalesce(sum(size), 0) FROM blobs WHERE layout = 'chunks' AND cached = 1"
        ).fetchone()[0]
        pack_bytes = sum(p.stat().st_size for p in self.pack_dir.glob("*.pack"))
        return Usage(blob_count, logical, file_bytes, pack_bytes, cache_bytes)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read through a mapping (hashlib releases the GIL on big updates)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            step = 16 << 20
            for i in range(0, len(m), step):
                h.update(view[i : i + step])
            view.release()
    return h.hexdigest()


class _ChunkedReader(io.RawIOBase):
    """Reads a chunked blob through its chunk index without materializing it."""

    def __init__(self, store: ContentStore, size: int, chunks: list[Chunk]):
        self._store = store
        self._size = size
        self._chunks = chunks
        self._starts = [off for off, _, _ in chunks]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        if self._pos >= self._size:
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        off, length, cid = self._chunks[i]
        data = self._store.read_chunk(cid)
        start = self._pos - off
        n = min(len(buf), length - start)
        buf[:n] = data[start : start + n]
        self._pos += n
        return n
