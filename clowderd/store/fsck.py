"""fsck: re-hash everything the store holds and name what is corrupt or missing.

Each whole blob file is checked against its sha256 digest and each of its chunks against its
BLAKE3 id; each chunked blob is checked chunk by chunk from wherever the chunk map says its bytes
are, and then as a whole. The report names every bad blob and the images that use it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from clowderd import _native as native
from clowderd.errors import ClowderError
from clowderd.store.content import ContentStore, file_sha256
from clowderd.store.images import ImageIndex


@dataclass
class Problem:
    digest: str
    what: str
    images: list[str]


@dataclass
class FsckReport:
    blobs_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(store: ContentStore) -> FsckReport:
    report = FsckReport()
    with store.shared_lock():
        for info in store.blobs():
            report.blobs_checked += 1
            report.bytes_checked += info.size
            what = _check_blob(store, info)
            if what:
                report.problems.append(Problem(info.digest, what, ImageIndex(store).names_using(info.digest)))
    return report


def _check_blob(store: ContentStore, info) -> str | None:
    expected = info.digest.split(":", 1)[1]
    if info.has_file:
        path = store.blob_path(info.digest)
        if not path.exists():
            return f"file {path} is missing"
        if path.stat().st_size != info.size:
            return f"file {path} has {path.stat().st_size:,} bytes, expected {info.size:,}"
        actual = file_sha256(path)
        if actual != expected:
            return f"file {path} has digest sha256:{actual}"
    if info.layout == "file":
        return None
    # A chunked blob: every chunk from where the chunk map says it is, then the whole.
    h = hashlib.sha256()
    for offset, length, cid in store.chunk_index(info.digest):
        try:
            data = store.read_chunk(cid)
        except (OSError, ClowderError) as exc:
            return f"chunk {cid.hex()} at offset {offset:,} cannot be read: {exc}"
        if len(data) != length or native.blake3(data) != cid:
            return f"chunk {cid.hex()} at offset {offset:,} is corrupt"
        h.update(data)
    if h.hexdigest() != expected:
        return f"chunks assemble to sha256:{h.hexdigest()}"
    return None
