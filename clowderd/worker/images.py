"""A replica's aimage on this node: found in the local content store, or pulled from the spec's
sources in order, as far as `[worker] pull_from` allows.

A source is where `clowderctl pull` would pull from, without the repository: `clowder://HOST:PORT`
(a Clowder storage node's gRPC address, chunk-aware) or `HOST[:PORT]` (an OCI registry, refused
unless pull_from = "any"). The repository and tag come from ReplicaSpec.image, the digest from
ReplicaSpec.manifest_digest. Blocking (store and network I/O): run these in a thread.
"""
from __future__ import annotations

import logging

from clowder.v1 import common_pb2
from clowderd.aimage.reference import parse_reference
from clowderd.distribution.policy import check_source
from clowderd.distribution.pull import pull
from clowderd.distribution.refs import parse_remote
from clowderd.errors import InvalidInput, NotFound
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex
from clowderd.trust.dial import Dialer

log = logging.getLogger(__name__)


def describe_image(spec: common_pb2.ReplicaSpec) -> str:
    """How messages name the spec's image: 'image NAME (DIGEST)', either part when given."""
    if spec.image and spec.manifest_digest:
        return f"image {spec.image!r} ({spec.manifest_digest})"
    return f"image {spec.image or spec.manifest_digest!r}"


def local_manifest(store: ContentStore, spec: common_pb2.ReplicaSpec) -> str | None:
    """The manifest digest of the spec's image when this node's store has it, else None."""
    try:
        return ImageIndex(store).resolve(spec.manifest_digest or spec.image)
    except NotFound:
        return None


def pull_image(store: ContentStore, spec: common_pb2.ReplicaSpec, pull_from: str, dialer: Dialer) -> str:
    """Pull the spec's image from the first of its sources that has it (a Clowder node reached with
    dialer); returns its manifest digest.
    NotFound names the image and, for each source tried, why it failed."""
    what = describe_image(spec)
    if not spec.sources:
        raise NotFound(f"{what} is not in this node's store, and the replica spec names no source to "
                       "pull it from")
    if not spec.image:
        raise InvalidInput(f"{what} is not in this node's store, and the replica spec gives no image "
                           "name to pull it by (sources need the repository)")
    image = parse_reference(spec.image)
    reference = f"@{spec.manifest_digest}" if spec.manifest_digest else f":{image.tag_or_default}"
    failures = []
    for source in spec.sources:
        try:
            ref = parse_remote(f"{source.rstrip('/')}/{image.repository}{reference}")
            check_source(pull_from, ref)
            result = pull(store, ref, dialer=dialer)
            log.info("pulled", extra={"image": spec.image, "source": source, "digest": result.digest,
                                      "pulled_bytes": result.pulled_bytes})
            return result.digest
        except Exception as e:  # each source fails on its own; the next one may have the image
            log.warning("pull failed", extra={"image": spec.image, "source": source, "error": str(e)})
            failures.append(f"{source}: {e}")
    raise NotFound(f"{what} could not be pulled: " + "; ".join(failures))
