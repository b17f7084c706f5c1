"""Blob upload sessions: bytes arrive in order into a store ingest, and only a completed upload
whose digest checks out is moved into the store.

A session lives in memory; its bytes are the store ingest ``oci-upload-<id>``, opened for each
request that writes to it. Sessions idle for longer than ``expiry_seconds`` are dropped with their
ingest; at shutdown (and at start, for ingests a crashed process left) every session's ingest goes.
The store itself never holds a partial blob: the digest is checked while the ingest is committed,
which ends it either way.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from clowderd.aimage.safetensors import content_cuts
from clowderd.errors import DigestMismatch, StoreError
from clowderd.store.content import IngestResult
from clowderd.store.protocols import Ingester
from clowderd.store.writer import BlobWriter
from clowderd.storage.oci.errors import OCIError

DEFAULT_EXPIRY_SECONDS = 3600.0
MAX_SESSIONS = 1024  # open uploads at once; more get 429 TOO_MANY_REQUESTS
FILE_PREFIX = "oci-upload-"


@dataclass
class UploadSession:
    id: str
    repository: str
    size: int = 0
    touched: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


    @property
    def ref(self) -> str:
        """The store ingest that holds its bytes."""
        return f"{FILE_PREFIX}{self.id}"


def _commit(ingest: BlobWriter, digest: str) -> IngestResult:
    """Move a completed upload in, cut at its tensor boundaries if it is a safetensors file: blobs
    arrive before the manifest that says what they are, so the content is asked instead."""
    with ingest.reader() as f:
        cuts = content_cuts(f)
    return ingest.commit(digest, cuts)


class UploadSessions:
    def __init__(self, store: Ingester, expiry_seconds: float = DEFAULT_EXPIRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.expiry_seconds = expiry_seconds
        self.clock = clock
        self._sessions: dict[str, UploadSession] = {}
        for stale in store.ingest_statuses():
            if stale.ref.startswith(FILE_PREFIX):
                self._abort(stale.ref)

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self, repository: str) -> UploadSession:
        if len(self._sessions) >= MAX_SESSIONS:
            self.expire()
        if len(self._sessions) >= MAX_SESSIONS:
            raise OCIError("TOO_MANY_REQUESTS", f"{MAX_SESSIONS} uploads are open on this node; finish or cancel "
                           "some, or retry later", headers={"Retry-After": "10"})
        session = UploadSession(secrets.token_hex(16), repository, touched=self.clock())
        self._sessions[session.id] = session
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
        self._abort(session.ref)

    def _abort(self, ref: str) -> None:
        with contextlib.suppress(StoreError):  # another process writes it: not ours to drop
            self.store.abort_ingest(ref)

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
        written = 0
        try:
            with self.store.writer(session.ref) as ingest:
                try:
                    async for chunk in body:
                        if chunk:
                            ingest.write_at(before + written, chunk)
                            written += len(chunk)
                    if length is not None and written != length:
                        raise OCIError("SIZE_INVALID", f"the body has {written} bytes, Content-Length or "
                                       f"Content-Range said {length}", detail={"received": written, "declared": length})
                except BaseException:
                    ingest.truncate(before)
                    raise
        except StoreError as exc:
            raise OCIError("UNKNOWN", f"upload {session.id}: {exc}") from None
        session.size = before + written
        session.touched = self.clock()

    async def finish(self, session: UploadSession, digest: str) -> IngestResult:
        """Move the completed upload into the store if it hashes to digest. The session ends
        either way (a wrong digest means the bytes are wrong; the client starts again)."""
        self._sessions.pop(session.id, None)
        try:
            with self.store.writer(session.ref) as ingest:
                return await asyncio.to_thread(_commit, ingest, digest)
        except DigestMismatch as exc:
            raise OCIError("DIGEST_INVALID", str(exc).replace(f"ingest {session.ref}", f"upload {session.id}"),
                           detail={"digest": digest}) from None
        except StoreError as exc:
            raise OCIError("UNKNOWN", str(exc)) from None


def range_header(size: int) -> str:
    """The upload's Range header: the inclusive range of bytes received ('0-0' when none)."""
    return f"0-{max(size - 1, 0)}"
