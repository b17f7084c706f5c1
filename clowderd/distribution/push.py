"""Push an image from this node's store to an OCI registry.

Each blob the registry lacks (HEAD) is mounted from another repository of the same registry that
this node knows holds it (a name it pulled or pushed there), else uploaded from the store; the
manifest goes last, byte for byte as stored, so its digest is unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from clowderd.aimage import mediatypes as mt
from clowderd.distribution import credentials
from clowderd.distribution.errors import TransferError
from clowderd.distribution.oci_client import OciClient
from clowderd.distribution.progress import Progress
from clowderd.distribution.refs import RemoteRef
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex, normalize_name, referenced_digests


@dataclass
class PushResult:
    destination: str
    digest: str
    blobs: int
    uploaded_blobs: int
    uploaded_bytes: int
    mounted_blobs: int


def _mount_sources(index: ImageIndex, registry: str, repo: str, digest: str) -> list[str]:
    """Other repositories of `registry` that names on this node say hold blob `digest`."""
    repos = {name[len(registry) + 1 :].rpartition(":")[0] for name in index.names_using(digest, registry + "/")}
    repos.discard(repo)
    return sorted(repos)


def push(store: ContentStore, source: str, dest: RemoteRef, *, insecure: bool = False,
         progress: Progress = Progress()) -> PushResult:
    """Push the local image `source` to dest (tag default: the source's tag)."""
    if dest.kind == "clowder":
        raise TransferError(f"{dest}: pushing over gRPC is not supported yet; push to the node's OCI HTTP "
                            f"address instead (HOST:PORT/{dest.repository})")
    index = ImageIndex(store)
    digest = index.resolve(source)
    manifest = index.manifest_bytes(digest)
    blobs = referenced_digests(manifest, f"image {source}")
    doc = json.loads(manifest)
    sizes = {d["digest"]: int(d["size"]) for d in [doc["config"], *doc.get("layers", [])]}
    reference = dest.digest or dest.tag or normalize_name(source).rpartition(":")[2]
    client = OciClient(dest.registry, insecure=insecure, credentials=credentials.get(dest.registry))
    result = PushResult(f"{dest.registry}/{dest.repository}:{reference}", digest, len(set(blobs)), 0, 0, 0)
    try:
        for blob in dict.fromkeys(blobs):
            if client.has_blob(dest.repository, blob, push=True):
                continue
            if any(client.mount_blob(dest.repository, blob, r)
                   for r in _mount_sources(index, dest.registry, dest.repository, blob)):
                result.mounted_blobs += 1
                continue
            progress.start(blob, _label(doc, blob), sizes[blob])
            with open(store.path(blob), "rb") as f:
                client.upload_blob(dest.repository, blob, f, sizes[blob], lambda n: progress.advance(blob, n))
            progress.done(blob)
            result.uploaded_blobs += 1
            result.uploaded_bytes += sizes[blob]
        client.put_manifest(dest.repository, reference, manifest, doc.get("mediaType", mt.OCI_MANIFEST))
    finally:
        client.close()
    if not dest.digest:  # remember where it went, for later cross-repository mounts
        index.tag(result.destination, digest)
    return result


def _label(doc: dict, digest: str) -> str:
    for d in doc.get("layers", []):
        if d["digest"] == digest:
            return (d.get("annotations") or {}).get("org.cncf.model.filepath") or digest[:19]
    return "config"
