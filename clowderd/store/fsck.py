"""fsck: re-hash everything the store holds and name what is corrupt or missing.

Every stored copy of every blob (its own file; for a chunked blob also its chunks from wherever the
chunk map says they are) is read chunk by chunk against the blob's chunk index, then hashed whole
against its sha256 digest. A blob found corrupt is quarantined (ContentStore.quarantine), as a read
would; a blob in quarantine is named with what was found then. The report names every bad blob and
the images that use it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from clowderd.errors import Quarantined
from clowderd.store.content import BlobInfo, ContentStore, Corruption
from clowderd.store.images import ImageIndex
from clowderd.store.verify import stored_copies


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
    index = ImageIndex(store)
    with store.shared_lock():
        quarantined = {q.digest for q in store.quarantined()}
        for info in store.blobs():
            report.blobs_checked += 1
            report.bytes_checked += info.size
            if info.digest not in quarantined:
                try:
                    _check_blob(store, info)
                    continue
                except Quarantined:
                    pass
            record = store.quarantine_record(info.digest)
            report.problems.append(Problem(info.digest, f"{record.reason} (quarantined by {record.found_by})",
                                           index.names_using(info.digest)))
    return report


def _check_blob(store: ContentStore, info: BlobInfo) -> None:
    """Read every stored copy of the blob; Quarantined when one is corrupt."""
    expected = info.digest.split(":", 1)[1]
    for copy in stored_copies(store, info, "fsck"):
        h = hashlib.sha256()
        for i, j in copy.runs():
            h.update(copy.read(i, j))
        if copy.path is not None and (size := copy.path.stat().st_size) != info.size:
            raise store.quarantine(Corruption(info.digest, str(copy.path), 0, None,
                                              f"has {size:,} bytes, expected {info.size:,}"), "fsck")
        if h.hexdigest() != expected:
            where, what = (copy.path, "holds") if copy.path else (store.root / "index.db", "has a chunk index of")
            raise store.quarantine(Corruption(info.digest, str(where), 0, None,
                                              f"{what} content with digest sha256:{h.hexdigest()}"), "fsck")
