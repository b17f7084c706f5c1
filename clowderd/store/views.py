"""Model views: the directory an engine loads, built from hard links into the content store.

N views of one base on a node cost one copy on disk and, since engines mmap safetensors, one copy
in the page cache. Blob files are read-only, so an engine cannot change the store through a view.
Each view holds its manifest's blobs alive until it is removed. verify() checks every file of a view
against its blob's chunk index, on all cores, before an engine loads it.

Layout of a view of an aimage:
    <filepath of each model layer>                 the model directory, as it was built
    adapters/<ep name>/<filepath of each EP file>  one PEFT directory per EP layer
    clowder/manifest.json, clowder/config.json     the manifest and the aimage configuration
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path, PurePosixPath

from clowderd.aimage import mediatypes
from clowderd.errors import InvalidInput, NotFound, Quarantined
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex
from clowderd.store.verify import BlobBytes, check_all

VIEW_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


def safe_relpath(path: str, source: str) -> PurePosixPath:
    """A layer's file path, refused if it could escape the view (absolute, '..', empty)."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("..", ".", "") for part in path.split("/")):
        raise InvalidInput(f"{source}: file path {path!r} must be relative and stay inside the model directory")
    return p


def view_layout(manifest: bytes) -> tuple[dict[str, str], str]:
    """Map each view-relative path to the blob digest that goes there; also the config digest."""
    doc = json.loads(manifest)
    files: dict[str, str] = {}
    for i, layer in enumerate(doc.get("layers", [])):
        ann = layer.get("annotations") or {}
        source = f"manifest layers[{i}]"
        filepath = ann.get(mediatypes.ANNOTATION_FILEPATH)
        if filepath is None:
            raise InvalidInput(f"{source}: no {mediatypes.ANNOTATION_FILEPATH} annotation")
        rel = safe_relpath(filepath, source)
        if layer["mediaType"] in mediatypes.EP_LAYER_TYPES:
            ep_name = ann.get(mediatypes.ANNOTATION_EP_NAME, "")
            safe_relpath(ep_name, source)
            rel = PurePosixPath("adapters", ep_name, rel)
        key = str(rel)
        if key in files or key.startswith("clowder/"):
            raise InvalidInput(f"{source}: file path {key!r} is used twice")
        files[key] = layer["digest"]
    return files, doc["config"]["digest"]


class ViewManager:
    def __init__(self, store: ContentStore, index: ImageIndex):
        self.store = store
        self.index = index
        self.root = store.view_dir

    def create(self, name: str, ref: str) -> Path:
        """Build (or return the existing) view `name` of the image `ref`."""
        if not VIEW_NAME.match(name):
            raise InvalidInput(f"view name {name!r}: use lowercase letters, digits, '.', '_' and '-'")
        manifest_digest = self.index.resolve(ref)
        final = self.root / name
        existing = self.store.db.execute("SELECT manifest FROM views WHERE name = ?", (name,)).fetchone()
        if existing is not None:
            if existing[0] != manifest_digest:
                raise InvalidInput(f"view {name!r} already exists for another image ({existing[0]})")
            return final
        with self.store.shared_lock():
            tmp = self.root / f".tmp-{name}-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()
                for rel, digest in self.files(manifest_digest).items():
                    dst = tmp / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(self.store.path(digest), dst)
                with self.store.transaction() as tx:
                    tx.execute(
                        "INSERT INTO views (name, manifest, created) VALUES (?, ?, ?)",
                        (name, manifest_digest, time.time()),
                    )
                    os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final

    def files(self, manifest_digest: str) -> dict[str, str]:
        """Each file of a view of the image (its path in the view) and the blob it is a link to."""
        files, config_digest = view_layout(self.index.manifest_bytes(manifest_digest))
        return {**files, "clowder/manifest.json": manifest_digest, "clowder/config.json": config_digest}

    def verify(self, name: str, threads: int = 0) -> list[Quarantined]:
        """Check every file of view `name` against its blob's chunk index, on `threads` threads (0: one
        per CPU), so that an engine never loads corrupt weights. A corrupt blob is quarantined (and
        logged) by the store; returns the error naming each."""
        row = self.store.db.execute("SELECT manifest FROM views WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"view {name!r} does not exist")
        corrupt, blobs = [], []
        for rel, digest in self.files(row[0]).items():
            try:
                blobs.append(BlobBytes(self.store, digest, "view", path=self.root / name / rel))
            except Quarantined as exc:  # since the view was made
                corrupt.append(exc)
        return corrupt + check_all(blobs, threads)

    def remove(self, name: str) -> None:
        if self.store.db.execute("SELECT 1 FROM views WHERE name = ?", (name,)).fetchone() is None:
            raise NotFound(f"view {name!r} does not exist")
        # Unlink the directory first: a crash in between leaves a row without a directory, which
        # holds content alive until the view is removed again, never a directory without a row.
        shutil.rmtree(self.root / name, ignore_errors=True)
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM views WHERE name = ?", (name,))

    def list(self) -> list[tuple[str, str]]:
        return [tuple(r) for r in self.store.db.execute("SELECT name, manifest FROM views ORDER BY name")]
