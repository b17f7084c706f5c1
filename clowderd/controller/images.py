"""What a deployment's image reference names, read from a Clowder storage node's Registry service: the
manifest digest (workers pull by it, so a tag moving later changes nothing), the aimage configuration
and the layers' digests and sizes (for the memory estimate and locality).

The storage node is the one the reference names (`HOST:PORT/repository:tag`, its gRPC address), else
`[controller] storage`, else the storage role of the controller's own process. The controller reaches
it over gRPC even in one process, as every role reaches every other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import grpc

from clowder.v1 import registry_pb2, registry_pb2_grpc
from clowderd.aimage.config import canonical_json
from clowderd.aimage.manifest import parse_manifest
from clowderd.aimage.reference import parse_reference
from clowderd.errors import ClowderError, InvalidInput, NotFound
from clowderd.trust.dial import Dialer

CALL_TIMEOUT_S = 30.0
CONFIG_MAX_BYTES = 1 << 20
SOURCE_SCHEME = "clowder://"


class StorageUnavailable(ClowderError):
    """The storage node that holds a deployment's image cannot be asked about it."""


@dataclass(frozen=True)
class ResolvedImage:
    manifest_digest: str
    storage: str  # the storage node's gRPC address: where it was resolved and where workers pull it
    config: dict[str, Any]  # the aimage configuration
    layers: tuple[tuple[str, int], ...]  # (digest, bytes) of every model and EP layer

    @property
    def weights_bytes(self) -> int:
        return sum(size for _, size in self.layers)

    @property
    def config_json(self) -> str:
        return canonical_json(self.config).decode()

    @property
    def source(self) -> str:
        """The ReplicaSpec source workers pull from."""
        return SOURCE_SCHEME + self.storage

    def as_dict(self) -> dict[str, Any]:
        return {"manifest_digest": self.manifest_digest, "storage": self.storage, "config": self.config,
                "layers": [list(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResolvedImage":
        return cls(data["manifest_digest"], data["storage"], data["config"],
                   tuple((digest, size) for digest, size in data["layers"]))


async def resolve(image: str, default_storage: str | None, dialer: Dialer) -> ResolvedImage:
    """The image `image` names, at its storage node (reached with dialer). InvalidInput for a bad
    reference or no storage node to ask, NotFound for an image the node does not have,
    StorageUnavailable when it cannot be asked."""
    ref = parse_reference(image)
    storage = ref.registry or default_storage
    if not storage:
        raise InvalidInput(f"spec.image: {image!r} names no storage node and the controller has none: write "
                           "HOST:PORT/repository:tag, set [controller] storage, or run the storage role in the "
                           "controller's process")
    what = f"image {image!r} at storage node {storage}"
    async with dialer.aio_channel(storage, "storage") as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        try:
            got = await stub.GetManifest(registry_pb2.GetManifestRequest(
                repository=ref.repository, reference=ref.digest or ref.tag_or_default), timeout=CALL_TIMEOUT_S)
            manifest = parse_manifest(got.content, what)
            config = await _read_small_blob(stub, manifest.config.digest, manifest.config.size, what)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"{what}: {e.details()}") from None
            raise StorageUnavailable(f"{what}: {e.code().name}: {e.details()}") from None
    try:
        document = json.loads(config)
    except ValueError as e:
        raise InvalidInput(f"{what}: the configuration is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{what}: the configuration is not a JSON object")
    return ResolvedImage(got.digest, storage, document, tuple((d.digest, d.size) for d in manifest.layers))


async def _read_small_blob(stub: registry_pb2_grpc.RegistryStub, digest: str, size: int, what: str) -> bytes:
    """A blob of at most CONFIG_MAX_BYTES, chunk by chunk, checked against its digest."""
    if size > CONFIG_MAX_BYTES:
        raise InvalidInput(f"{what}: the configuration is {size} bytes, more than {CONFIG_MAX_BYTES}")
    index = await stub.GetChunkIndex(registry_pb2.GetChunkIndexRequest(digest=digest), timeout=CALL_TIMEOUT_S)
    ids = [chunk.id for chunk in index.chunks]
    received: dict[bytes, bytes] = {}
    async for batch in stub.FetchChunks(registry_pb2.FetchChunksRequest(ids=ids, blob_digest=digest, verify=True),
                                        timeout=CALL_TIMEOUT_S):
        received.update((chunk.id, chunk.data) for chunk in batch.chunks)
    data = b"".join(received.get(chunk_id, b"") for chunk_id in ids)
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise StorageUnavailable(f"{what}: the configuration blob {digest} came back incomplete or altered")
    return data
