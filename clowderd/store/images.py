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
        """Remove a name (and, with its last name in the repository, the manifest from the
        repository); the content stays until gc finds nothing else references it."""
        key = normalize_name(name)
        row = self.db.execute("SELECT manifest FROM tags WHERE name = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"image {name!r} not found; `clowderctl images` lists what this node has")
        repository = key.rpartition(":")[0]
        lo, hi = _tag_range(repository)
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM tags WHERE name = ?", (key,))
            # The last name of a manifest in its repository goes: so does the manifest, there.
            if tx.execute("SELECT 1 FROM tags WHERE name >= ? AND name < ? AND manifest = ?",
                          (lo, hi, row[0])).fetchone() is None:
                tx.execute("DELETE FROM repository_manifests WHERE repository = ? AND manifest = ?",
                           (repository, row[0]))
        return row[0]

    def manifest_digests(self) -> list[str]:
        """Every manifest in the store, tagged or not."""
        return [r[0] for r in self.db.execute("SELECT digest FROM manifests ORDER BY digest")]

    def image_blobs(self, manifest_digest: str) -> list[str]:
        rows = self.db.execute("SELECT blob FROM manifest_blobs WHERE manifest = ?", (manifest_digest,))
        return [r[0] for r in rows]

    def artifact_type(self, manifest_digest: str) -> str | None:
        """The artifact type the manifest was stored with; None when the store has no such manifest."""
        row = self.db.execute("SELECT artifact_type FROM manifests WHERE digest = ?", (manifest_digest,)).fetchone()
        return row[0] if row else None

    def names_using(self, blob_digest: str, prefix: str = "") -> list[str]:
        """The names ('repository:tag') starting with prefix whose image references the blob, sorted."""
        rows = self.db.execute(
            "SELECT DISTINCT t.name FROM tags t JOIN manifest_blobs mb ON mb.manifest = t.manifest "
            "WHERE mb.blob = ? AND substr(t.name, 1, ?) = ? ORDER BY t.name",
            (blob_digest, len(prefix), prefix),
        )
        return [r[0] for r in rows]

    def tagged_repositories(self) -> list[str]:
        """Every repository that has a tag, sorted."""
        return sorted({r[0].rpartition(":")[0] for r in self.db.execute("SELECT name FROM tags")})

    # -- OCI repositories (the storage role's registry) --------------------------------------
    # A repository holds the blobs pushed or mounted into it, the manifests pushed into it, and
    # the manifests its tags ('repository:tag' rows of `tags`, shared with local builds) name.

    def link_blob(self, repository: str, digest: str) -> None:
        with self.store.transaction() as tx:
            tx.execute("INSERT OR IGNORE INTO repository_blobs (repository, blob) VALUES (?, ?)", (repository, digest))

    def unlink_blob(self, repository: str, digest: str) -> bool:
        with self.store.transaction() as tx:
            return tx.execute("DELETE FROM repository_blobs WHERE repository = ? AND blob = ?",
                              (repository, digest)).rowcount > 0

    def repository_has_blob(self, repository: str, digest: str) -> bool:
        """Whether the repository holds the blob and the store serves it (see repository_references_blob)."""
        return self.repository_references_blob(repository, digest) and self.store.exists(digest)

    def repository_references_blob(self, repository: str, digest: str) -> bool:
        """Whether the blob belongs to the repository: pushed or mounted into it, or referenced by one
        of its manifests (a locally built image that a tag of the repository names)."""
        lo, hi = _tag_range(repository)
        row = self.db.execute(
            """SELECT 1 FROM repository_blobs WHERE repository = ? AND blob = ?
               UNION ALL
               SELECT 1 FROM repository_manifests rm JOIN manifest_blobs mb ON mb.manifest = rm.manifest
                WHERE rm.repository = ? AND mb.blob = ?
               UNION ALL
               SELECT 1 FROM tags t JOIN manifest_blobs mb ON mb.manifest = t.manifest
                WHERE t.name >= ? AND t.name < ? AND mb.blob = ?
               LIMIT 1""",
            (repository, digest, repository, digest, lo, hi, digest),
        ).fetchone()
        return row is not None

    def repository_manifest(self, repository: str, reference: str) -> tuple[str, str | None] | None:
        """(digest, media type it was pushed as, None for a local build) of the manifest that
        reference (a tag or a digest) names in the repository; None when there is none."""
        if ":" not in reference:
            row = self.db.execute(
                """SELECT t.manifest, rm.media_type FROM tags t LEFT JOIN repository_manifests rm
                     ON rm.manifest = t.manifest AND rm.repository = ? WHERE t.name = ?""",
                (repository, f"{repository}:{reference}"),
            ).fetchone()
            return (row[0], row[1]) if row else None
        row = self.db.execute(
            "SELECT manifest, media_type FROM repository_manifests WHERE repository = ? AND manifest = ?",
            (repository, reference),
        ).fetchone()
        if row:
            return row[0], row[1]
        lo, hi = _tag_range(repository)
        row = self.db.execute("SELECT manifest FROM tags WHERE name >= ? AND name < ? AND manifest = ? LIMIT 1",
                              (lo, hi, reference)).fetchone()
        return (row[0], None) if row else None

    def missing_from_repository(self, repository: str, blobs: list[str], manifests: list[str]) -> list[str]:
        """The digests among blobs and (child) manifests that the repository does not hold."""
        missing = [d for d in blobs if not self.repository_has_blob(repository, d)]
        return missing + [d for d in manifests if self.repository_manifest(repository, d) is None]

    def add_repository_manifest(self, repository: str, manifest: bytes, media_type: str, artifact_type: str,
                                blobs: list[str], children: list[str], subject: str | None,
                                tag: str | None) -> str:
        """Store a manifest pushed into a repository (an image manifest referencing blobs, or an
        index referencing child manifests), and point tag at it; returns its digest. The caller
        has checked with missing_from_repository that everything it references is there."""
        digest = self.store.ingest_bytes(manifest).info.digest
        with self.store.transaction() as tx:
            kept = set(blobs) | set(children)
            for child in children:  # an index keeps its children's blobs alive too
                kept.update(r[0] for r in tx.execute("SELECT blob FROM manifest_blobs WHERE manifest = ?", (child,)))
            tx.execute("INSERT OR IGNORE INTO manifests (digest, artifact_type, created) VALUES (?, ?, ?)",
                       (digest, artifact_type, time.time()))
            tx.executemany("INSERT OR IGNORE INTO manifest_blobs (manifest, blob) VALUES (?, ?)",
                           ((digest, d) for d in [digest, *sorted(kept)]))
            tx.execute(
                "INSERT INTO repository_manifests (repository, manifest, media_type, subject) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (repository, manifest) DO UPDATE SET media_type = excluded.media_type, "
                "subject = excluded.subject",
                (repository, digest, media_type, subject),
            )
            if tag is not None:
                tx.execute(
                    "INSERT INTO tags (name, manifest, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET manifest = excluded.manifest, updated = excluded.updated",
                    (f"{repository}:{tag}", digest, time.time()),
                )
        return digest

    def delete_repository_manifest(self, repository: str, digest: str) -> bool:
        """Remove a manifest and every tag naming it from the repository (content stays for gc)."""
        lo, hi = _tag_range(repository)
        with self.store.transaction() as tx:
            n = tx.execute("DELETE FROM repository_manifests WHERE repository = ? AND manifest = ?",
                           (repository, digest)).rowcount
            n += tx.execute("DELETE FROM tags WHERE name >= ? AND name < ? AND manifest = ?", (lo, hi, digest)).rowcount
        return n > 0

    def delete_repository_tag(self, repository: str, tag: str) -> bool:
        with self.store.transaction() as tx:
            return tx.execute("DELETE FROM tags WHERE name = ?", (f"{repository}:{tag}",)).rowcount > 0

    def repository_tags(self, repository: str) -> list[str]:
        lo, hi = _tag_range(repository)
        rows = self.db.execute("SELECT name FROM tags WHERE name >= ? AND name < ? ORDER BY name", (lo, hi))
        return [r[0][len(lo):] for r in rows]

    def repositories(self) -> list[str]:
        """Every repository name that holds a manifest, a tag or a blob, sorted."""
        names = {r[0] for r in self.db.execute(
            "SELECT repository FROM repository_manifests UNION SELECT repository FROM repository_blobs")}
        names.update(self.tagged_repositories())
        return sorted(names)

    def referrers(self, repository: str, subject: str) -> list[tuple[str, str, str]]:
        """(digest, media type, artifact type) of the repository's manifests whose subject is subject."""
        rows = self.db.execute(
            """SELECT rm.manifest, rm.media_type, m.artifact_type FROM repository_manifests rm
               JOIN manifests m ON m.digest = rm.manifest WHERE rm.repository = ? AND rm.subject = ?
               ORDER BY rm.manifest""",
            (repository, subject),
        )
        return [(r[0], r[1], r[2]) for r in rows]


def _tag_range(repository: str) -> tuple[str, str]:
    """Bounds of the tag names 'repository:*' (':' sorts just before ';'), for an index range scan."""
    return f"{repository}:", f"{repository};"
