"""What code outside the store may do with it, as three small interfaces after containerd's content
store. ContentStore is all three; a caller names in its type hints the one it needs, so that what it
relies on is visible, and it never reaches into the store's tables (clowderd.store.db): those are the
store's own business, and change with it.

- Provider: read what is stored (blobs, their chunk indexes, chunks by id), and report bytes that
  turn out corrupt when read.
- Ingester: add content, checked against its digest before it becomes visible.
- Manager: list what is stored and account for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Protocol, Sequence

from clowderd.errors import Quarantined
from clowderd.store.content import BlobInfo, Chunk, Corruption, IngestResult, QuarantineRecord, Usage


class Provider(Protocol):
    def info(self, digest: str) -> BlobInfo: ...

    def exists(self, digest: str) -> bool: ...

    def chunk_index(self, digest: str) -> list[Chunk]: ...

    def read_bytes(self, digest: str) -> bytes: ...

    def open(self, digest: str) -> BinaryIO: ...

    def path(self, digest: str) -> Path: ...

    def blob_path(self, digest: str) -> Path: ...

    def read_chunk(self, chunk_id: bytes) -> bytes: ...

    def chunk_locations(self, ids: Sequence[bytes]) -> dict[bytes, tuple[str, int, int]]: ...

    def known_chunks(self, ids: Sequence[bytes]) -> set[bytes]: ...

    def location_path(self, location: str) -> Path: ...

    def quarantine(self, corruption: Corruption, found_by: str) -> Quarantined: ...


class Ingester(Protocol):
    tmp_dir: Path
    partial_dir: Path

    def ingest_file(self, src: Path, cuts: Sequence[int] = (), expected_digest: str | None = None) -> IngestResult: ...

    def ingest_temp_file(self, path: Path, cuts: Sequence[int] = (),
                         expected_digest: str | None = None) -> IngestResult: ...

    def ingest_assembled_file(self, path: Path, digest: str, chunks: Sequence[Chunk],
                              sha256: bytes) -> IngestResult: ...

    def ingest_bytes(self, data: bytes, expected_digest: str | None = None) -> IngestResult: ...

    def temp_file(self, suffix: str) -> Path: ...

    def check_free_space(self, size: int, what: str) -> None: ...


class Manager(Protocol):
    def blobs(self) -> list[BlobInfo]: ...

    def usage(self) -> Usage: ...

    def quarantined(self) -> list[QuarantineRecord]: ...
