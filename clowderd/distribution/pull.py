"""Pull an aimage (or any OCI image manifest) into this node's store and name it.

From a Clowder node (clowder://) blobs come chunk by chunk (chunk_client); from an OCI registry
whole, by ranged GETs into `<hex>.oci.part` under the store's partial_dir, which a later pull
continues. Blobs the store already has are skipped. The manifest is stored last, with its
digest checked, and then the name: an interrupted pull leaves no name and no half blob.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from clowderd.aimage.safetensors import read_header, tensor_boundaries
from clowderd.distribution import chunk_client, credentials
from clowderd.distribution.errors import TransferError
from clowderd.distribution.oci_client import INDEX_TYPES, OciClient
from clowderd.distribution.progress import Progress
from clowderd.distribution.refs import RemoteRef
from clowderd.errors import ClowderError, DigestMismatch, InvalidInput
from clowderd.store.content import ContentStore, parse_digest
from clowderd.store.images import ImageIndex, referenced_digests
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


def _cuts(path, descriptor: dict) -> list[int]:
    """Tensor boundaries of a safetensors layer, so its chunks match a local build's."""
    filepath = (descriptor.get("annotations") or {}).get("org.cncf.model.filepath", "")
    if not filepath.endswith(".safetensors"):
        return []
    try:
        return tensor_boundaries(read_header(path))
    except ClowderError:
        return []


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
            manifest, remote_digest = got.content, got.digest
            descs, artifact = _descriptors(manifest, str(ref))
            result = _pull_blobs(store, descs, progress,
                                 lambda d, key: chunk_client.pull_blob(store, source, d["digest"], progress, key, limit_rate))
        finally:
            source.close()
    else:
        client = OciClient(ref.registry, insecure=insecure, credentials=credentials.get(ref.registry))
        try:
            manifest, _, remote_digest = client.get_manifest(ref.repository, ref.reference)
            descs, artifact = _descriptors(manifest, str(ref))
            result = _pull_blobs(store, descs, progress, lambda d, key: _pull_oci_blob(store, client, ref, d, progress, key))
        finally:
            client.close()
    if ref.digest and remote_digest != ref.digest:
        raise DigestMismatch(f"{ref}: the source sent a manifest with digest {remote_digest}")
    digest = index.add_manifest(manifest, artifact)
    if digest != remote_digest:
        raise DigestMismatch(f"{ref}: manifest stored with digest {digest}, the source said {remote_digest}")
    if name:
        name = index.tag(name, digest)
    result.name, result.digest = name, digest
    return result


def _pull_blobs(store: ContentStore, descs: list[dict], progress: Progress, pull_one) -> PullResult:
    result = PullResult(None, "", len(descs), 0, 0, 0, 0, 0)
    seen = set()
    for d in descs:
        digest = d["digest"]
        if digest in seen or store.exists(digest):
            continue
        seen.add(digest)
        key = digest
        label = (d.get("annotations") or {}).get("org.cncf.model.filepath") or d.get("mediaType", "") or digest[:19]
        progress.start(key, label, int(d.get("size", 0)))
        stats = pull_one(d, key)
        result.pulled_blobs += 1
        result.pulled_bytes += int(d.get("size", 0))
        result.fetched_bytes += stats.fetched_bytes
        result.local_bytes += stats.local_bytes
        result.resumed_bytes += stats.resumed_bytes
    return result


def _pull_oci_blob(store: ContentStore, client: OciClient, ref: RemoteRef, d: dict, progress: Progress, key: str):
    digest = d["digest"]
    path = store.partial_dir / f"{parse_digest(digest)}.oci.part"
    resumed = path.stat().st_size if path.exists() else 0
    progress.advance(key, resumed)
    fetched = [0]

    def advance(n: int) -> None:
        fetched[0] += n
        progress.advance(key, n)

    client.download_blob(ref.repository, digest, path, advance)
    size = path.stat().st_size
    if size != int(d.get("size", -1)):
        path.unlink(missing_ok=True)
        raise TransferError(f"{ref}: blob {digest} has {size} bytes, the manifest says {d.get('size')}")
    try:  # checks the digest (and consumes the file either way)
        store.ingest_temp_file(path, _cuts(path, d), expected_digest=digest)
    except DigestMismatch as exc:
        raise DigestMismatch(f"{ref.registry}/{ref.repository}: blob {digest} arrived with other content "
                             f"({exc}); nothing of it was kept") from None
    progress.done(key)
    return chunk_client.BlobPullStats(fetched_bytes=fetched[0], resumed_bytes=resumed)
