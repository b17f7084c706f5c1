"""The store's index: one SQLite database (WAL) per node, beside the blob files it describes.

The files under blobs/ and packs/ are the data; this database says which of them exist as far as
users are concerned. Every write creates its files first (fsynced, renamed into place) and commits
the rows last, so a crash leaves at worst unreferenced files, which gc removes, never a row that
points at a missing or partial file.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from clowderd.errors import StoreError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per blob the store holds. A blob lives either as a whole file under blobs/ ('file'),
-- or only as chunks in other files ('chunks'); a chunked blob may also have a materialized copy
-- under blobs/ ('cached' = 1) that can be dropped and rebuilt at any time.
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    layout      TEXT NOT NULL CHECK (layout IN ('file', 'chunks')),
    cached      INTEGER NOT NULL DEFAULT 0,
    chunk_count INTEGER NOT NULL,
    created     REAL NOT NULL
);
-- Each blob's chunk index: packed (offset u64, length u32, BLAKE3 id) records in blob order.
CREATE TABLE IF NOT EXISTS chunk_indexes (
    digest  TEXT PRIMARY KEY REFERENCES blobs (digest) ON DELETE CASCADE,
    records BLOB NOT NULL
);
-- The node-wide chunk map: where the bytes of each known chunk can be read.
-- location is 'blob:<sha256 hex>' (a whole blob file) or 'pack:<name>' (a pack file).
CREATE TABLE IF NOT EXISTS chunks (
    id       BLOB PRIMARY KEY,
    location TEXT NOT NULL,
    offset   INTEGER NOT NULL,
    length   INTEGER NOT NULL
) WITHOUT ROWID;
-- Manifests and the blobs they reference (config, layers), for reference counting.
CREATE TABLE IF NOT EXISTS manifests (
    digest        TEXT PRIMARY KEY,
    artifact_type TEXT NOT NULL,
    created       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifest_blobs (
    manifest TEXT NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
    blob     TEXT NOT NULL,
    PRIMARY KEY (manifest, blob)
) WITHOUT ROWID;
-- Names: 'repository:tag' -> manifest.
CREATE TABLE IF NOT EXISTS tags (
    name     TEXT PRIMARY KEY,
    manifest TEXT NOT NULL REFERENCES manifests (digest),
    updated  REAL NOT NULL
);
-- OCI repositories of the storage role's registry: the blobs pushed or mounted into each
-- repository, and the manifests pushed into it (with the media type they were pushed as and the
-- subject they refer to, for the referrers API). Tags of a repository are rows of `tags` named
-- 'repository:tag'. Added in schema version 1 without a bump: old stores get the tables empty.
CREATE TABLE IF NOT EXISTS repository_blobs (
    repository TEXT NOT NULL,
    blob       TEXT NOT NULL REFERENCES blobs (digest) ON DELETE CASCADE,
    PRIMARY KEY (repository, blob)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repository_manifests (
    repository TEXT NOT NULL,
    manifest   TEXT NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
    media_type TEXT NOT NULL,
    subject    TEXT,
    PRIMARY KEY (repository, manifest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repository_manifests_by_subject ON repository_manifests (subject);
-- Blobs whose stored bytes a read, the scrub or fsck found corrupt (ContentStore.quarantine): not
-- served until the same content is ingested again, which repairs them and removes the row. Added in
-- schema version 1 without a bump: old stores get the table empty.
CREATE TABLE IF NOT EXISTS quarantine (
    digest   TEXT PRIMARY KEY REFERENCES blobs (digest) ON DELETE CASCADE,
    reason   TEXT NOT NULL,     -- which chunk of which file, at which offset, and what is wrong with it
    found_by TEXT NOT NULL,     -- what read it: oci-get, fetch-chunks, view, scrub, fsck, materialize
    found    REAL NOT NULL
);
-- Model views handed to engines; each holds its manifest's blobs alive.
CREATE TABLE IF NOT EXISTS views (
    name     TEXT PRIMARY KEY,
    manifest TEXT NOT NULL REFERENCES manifests (digest),
    created  REAL NOT NULL
);
"""


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the index database at path."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    # Stores made before the chunk map lost its index by location (each ingest paid for it; only
    # gc looked rows up by location, and it reads the map whole anyway).
    conn.execute("DROP INDEX IF EXISTS chunks_by_location")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) != SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema version {row[0]}, this clowder reads version {SCHEMA_VERSION}")
    return conn
