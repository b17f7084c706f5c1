"""fsck: re-hash everything the store holds and name what is corrupt or missing.

Every stored copy of every blob (its own file; for a chunked blob also its chunks from wherever the
chunk map says they are) is read chunk by chunk against the blob's chunk index, then hashed whole
against its sha256 digest. A blob found corrupt is quarantined (ContentStore.quarantine), as a read
would; a blob in quarantine is named with what was found then. The report names every bad blob and
the images that use it.

The last report of a whole check of the store, by fsck or by a pass of the scrub (scrub.py), is kept in
the store's root (save_last, load_last): `clowderctl fsck --last` prints it and a worker's heartbeat
carries it, without checking anything again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from clowderd.errors import Quarantined, StoreError
from clowderd.files import write_private
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
    problems: list[Problem] = field(default_factory=list)  # every blob in quarantine when it finished
    kind: str = "fsck"  # or "scrub"
    started: float = 0.0  # Unix time
    finished: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


LAST_REPORT = "last-check.json"  # in the store's root


def check(store: ContentStore) -> FsckReport:
    report = FsckReport(started=time.time())
    with store.shared_lock():
        quarantined = {q.digest for q in store.quarantined()}
        for info in store.blobs():
            report.blobs_checked += 1
            report.bytes_checked += info.size
            if info.digest not in quarantined:
                try:
                    _check_blob(store, info)
                except Quarantined:
                    pass
    report.problems = quarantine_problems(store)
    report.finished = time.time()
    return report


def quarantine_problems(store: ContentStore) -> list[Problem]:
    """Every blob in quarantine, with what was found and the images that use it."""
    index = ImageIndex(store)
    return [Problem(q.digest, f"{q.reason} (quarantined by {q.found_by})", index.names_using(q.digest))
            for q in store.quarantined()]


def save_last(store: ContentStore, report: FsckReport) -> None:
    """Keep report as the last check of the store (replacing the one before, whole)."""
    write_private(store.root / LAST_REPORT, json.dumps(dataclasses.asdict(report), indent=1))


def load_last(store_root: Path) -> FsckReport | None:
    """The last check of the store at store_root; None when none has finished yet."""
    path = Path(store_root) / LAST_REPORT
    try:
        doc = json.loads(path.read_text())
        return FsckReport(**{**doc, "problems": [Problem(**p) for p in doc["problems"]]})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"{path}: cannot read the last check of the store: {exc}") from None


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
            raise store.quarantine(store.content_mismatch(info.digest, copy.path, "sha256:" + h.hexdigest()), "fsck")
