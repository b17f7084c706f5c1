"""The scrub: the whole store read again against its chunk indexes, slowly and without end, so that a
byte that rots on disk is found before a reader needs it.

It runs in every clowderd whose roles keep a store (storage, worker). A pass reads every stored copy of
every blob (what fsck reads, less the sha256: the chunk ids cover every byte) at the store's size
divided by `[store] scrub_interval_seconds` bytes per second, so a pass takes about that long and
the disk is never busy with it for long at a time; the next pass starts when the interval since the
start of this one is up. A corrupt blob is quarantined and logged as a read would do it
(ContentStore.quarantine). Where it is in a pass is saved every PROGRESS_SECONDS and when clowderd
stops, so a restarted clowderd goes on from there rather than starting over; a finished pass is saved
as the store's last check (fsck.save_last), which `clowderctl fsck --last` prints and a worker's
heartbeat carries.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clowderd.errors import NotFound, StoreError
from clowderd.files import write_private
from clowderd.store import fsck
from clowderd.store.content import BlobInfo, ContentStore
from clowderd.store.protocols import Manager
from clowderd.store.verify import stored_copies

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger("clowderd.store.scrub")

PROGRESS_FILE = "scrub-progress.json"  # in the store's root
PROGRESS_SECONDS = 60.0


@dataclass
class Progress:
    """A pass under way: when it started, the last blob it finished (by digest, the order it reads
    them in) and what it has read so far."""
    started: float
    after: str = ""
    blobs_checked: int = 0
    bytes_checked: int = 0


class Scrub:
    def __init__(self, store: ContentStore, interval_seconds: float):
        self.store = store
        self.interval = interval_seconds
        self._path = store.root / PROGRESS_FILE

    async def run(self) -> None:
        """Scrub the store until cancelled."""
        while True:
            report = await self.run_pass()
            await asyncio.sleep(max(0.0, self.interval - (time.time() - report.started)))

    async def run_pass(self) -> fsck.FsckReport:
        """One pass, or the rest of the one a stopped clowderd left; saved as the store's last check."""
        progress = await asyncio.to_thread(self._load_progress)
        blobs, quarantined = await asyncio.to_thread(_listing, self.store)
        rate = max(sum(b.size for b in blobs), 1) / self.interval
        log.debug("scrub pass", extra={"resumed_after": progress.after or None, "blobs": len(blobs),
                                      "bytes_per_second": round(rate)})
        pace = _Pace(rate)
        saved = time.monotonic()
        try:
            for info in blobs:
                if info.digest <= progress.after:
                    continue
                if info.digest not in quarantined:
                    progress.bytes_checked += await self._check(info, pace)
                progress.blobs_checked += 1
                progress.after = info.digest
                if time.monotonic() - saved >= PROGRESS_SECONDS:
                    await asyncio.to_thread(self._save_progress, progress)
                    saved = time.monotonic()
        except asyncio.CancelledError:
            self._save_progress(progress)  # clowderd is stopping: the next one goes on from here
            raise
        report = fsck.FsckReport(progress.blobs_checked, progress.bytes_checked, kind="scrub",
                                 started=progress.started)
        report.problems = await asyncio.to_thread(fsck.quarantine_problems, self.store)
        report.finished = time.time()
        await asyncio.to_thread(self._finish, report)
        log.info("scrub pass finished", extra={"blobs": report.blobs_checked, "bytes": report.bytes_checked,
                                               "quarantined": [p.digest for p in report.problems]})
        return report

    async def _check(self, info: BlobInfo, pace: "_Pace") -> int:
        """Read every stored copy of the blob a run at a time, each run when the pace allows it; returns
        the bytes read. Stops at the first corrupt run (the store has quarantined the blob and logged
        it) or when the blob is gone (gc removed it since the pass listed it)."""
        read = 0
        try:
            for copy in await asyncio.to_thread(stored_copies, self.store, info, "scrub"):
                for i, j in copy.runs():
                    n = copy.chunks[j - 1][0] + copy.chunks[j - 1][1] - copy.chunks[i][0]
                    await pace.wait(n)
                    await asyncio.to_thread(copy.read, i, j)
                    read += n
        except NotFound:  # Quarantined too
            pass
        return read

    def _load_progress(self) -> Progress:
        try:
            return Progress(**json.loads(self._path.read_text()))
        except FileNotFoundError:
            return Progress(started=time.time())
        except (OSError, ValueError, TypeError) as exc:
            log.warning("scrub progress unreadable: starting a pass", extra={"file": str(self._path),
                                                                             "error": str(exc)})
            return Progress(started=time.time())

    def _save_progress(self, progress: Progress) -> None:
        try:
            write_private(self._path, json.dumps(dataclasses.asdict(progress)))
        except OSError as exc:
            log.warning("cannot save the scrub's progress", extra={"file": str(self._path), "error": str(exc)})

    def _finish(self, report: fsck.FsckReport) -> None:
        try:
            fsck.save_last(self.store, report)
            self._path.unlink(missing_ok=True)
        except (OSError, StoreError) as exc:
            log.warning("cannot save the scrub's report", extra={"error": str(exc)})


def _listing(store: Manager) -> tuple[list[BlobInfo], set[str]]:
    """What a pass reads: every blob, by digest; and which of them are in quarantine (not read)."""
    return store.blobs(), {q.digest for q in store.quarantined()}


class _Pace:
    """Reads at `rate` bytes per second: each read waits until the bytes before it and its own are due,
    so that a freshly started clowderd does not begin with a burst of reading."""

    def __init__(self, rate: float):
        self.rate = rate
        self.start = time.monotonic()
        self.due = 0

    async def wait(self, n: int) -> None:
        self.due += n
        ahead = self.due / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            await asyncio.sleep(ahead)


def run_in(process: "Process", store: ContentStore, role: str) -> None:
    """Scrub the store in the background of clowderd, unless [store] scrub_interval_seconds is 0. Each
    role that keeps a store calls it; one scrub runs per process, the storage role's when it has one."""
    config = process.config
    if config.store_scrub_interval_seconds and (role == "storage" or "storage" not in config.roles):
        process.run_in_background(Scrub(store, config.store_scrub_interval_seconds).run, "scrub of the store")
