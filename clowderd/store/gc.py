"""Garbage collection: remove what no name and no view references any more.

Roots are tags, model views, manifests pushed into a registry repository (kept until deleted
through the registry API, as a registry does), and blobs pushed in the last day (their manifest may
still be on its way). A manifest is live if a root names it; a blob is live if a live
manifest references it; a chunk is live if a live blob's chunk index lists it. A file that is to
go but still holds live chunks (the whole file of a removed base whose chunks a fine-tune points
into, or a mostly dead pack) first has those chunks copied into a new pack. Rows are committed
before files are unlinked, so a crash leaves only unreferenced files, which the next run removes.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from clowderd.store.content import ContentStore, unpack_chunk_index

# A pack whose live chunks fill less than this share of it is rewritten.
REPACK_BELOW_LIVE_SHARE = 0.5

# A blob pushed into a repository but not (yet) referenced by a manifest is kept this long.
UPLOAD_GRACE_SECONDS = 24 * 3600

# Partial transfers untouched for this long are abandoned; younger ones wait to be resumed.
PARTIAL_MAX_AGE_SECONDS = 7 * 24 * 3600


@dataclass
class GcReport:
    manifests_removed: int = 0
    blobs_removed: int = 0
    chunks_relocated: int = 0
    caches_dropped: int = 0
    files_removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def _live_sets(store: ContentStore) -> tuple[set[str], set[str]]:
    db = store.db
    manifests = {r[0] for r in db.execute(
        "SELECT manifest FROM tags UNION SELECT manifest FROM views UNION SELECT manifest FROM repository_manifests")}
    # A blob pushed into a repository waits for the manifest that will reference it, for a while.
    blobs = set(manifests) | {r[0] for r in db.execute(
        "SELECT rb.blob FROM repository_blobs rb JOIN blobs b ON b.digest = rb.blob WHERE b.created > ?",
        (time.time() - UPLOAD_GRACE_SECONDS,))}
    for m in manifests:
        blobs.update(r[0] for r in db.execute("SELECT blob FROM manifest_blobs WHERE manifest = ?", (m,)))
    return manifests, blobs


def collect(store: ContentStore, dry_run: bool = False) -> GcReport:
    report = GcReport()
    with store.exclusive_lock():
        db = store.db
        live_manifests, live_blobs = _live_sets(store)
        all_manifests = {r[0] for r in db.execute("SELECT digest FROM manifests")}
        dead_manifests = all_manifests - live_manifests
        blob_rows = {r[0]: (r[1], r[2], bool(r[3])) for r in db.execute("SELECT digest, size, layout, cached FROM blobs")}
        dead_blobs = set(blob_rows) - live_blobs
        live_chunks: set[bytes] = set()
        for digest in live_blobs & set(blob_rows):
            records = db.execute("SELECT records FROM chunk_indexes WHERE digest = ?", (digest,)).fetchone()[0]
            live_chunks.update(cid for _, _, cid in unpack_chunk_index(records))

        # Locations that will disappear: files of dead blobs, and packs mostly dead. The chunk map
        # has no index by location (it would slow every ingest), so gc reads it whole, twice.
        doomed = {f"blob:{d.split(':', 1)[1]}" for d in dead_blobs if blob_rows[d][1] == "file"}
        pack_live_bytes: dict[str, int] = {}
        for cid, location, length in db.execute("SELECT id, location, length FROM chunks WHERE location LIKE 'pack:%'"):
            if cid in live_chunks:
                pack_live_bytes[location] = pack_live_bytes.get(location, 0) + length
        for pack in store.pack_dir.glob("*.pack"):
            location = f"pack:{pack.stem}"
            if pack_live_bytes.get(location, 0) < REPACK_BELOW_LIVE_SHARE * pack.stat().st_size:
                doomed.add(location)
        rescue, doomed_ids = {}, []
        for cid, location, offset, length in db.execute("SELECT id, location, offset, length FROM chunks"):
            if location in doomed:
                doomed_ids.append(cid)
                if cid in live_chunks:
                    rescue[cid] = (location, offset, length)
        report.manifests_removed = len(dead_manifests)
        report.blobs_removed = len(dead_blobs)
        report.chunks_relocated = len(rescue)
        cached_unviewed = _caches_not_in_views(store, live_blobs, blob_rows)
        if dry_run:
            report.caches_dropped = len(cached_unviewed)
            return report

        new_rows = _write_rescue_pack(store, rescue) if rescue else []
        with store.transaction() as tx:
            tx.executemany(
                "UPDATE chunks SET location = ?, offset = ?, length = ? WHERE id = ?",
                ((loc, off, length, cid) for cid, loc, off, length in new_rows),
            )
            rescued = set(rescue)
            tx.executemany("DELETE FROM chunks WHERE id = ?", ((cid,) for cid in doomed_ids if cid not in rescued))
            dead_ids = [r[0] for r in tx.execute("SELECT id FROM chunks") if r[0] not in live_chunks]
            tx.executemany("DELETE FROM chunks WHERE id = ?", ((cid,) for cid in dead_ids))
            tx.executemany("DELETE FROM manifests WHERE digest = ?", ((d,) for d in dead_manifests))
            tx.executemany("DELETE FROM blobs WHERE digest = ?", ((d,) for d in dead_blobs))
            tx.executemany("UPDATE blobs SET cached = 0 WHERE digest = ?", ((d,) for d in cached_unviewed))
        report.caches_dropped = len(cached_unviewed)
        _remove_unreferenced_files(store, report)
    return report


def _caches_not_in_views(store: ContentStore, live_blobs: set[str], blob_rows: dict) -> set[str]:
    in_views: set[str] = set()
    for (m,) in store.db.execute("SELECT manifest FROM views"):
        in_views.update(r[0] for r in store.db.execute("SELECT blob FROM manifest_blobs WHERE manifest = ?", (m,)))
    return {d for d in live_blobs & set(blob_rows) if blob_rows[d][1] == "chunks" and blob_rows[d][2]} - in_views


def _write_rescue_pack(store: ContentStore, rescue: dict) -> list[tuple[bytes, str, int, int]]:
    """Copy live chunks out of doomed files into one new pack; returns updated chunk-map rows."""
    name = secrets.token_hex(16)
    tmp = store.tmp_dir / f"{name}.gcpack"
    rows = []
    with open(tmp, "xb") as out:
        pos = 0
        for cid, (location, offset, length) in sorted(rescue.items(), key=lambda kv: kv[1]):
            with open(store.location_path(location), "rb") as src:
                data = os.pread(src.fileno(), length, offset)
            out.write(data)
            rows.append((cid, f"pack:{name}", pos, length))
            pos += length
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o444)
    os.replace(tmp, store.pack_dir / f"{name}.pack")
    return rows


def _remove_unreferenced_files(store: ContentStore, report: GcReport) -> None:
    """Unlink every file the index no longer references: blob files, packs, temp files, views."""
    db = store.db
    keep_blobs = {r[0].split(":", 1)[1] for r in db.execute("SELECT digest FROM blobs WHERE layout = 'file' OR cached = 1")}
    keep_packs = {r[0].split(":", 1)[1] for r in db.execute("SELECT DISTINCT location FROM chunks WHERE location LIKE 'pack:%'")}
    keep_views = {r[0] for r in db.execute("SELECT name FROM views")}

    def remove(path: Path) -> None:
        """Remove a file or a whole directory, counting the bytes that go with it: those of files
        with no other hard link (a view's files are links to blobs)."""
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        report.bytes_freed += sum(st.st_size for st in map(os.stat, files) if st.st_nlink == 1)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        report.files_removed.append(str(path.relative_to(store.root)))

    now = time.time()
    doomed = [p for p in store.blob_dir.iterdir() if p.name not in keep_blobs]
    doomed += [p for p in store.pack_dir.glob("*.pack") if p.stem not in keep_packs]
    doomed += list(store.tmp_dir.iterdir())
    doomed += [p for p in store.partial_dir.iterdir() if now - p.stat().st_mtime > PARTIAL_MAX_AGE_SECONDS]
    doomed += [p for p in store.view_dir.iterdir() if p.name not in keep_views]
    for path in doomed:
        remove(path)
