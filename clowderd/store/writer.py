"""Ingests the store owns: a blob written piece by piece, resumable by a ref, moved in under its digest.

After containerd's content Writer. A caller opens an ingest by a ref it chooses (what it is
writing: a pull of one blob, an upload session); opened again with the same ref, after a failure
or a restart, it finds what was written. It writes at offsets, then commits with the expected
digest (the store checks it as it moves the file in) or aborts. The files live under the store's
partial/ directory, which callers outside the store never name:

    partial/<ref>.part   the bytes (for an ingest of a known size: that size, allocated up front)
    partial/<ref>.done   resume marks, for an ingest that asks for them:
                         magic (8 bytes) | key (32 bytes) | one byte per unit (1 = done)

The caller decides what a unit is (the chunk pull: one chunk) and what the key is (what the marks
mean: marks under another key are dropped and the ingest starts over). A checkpoint fdatasyncs
the bytes, then writes and fsyncs the marks, so no unit is marked before its bytes are on disk.
An flock on the .part file, held while the ingest is open, keeps two writers of one ref apart
(the second is refused, naming the ref), in one process or several; gc drops what nobody has
touched for a week.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

from clowderd.errors import DigestMismatch, InvalidInput, StoreError

if TYPE_CHECKING:
    from clowderd.store.content import Chunk, ContentStore, IngestResult

MAGIC = b"CLWPART1"
KEY_SIZE = 32
_HEADER = len(MAGIC) + KEY_SIZE
REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class IngestStatus:
    """What an ingest left on disk, read without opening it (it may be open elsewhere)."""

    ref: str
    size: int  # bytes in the file: for an ingest written in order, how far it got
    allocated: int  # bytes of disk it holds
    marks: bytes  # its resume marks as last checkpointed (empty when it keeps none)


def check_ref(ref: str) -> str:
    if not REF.match(ref):
        raise InvalidInput(f"ingest ref {ref!r}: use letters, digits, '.', '_' and '-' (at most 200)")
    return ref


def data_path(store: ContentStore, ref: str) -> Path:
    return store.partial_dir / f"{check_ref(ref)}.part"


def marks_path(store: ContentStore, ref: str) -> Path:
    return store.partial_dir / f"{check_ref(ref)}.done"


def status(store: ContentStore, ref: str) -> IngestStatus | None:
    try:
        st = os.stat(data_path(store, ref))
    except FileNotFoundError:
        return None
    try:
        marks = marks_path(store, ref).read_bytes()[_HEADER:]
    except FileNotFoundError:
        marks = b""
    return IngestStatus(ref, st.st_size, min(st.st_blocks * 512, st.st_size), marks)


def statuses(store: ContentStore) -> list[IngestStatus]:
    refs = sorted(p.name[: -len(".part")] for p in store.partial_dir.glob("*.part"))
    return [s for ref in refs if REF.match(ref) and (s := status(store, ref)) is not None]


class BlobWriter:
    """One open ingest (see the module docstring); made by ContentStore.writer()."""

    def __init__(self, store: ContentStore, ref: str, size: int | None = None, marks: int = 0,
                 marks_key: bytes = b""):
        """size: the blob's size when it is written at offsets (the file is made that size and its
        blocks allocated: the caller has checked the room for it, see ContentStore.check_free_space);
        None for bytes written in order. marks: how many resume marks to keep, under marks_key
        (KEY_SIZE bytes)."""
        self.store, self.ref, self.size = store, ref, size
        self._path, self._marks_path = data_path(store, ref), marks_path(store, ref)
        if marks and len(marks_key) != KEY_SIZE:
            raise InvalidInput(f"ingest {ref}: a marks key is {KEY_SIZE} bytes, not {len(marks_key)}")
        self.fd = self._open_locked()
        self._direct_fd: int | None = None
        self._marks_fd = -1
        try:
            self.marks = bytearray(marks)
            have = os.fstat(self.fd).st_size
            header = MAGIC + marks_key
            resumable = size is None or have == size
            if marks:
                self._marks_fd = os.open(self._marks_path, os.O_RDWR | os.O_CREAT, 0o600)
                old = os.pread(self._marks_fd, _HEADER + marks, 0)
                resumable = resumable and old[:_HEADER] == header and len(old) == _HEADER + marks
                if resumable:
                    self.marks[:] = old[_HEADER:]
        except BaseException:
            self.close()
            raise
        if not resumable:
            try:
                self._start_over(header)
            except BaseException:
                self.abort()  # a full disk: what fallocate took goes back
                raise

    def _open_locked(self) -> int:
        """The data file, created if need be, under our flock. The lock is taken on the file we
        opened; if a committer moved that file into the store (or an abort removed it) before we
        got the lock, the path now names another file or none: open again."""
        for _ in range(10):
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise self._error(exc, "open") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(f"ingest {self.ref} in the store at {self.store.root} is being written by "
                                 "another process (its file is locked); wait for it or stop it") from None
            try:
                same = os.stat(self._path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        raise StoreError(f"ingest {self.ref} in the store at {self.store.root}: its file keeps being replaced")

    def _start_over(self, header: bytes) -> None:
        try:
            os.ftruncate(self.fd, 0)
            if self.size:
                os.ftruncate(self.fd, self.size)
                _allocate(self.fd, self.size)
            if self._marks_fd >= 0:
                self.marks[:] = bytes(len(self.marks))
                os.ftruncate(self._marks_fd, 0)
                os.pwrite(self._marks_fd, header + bytes(self.marks), 0)
                os.fsync(self._marks_fd)
        except OSError as exc:
            raise self._error(exc, "allocate") from exc

    def _error(self, exc: OSError, doing: str) -> StoreError:
        what = f" for {self.size:,} bytes" if doing == "allocate" and self.size else ""
        return StoreError(f"cannot {doing} ingest {self.ref} in the store at {self.store.root}{what}: "
                          f"{exc.strerror or exc}")

    # -- writing ---------------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Bytes in the file: for bytes written in order, where the next write goes."""
        return os.fstat(self.fd).st_size

    def fileno(self) -> int:
        """The data file, open read-write, for pread and pwrite at offsets (an assembly's hot path)."""
        return self.fd

    def direct_fileno(self) -> int:
        """A second descriptor of the data file that writes past the page cache (O_DIRECT), or -1
        where the filesystem refuses it. Closed with the ingest."""
        if self._direct_fd is None:
            try:
                self._direct_fd = os.open(self._path, os.O_WRONLY | os.O_DIRECT)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise self._error(exc, "open") from exc
                self._direct_fd = -1
        return self._direct_fd

    def reader(self) -> BinaryIO:
        """A file object reading what was written so far (a header that says what the blob is)."""
        return open(self._path, "rb")

    def write(self, data) -> None:
        """Append data at the end of the file."""
        self.write_at(self.offset, data)

    def write_at(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise self._error(exc, "write") from exc

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise self._error(exc, "write") from exc

    def checkpoint(self) -> None:
        """Make the bytes durable, then the marks as they were before (so none runs ahead)."""
        snapshot = bytes(self.marks)
        try:
            os.fdatasync(self.fd)
            if self._marks_fd >= 0:
                os.pwrite(self._marks_fd, snapshot, _HEADER)
                os.fsync(self._marks_fd)
        except OSError as exc:
            raise self._error(exc, "write") from exc

    # -- the end -----------------------------------------------------------------------------------
    def commit(self, expected_digest: str, cuts: Sequence[int] = ()) -> IngestResult:
        """Move the bytes into the store if they hash to expected_digest (cuts: offsets that must
        be chunk boundaries). The ingest ends either way: wrong bytes are not worth resuming."""
        self._close_direct()
        try:
            return self.store.ingest_temp_file(self._path, cuts, expected_digest)
        except DigestMismatch as exc:  # named by the ref its writer knows, not by its file
            raise DigestMismatch(str(exc).replace(str(self._path), f"ingest {self.ref}")) from None
        finally:
            self._drop_marks()
            self.close()

    def commit_assembled(self, digest: str, chunks: Sequence[Chunk], sha256: bytes) -> IngestResult:
        """Move in bytes assembled from verified chunks, with the sha256 the caller computed as it
        wrote them (see ContentStore.ingest_assembled_file). The ingest ends either way."""
        self._close_direct()
        try:
            return self.store.ingest_assembled_file(self._path, digest, chunks, sha256)
        finally:
            self._drop_marks()
            self.close()

    def abort(self) -> None:
        """Forget the ingest: its files go (ours: we hold the lock of the file at the path)."""
        self._marks_path.unlink(missing_ok=True)
        self._path.unlink(missing_ok=True)
        self.close()

    def _drop_marks(self) -> None:
        """Remove the marks file if it is still ours: once the bytes have left their path (moved
        in by a commit), another writer of the same ref may have made its own."""
        if self._marks_fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._marks_path).st_ino == os.fstat(self._marks_fd).st_ino:
                self._marks_path.unlink()

    def close(self) -> None:
        """Close the ingest and keep what it wrote, for the next writer of the same ref."""
        self._close_direct()
        if self._marks_fd >= 0:
            os.close(self._marks_fd)
            self._marks_fd = -1
        if self.fd >= 0:
            os.close(self.fd)  # and with it the lock
            self.fd = -1

    def _close_direct(self) -> None:
        if self._direct_fd is not None and self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = None

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _allocate(fd: int, size: int) -> None:
    """Allocate the file's blocks up front: pieces written into allocated blocks cost the
    filesystem less (about 1.6x faster pwrite on ext4 than into a sparse file), and a full disk
    shows now rather than half way. A filesystem without fallocate keeps the sparse file."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
