"""The scrub: the whole store read again in the background, at the rate its interval gives, a corrupt
blob quarantined as a read would do it; its last pass reported by `clowderctl fsck --last` and in a
worker's node description."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from clowderd.store import fsck
from clowderd.store.content import ContentStore
from clowderd.store.scrub import PROGRESS_FILE, Scrub
from tests.cluster_fixtures import clowderctl, start_worker, wait_for
from tests.clowderd_proc import REPO_ROOT
from tests.store_fixtures import flip_byte
from tests.test_controller_deployments import start_controller


def blobs_in(store, *sizes: int) -> list[str]:
    """Random blobs of these sizes in the store; their digests, in the order a pass reads them."""
    return sorted(store.ingest_bytes(os.urandom(size)).info.digest for size in sizes)


def test_a_pass_reads_every_blob_at_the_rate_its_interval_gives_and_saves_the_report(store):
    blobs_in(store, 300_000, 600_000, 900_000)
    t0 = time.monotonic()
    report = asyncio.run(Scrub(store, interval_seconds=1.5).run_pass())
    assert time.monotonic() - t0 >= 1.4  # 1.8 MB at 1.2 MB/s
    assert (report.kind, report.blobs_checked, report.bytes_checked, report.problems) == ("scrub", 3, 1_800_000, [])
    assert fsck.load_last(store.root) == report
    assert not (store.root / PROGRESS_FILE).exists()


def test_a_pass_quarantines_a_corrupt_blob_as_a_read_would(store, caplog):
    digests = blobs_in(store, 200_000, 200_000)
    flip_byte(store.blob_path(digests[1]), 100)
    with caplog.at_level(logging.ERROR, logger="clowderd.store"):
        report = asyncio.run(Scrub(store, interval_seconds=0.1).run_pass())
    assert [p.digest for p in report.problems] == [digests[1]]
    assert report.problems[0].what.endswith("(quarantined by scrub)")
    assert [(r.digest, r.found_by) for r in caplog.records if r.getMessage() == "corrupt blob quarantined"] == [
        (digests[1], "scrub")]
    assert not store.exists(digests[1]) and store.exists(digests[0])


def test_a_pass_goes_on_after_the_last_blob_a_stopped_one_finished(store):
    digests = blobs_in(store, 100_000, 200_000, 300_000)
    flip_byte(store.blob_path(digests[0]), 100)  # read before the stop: not read again
    started = time.time() - 3600
    (store.root / PROGRESS_FILE).write_text(json.dumps(
        {"started": started, "after": digests[0], "blobs_checked": 1, "bytes_checked": 7}))
    report = asyncio.run(Scrub(store, interval_seconds=0.1).run_pass())
    rest = sum(store.info(d).size for d in digests[1:])
    assert (report.started, report.blobs_checked, report.bytes_checked, report.problems) == (started, 3, 7 + rest, [])


def test_clowderd_scrubs_its_store_and_reports_the_pass_in_fsck_last_and_the_node_description(
        clowderd, tmp_path_factory):
    worker_data = tmp_path_factory.mktemp("worker") / "data"
    store = ContentStore(worker_data / "store")
    good, bad = blobs_in(store, 100_000, 100_000)
    flip_byte(store.blob_path(bad), 100)
    store.close()
    controller = start_controller(clowderd, tmp_path_factory.mktemp("controller") / "data",
                                  store={"scrub_interval_seconds": 0.5})
    worker = start_worker(clowderd, controller, "w1", data_dir=str(worker_data), store={"scrub_interval_seconds": 0.5})

    def described() -> str:
        out = clowderctl(controller, "node", "describe", "w1", check=False).stdout
        return out if f"quarantined {bad}" in out else ""

    out = wait_for("w1's heartbeat to report the quarantined blob", described, timeout=60)
    assert "Store check:    scrub finished" in out and "2 blobs" in out and "1 quarantined" in out
    [row] = [r for r in worker.log_records() if r["msg"] == "corrupt blob quarantined"]
    assert (row["digest"], row["found_by"], row["path"]) == (bad, "scrub", str(worker_data / "store" / "blobs"
                                                                               / "sha256" / bad[7:]))
    last = subprocess.run([sys.executable, "-m", "clowderctl.main", "--data-dir", str(worker_data), "fsck", "--last"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert last.returncode == 1 and last.stdout.startswith("last check: scrub, finished ")
    assert f"CORRUPT {bad}: chunk " in last.stdout and "(quarantined by scrub)" in last.stdout
    wait_for("the storage role's scrub of its own store", lambda: fsck.load_last(controller.data_dir / "store"))


def test_a_pass_stopped_with_clowderd_is_saved_and_the_next_start_goes_on_with_it(store, caplog):
    digests = blobs_in(store, 100_000, 100_000, 100_000)

    async def stop_the_pass() -> None:
        task = asyncio.create_task(Scrub(store, interval_seconds=3600).run_pass())  # its first read: in 20 min
        deadline = time.monotonic() + 30
        while not any(r.getMessage() == "scrub pass" for r in caplog.records):  # under way
            assert time.monotonic() < deadline, "the pass did not start"
            await asyncio.sleep(0.01)
        task.cancel()  # as Process.shutdown cancels background tasks
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.DEBUG, logger="clowderd.store.scrub"):
        asyncio.run(stop_the_pass())
    saved = json.loads((store.root / PROGRESS_FILE).read_text())
    report = asyncio.run(Scrub(store, interval_seconds=0.1).run_pass())
    assert (report.started, report.blobs_checked) == (saved["started"], len(digests))  # the same pass
    assert not (store.root / PROGRESS_FILE).exists()
