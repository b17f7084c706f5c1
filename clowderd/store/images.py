"""Manifests and the names that point at them ('repository:tag'), on top of the content store.

The store treats a manifest generically, as an OCI image manifest: it needs only the digests the
manifest references, to keep them alive. What the layers mean is clowderd.aimage's business.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from clowderd.aimage.reference import parse_reference
from clowderd.errors import InvalidInput, NotFound
from clowderd.store.content import ContentStore, parse_digest


@dataclass(frozen=True)
class ImageRecord:
    name: str
    manifest: str
    size: int  # bytes of the config and every layer: what a copy of the image holds
    updated: float


def referenced_digests(manifest: bytes, source: str) -> list[str]:
    """The digests an OCI image manifest references: its config and its layers."""
    try:
        doc = json.loads(manifest)
        digests = [doc["config"]["digest"]] + [layer["digest"] for layer in doc.get("layers", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{source}: not an OCI image manifest ({exc})") from exc
    for d in digests:
        parse_digest(d)
    return digests


def normalize_name(name: str) -> str:
    """'smollm2' -> 'smollm2:latest'; a digest in the name is refused (tags name manifests)."""
    ref = parse_reference(name)
    if ref.digest:
        raise InvalidInput(f"{name!r}: a tag cannot contain a digest")
    repo = f"{ref.registry}/{ref.repository}" if ref.registry else ref.repository
    return f"{repo}:{ref.tag_or_default}"


class ImageIndex:
    def __init__(self, store: ContentStore):
        self.store = store

    @property
    def db(self):
        return self.store.db

    def add_manifest(self, manifest: bytes, artifact_type: str) -> str:
        """Store a manifest whose referenced blobs are all present; returns its digest."""
        refs = referenced_digests(manifest, "manifest")
        missing = [d for d in refs if not self.store.exists(d)]
        if missing:
            raise NotFound(f"manifest references blobs the store does not have: {', '.join(missing)}")
        digest = self.store.ingest_bytes(manifest).info.digest
        with self.store.transaction() as tx:
            tx.execute(
                "INSERT OR IGNORE INTO manifests (digest, artifact_type, created) VALUES (?, ?, ?)",
                (digest, artifact_type, time.time()),
            )
            tx.executemany(
                "INSERT OR IGNORE INTO manifest_blobs (manifest, blob) VALUES (?, ?)",
                ((digest, d) for d in [digest, *refs]),
            )
        return digest

    def tag(self, name: str, manifest_digest: str) -> str:
        name = normalize_name(name)
        if self.db.execute("SELECT 1 FROM manifests WHERE digest = ?", (manifest_digest,)).fetchone() is None:
            raise NotFound(f"manifest {manifest_digest} is not in the store")
        with self.store.transaction() as tx:
            tx.execute(
                "INSERT INTO tags (name, manifest, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET manifest = excluded.manifest, updated = excluded.updated",
                (name, manifest_digest, time.time()),
            )
        return name

    def resolve(self, ref: str) -> str:
        """The manifest digest for 'name[:tag]', 'name@sha256:...', or a bare digest (or a
        unique prefix of one of at least 12 hex characters, as shown by `images`)."""
        if ref.startswith("sha256:"):
            return self._resolve_digest(ref)
        if "@" in ref:
            digest = parse_reference(ref).digest
            return self._resolve_digest(digest)
        row = self.db.execute("SELECT manifest FROM tags WHERE name = ?", (normalize_name(ref),)).fetchone()
        if row is None:
            raise NotFound(f"image {ref!r} not found; `clowderctl images` lists what this node has")
        return row[0]

    def _resolve_digest(self, digest: str) -> str:
        rows = self.db.execute(
            "SELECT digest FROM manifests WHERE digest LIKE ? ESCAPE '\\'", (digest.replace("_", "\\_") + "%",)
        ).fetchall()
        if len(rows) == 1 and (len(digest) >= len("sha256:") + 12 or rows[0][0] == digest):
            return rows[0][0]
        if len(rows) > 1:
            raise InvalidInput(f"{digest!r} matches {len(rows)} manifests; give more of the digest")
        raise NotFound(f"manifest {digest} is not in the store")

    def manifest_bytes(self, digest: str) -> bytes:
        return self.store.read_bytes(digest)

    def images(self) -> list[ImageRecord]:
        rows = self.db.execute(
            """SELECT t.name, t.manifest, t.updated,
                      (SELECT coalesce(sum(b.size), 0) FROM manifest_blobs mb JOIN blobs b ON b.digest = mb.blob
                        WHERE mb.manifest = t.manifest AND mb.blob != t.manifest)
               FROM tags t ORDER BY t.name"""
        )
        return [ImageRecord(name, manifest, size, updated) for name, manifest, updated, size in rows]

    def untag(self, name: str) -> str:
        """Remove a name; the content stays until gc finds nothing else references it."""
        key = normalize_name(name)
        row = self.db.execute("SELECT manifest FROM tags WHERE name = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"image {name!r} not found; `clowderctl images` lists what this node has")
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM tags WHERE name = ?", (key,))
        return row[0]

    def image_blobs(self, manifest_digest: str) -> list[str]:
        rows = self.db.execute("SELECT blob FROM manifest_blobs WHERE manifest = ?", (manifest_digest,))
        return [r[0] for r in rows]
