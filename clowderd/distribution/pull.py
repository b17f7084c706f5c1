"""Pull an aimage (or any OCI image manifest) into this node's store and name it.

From a Clowder node (clowder://) blobs come chunk by chunk (chunk_client); from an OCI registry
whole, by ranged GETs into a store ingest (`<hex>.oci`), which a later pull continues. Blobs the
store already has are skipped. Before the first byte, the pull checks that the store has room for
everything it will write (what is missing of each blob, the manifest) and its reserve besides.
The manifest's bytes are written first and moved in last, once every blob is in and its digest
is checked, and then the name: an interrupted pull leaves no name and no half blob.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

from clowderd.aimage.safetensors import content_cuts
from clowderd.distribution import chunk_client, credentials
from clowderd.distribution.errors import TransferError
from clowderd.distribution.oci_client import INDEX_TYPES, OciClient
from clowderd.distribution.progress import Progress
from clowderd.distribution.refs import RemoteRef
from clowderd.errors import DigestMismatch, InvalidInput
from clowderd.store.content import ContentStore, parse_digest
from clowderd.store.images import ImageIndex, referenced_digests
from clowderd.store.writer import BlobWriter
from clowderd.trust.dial import Dialer


@dataclass
class PullResult:
    name: str | None
    digest: str
    blobs: int  # blobs the manifest references
    pulled_blobs: int  # of which this pull transferred (the others were here already)
    pulled_bytes: int  # logical size of the pulled blobs
    fetched_bytes: int  # bytes received over the network
    local_bytes: int  # bytes of pulled blobs assembled from chunks this node had
    resumed_bytes: int  # bytes already in place from an interrupted pull


def _descriptors(manifest: bytes, source: str) -> tuple[list[dict], str]:
    """The manifest's blobs (config first) as descriptor dicts, and its artifact type."""
    referenced_digests(manifest, source)  # checks the shape and every digest
    doc = json.loads(manifest)
    if doc.get("mediaType") in INDEX_TYPES or "manifests" in doc:
        raise InvalidInput(f"{source} is an image index; Clowder pulls image manifests (give a digest of one)")
    artifact = doc.get("artifactType") or doc["config"].get("mediaType", "")
    return [doc["config"], *doc.get("layers", [])], artifact


def _cuts(ingest: BlobWriter, descriptor: dict) -> list[int]:
    """Tensor boundaries of a safetensors layer, so its chunks match a local build's."""
    filepath = (descriptor.get("annotations") or {}).get("org.cncf.model.filepath", "")
    if not filepath.endswith(".safetensors"):
        return []
    with ingest.reader() as f:
        return content_cuts(f)


def pull(store: ContentStore, ref: RemoteRef, *, name: str | None = None, insecure: bool = False,
         streams: int = chunk_client.DEFAULT_STREAMS, limit_rate: float | None = None,
         progress: Progress = Progress(), dialer: Dialer | None = None) -> PullResult:
    """Pull ref into store; name it `name` (default ref.local_name, none for a digest-only ref). A Clowder
    node is reached with dialer (the caller's certificate), plain gRPC without one."""
    index = ImageIndex(store)
    if name is None and (ref.tag or not ref.digest):
        name = ref.local_name
    if ref.kind == "clowder":
        source = chunk_client.ChunkSource(ref.registry, streams, dialer or Dialer(None))
        try:
            got = source.get_manifest(ref.repository, ref.reference)
            manifest, digest = got.content, got.digest
            result, artifact = _pull_image(
                store, ref, manifest, digest, progress, chunk_client.ingest_ref,
                lambda d, key: chunk_client.pull_blob(store, source, d["digest"], progress, key, limit_rate))
        finally:
            source.close()
    else:
        client = OciClient(ref.registry, insecure=insecure, credentials=credentials.get(ref.registry))
        try:
            manifest, _, digest = client.get_manifest(ref.repository, ref.reference)
            result, artifact = _pull_image(store, ref, manifest, digest, progress, oci_ingest_ref,
                                           lambda d, key: _pull_oci_blob(store, client, ref, d, progress, key))
        finally:
            client.close()
    index.add_manifest(manifest, artifact)
    if name:
        name = index.tag(name, digest)
    result.name, result.digest = name, digest
    return result


def _pull_image(store: ContentStore, ref: RemoteRef, manifest: bytes, digest: str, progress: Progress,
                ingest_ref: Callable[[str], str], pull_one) -> tuple[PullResult, str]:
    """Check the manifest and the room for the pull, then pull the blobs the store lacks; returns
    what was pulled and the artifact type. The manifest's bytes are written first, into an ingest
    that is moved in once the blobs are (needing no more room then) and dropped if the pull fails:
    no blob is written to be left without the room its manifest needs."""
    actual = "sha256:" + hashlib.sha256(manifest).hexdigest()
    if actual != digest or (ref.digest and digest != ref.digest):
        raise DigestMismatch(f"{ref}: the source sent a manifest with digest {actual}, "
                             f"expected {ref.digest or digest}")
    descs, artifact = _descriptors(manifest, str(ref))
    _check_space(store, ref, descs, manifest, digest, ingest_ref)
    if store.exists(digest):
        return _pull_blobs(store, descs, progress, pull_one), artifact
    with store.writer(f"{parse_digest(digest)}.manifest") as held:
        held.truncate(0)
        held.write(manifest)
        try:
            result = _pull_blobs(store, descs, progress, pull_one)
        except BaseException:
            held.abort()
            raise
        held.commit(digest)
    return result, artifact


def _missing(store: ContentStore, descs: list[dict]) -> list[dict]:
    """The descriptors of the blobs the store lacks, each once."""
    seen: set[str] = set()
    missing = []
    for d in descs:
        if d["digest"] not in seen and not store.exists(d["digest"]):
            seen.add(d["digest"])
            missing.append(d)
    return missing


def _check_space(store: ContentStore, ref: RemoteRef, descs: list[dict], manifest: bytes, manifest_digest: str,
                 ingest_ref: Callable[[str], str]) -> None:
    """Refuse the pull before its first byte when what it will write, and the store's reserve,
    do not fit on the store's disk: each missing blob at its size less what an interrupted pull
    already holds of it on disk (its ingest, ingest_ref(digest)), and the manifest."""
    needed = 0 if store.exists(manifest_digest) else len(manifest)
    missing = _missing(store, descs)
    for d in missing:
        held = store.ingest_status(ingest_ref(d["digest"]))
        needed += max(0, int(d.get("size", 0)) - (held.allocated if held else 0))
    store.check_free_space(needed, f"pulling {ref} ({len(missing)} blobs and the manifest)")


def _pull_blobs(store: ContentStore, descs: list[dict], progress: Progress, pull_one) -> PullResult:
    result = PullResult(None, "", len(descs), 0, 0, 0, 0, 0)
    for d in _missing(store, descs):
        key = d["digest"]
        label = (d.get("annotations") or {}).get("org.cncf.model.filepath") or d.get("mediaType", "") or key[:19]
        progress.start(key, label, int(d.get("size", 0)))
        stats = pull_one(d, key)
        result.pulled_blobs += 1
        result.pulled_bytes += int(d.get("size", 0))
        result.fetched_bytes += stats.fetched_bytes
        result.local_bytes += stats.local_bytes
        result.resumed_bytes += stats.resumed_bytes
    return result


def oci_ingest_ref(digest: str) -> str:
    """The store ingest an OCI pull of blob digest writes, and resumes after a failure."""
    return f"{parse_digest(digest)}.oci"


def _pull_oci_blob(store: ContentStore, client: OciClient, ref: RemoteRef, d: dict, progress: Progress, key: str):
    digest = d["digest"]
    size = int(d.get("size", -1))
    fetched = [0]

    def advance(n: int) -> None:
        fetched[0] += n
        progress.advance(key, n)

    with store.writer(oci_ingest_ref(digest)) as ingest:
        resumed = ingest.offset if ingest.offset <= size else 0  # (a longer one is started over)
        progress.advance(key, resumed)
        try:
            client.download_blob(ref.repository, digest, ingest, size, advance)
        except BaseException:
            if not ingest.offset:  # nothing a later pull could resume from
                ingest.abort()
            raise
        if ingest.offset != size:
            ingest.abort()
            raise TransferError(f"{ref}: blob {digest} has {ingest.offset} bytes, the manifest says {size}")
        try:  # checks the digest (and ends the ingest either way)
            ingest.commit(digest, _cuts(ingest, d))
        except DigestMismatch as exc:
            raise DigestMismatch(f"{ref.registry}/{ref.repository}: blob {digest} arrived with other content "
                                 f"({exc}); nothing of it was kept") from None
    progress.done(key)
    return chunk_client.BlobPullStats(fetched_bytes=fetched[0], resumed_bytes=resumed)
