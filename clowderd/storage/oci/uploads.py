"""Blob upload sessions: bytes arrive in order into a file under the store's partial/ directory,
and only a completed upload whose digest checks out is moved into the store.

A session lives in memory; its file is ``partial/oci-upload-<id>``. Sessions idle for longer than
``expiry_seconds`` are dropped with their file; at shutdown (and at start, for files a crashed
process left) every session file goes. The store itself never holds a partial blob: the digest is
checked while the file is moved in (ContentStore.ingest_temp_file), which consumes the file either way.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from clowderd.aimage.safetensors import read_header, tensor_boundaries
from clowderd.errors import DigestMismatch, InvalidInput, StoreError
from clowderd.store.content import IngestResult
from clowderd.store.protocols import Ingester
from clowderd.storage.oci.errors import OCIError

DEFAULT_EXPIRY_SECONDS = 3600.0
MAX_SESSIONS = 1024  # open uploads at once; more get 429 TOO_MANY_REQUESTS
FILE_PREFIX = "oci-upload-"


@dataclass
class UploadSession:
    id: str
    repository: str
    path: Path
    size: int = 0
    touched: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def safetensors_cuts(path: Path) -> Sequence[int]:
    """Tensor boundaries of a completed upload that is a safetensors file, else none: blobs
    arrive before the manifest that says what they are, so the content is asked instead."""
    try:
        return tensor_boundaries(read_header(path))
    except InvalidInput:
        return ()


class UploadSessions:
    def __init__(self, store: Ingester, expiry_seconds: float = DEFAULT_EXPIRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.expiry_seconds = expiry_seconds
        self.clock = clock
        self._sessions: dict[str, UploadSession] = {}
        for stale in store.partial_dir.glob(FILE_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self, repository: str) -> UploadSession:
        if len(self._sessions) >= MAX_SESSIONS:
            self.expire()
        if len(self._sessions) >= MAX_SESSIONS:
            raise OCIError("TOO_MANY_REQUESTS", f"{MAX_SESSIONS} uploads are open on this node; finish or cancel "
                           "some, or retry later", headers={"Retry-After": "10"})
        session_id = secrets.token_hex(16)
        path = self.store.partial_dir / f"{FILE_PREFIX}{session_id}"
        path.touch(mode=0o600, exist_ok=False)
        session = UploadSession(session_id, repository, path, touched=self.clock())
        self._sessions[session_id] = session
        return session

    def get(self, repository: str, session_id: str) -> UploadSession:
        session = self._sessions.get(session_id)
        if session is None or session.repository != repository:
            raise OCIError("BLOB_UPLOAD_UNKNOWN", f"upload {session_id} is unknown in repository {repository} "
                           "(never started, finished, cancelled or expired)", detail={"uuid": session_id})
        session.touched = self.clock()
        return session

    def discard(self, session: UploadSession) -> None:
        self._sessions.pop(session.id, None)
        session.path.unlink(missing_ok=True)

    def expire(self) -> int:
        """Drop the sessions idle past the expiry; returns how many."""
        cutoff = self.clock() - self.expiry_seconds
        stale = [s for s in self._sessions.values() if s.touched < cutoff and not s.lock.locked()]
        for session in stale:
            self.discard(session)
        return len(stale)

    def close(self) -> None:
        for session in list(self._sessions.values()):
            self.discard(session)

    async def append(self, session: UploadSession, body: AsyncIterator[bytes], start: int | None,
                     length: int | None) -> None:
        """Write a request body at the end of the upload. start (from Content-Range) must be the
        current size; length, when the client declared one, must match what arrives. On any
        failure the file is cut back to where it was: a chunk is taken whole or not at all."""
        if start is not None and start != session.size:
            raise OCIError("BLOB_UPLOAD_INVALID", f"chunk starts at byte {start}, the upload has {session.size} bytes; "
                           "chunks must be sent in order", status=416,
                           headers={"Range": range_header(session.size), "Docker-Upload-UUID": session.id})
        before = session.size
        if length:
            await asyncio.to_thread(self.store.check_free_space, length, f"upload {session.id}")
        fd = os.open(session.path, os.O_WRONLY | os.O_APPEND)
        written = 0
        try:
            async for chunk in body:
                if chunk:
                    os.write(fd, chunk)
                    written += len(chunk)
            if length is not None and written != length:
                raise OCIError("SIZE_INVALID", f"the body has {written} bytes, Content-Length or Content-Range "
                               f"said {length}", detail={"received": written, "declared": length})
        except OSError as exc:
            os.ftruncate(fd, before)
            raise OCIError("UNKNOWN", f"cannot write upload {session.id}: {exc.strerror}") from None
        except BaseException:
            os.ftruncate(fd, before)
            raise
        finally:
            os.close(fd)
        session.size = before + written
        session.touched = self.clock()

    async def finish(self, session: UploadSession, digest: str) -> IngestResult:
        """Move the completed upload into the store if it hashes to digest. The session ends
        either way (a wrong digest means the bytes are wrong; the client starts again)."""
        self._sessions.pop(session.id, None)
        try:
            cuts = await asyncio.to_thread(safetensors_cuts, session.path)
            return await asyncio.to_thread(self.store.ingest_temp_file, session.path, cuts, digest)
        except DigestMismatch as exc:
            raise OCIError("DIGEST_INVALID", str(exc).replace(str(session.path), f"upload {session.id}"),
                           detail={"digest": digest}) from None
        except StoreError as exc:
            raise OCIError("UNKNOWN", str(exc)) from None
        finally:
            session.path.unlink(missing_ok=True)


def range_header(size: int) -> str:
    """The upload's Range header: the inclusive range of bytes received ('0-0' when none)."""
    return f"0-{max(size - 1, 0)}"
