"""The gRPC Registry service of the storage role, backed by the node's content store: what a
Clowder node needs to pull an aimage chunk by chunk (manifests, chunk indexes, chunk bytes).

Chunk bytes are read in a worker thread (pread and BLAKE3 release the GIL), coalescing chunks that
lie next to each other in one file into one read, and sent several to a message; the next message
is read while the current one is sent. A packed request gets each message's chunks as one
contiguous `data` (with their ids and lengths), the whole message verified by one BLAKE3 call.
A request with `verify` has every chunk checked against its id before it is sent
(clowderd.store.verify.bad_chunks): a chunk whose stored bytes are corrupt is read again from the blob
the client named (a second copy, when that blob has its own file), else the stream ends with DATA_LOSS
naming the chunk, and the blob whose file holds it and the blob named are quarantined. Clients check
every chunk they receive (an id is the chunk's BLAKE3) and ask again with `verify` for those that
arrived corrupt, so a corrupt disk never feeds another node and is found at its first read, at the cost
of one check per chunk on the common path rather than two. A quarantined blob is DATA_LOSS too, naming
what was found.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc

from clowder.v1 import registry_pb2, registry_pb2_grpc
from clowderd.aimage import mediatypes as mt
from clowderd.aimage.reference import validate_digest
from clowderd.distribution.chunk_client import retain_freed_buffers
from clowderd.errors import ClowderError, InvalidInput, NotFound, Quarantined
from clowderd.server import StatusCodes, unimplemented_servicer
from clowderd.store.content import ContentStore, Corruption, location_digest
from clowderd.store.images import ImageIndex
from clowderd.store.protocols import Provider
from clowderd.store.verify import bad_chunks

log = logging.getLogger("clowderd.storage.transfer")

CHUNKER = "fastcdc-gear/8k-64k-128k+safetensors"
BATCH_BYTES = 4 << 20  # chunk bytes per FetchChunks message (unpacked)
PACKED_BATCH_BYTES = 1 << 20  # chunk bytes per packed message when the client names none
PACKED_BATCH_RANGE = (64 << 10, 15 << 20)  # 15 MiB: under the server's 16 MiB message limit, with ids
MAX_IDS = 4096  # chunk ids per FetchChunks call


# The store's errors as gRPC status codes, the first class that matches winning.
STATUS_CODES = StatusCodes(
    (Quarantined, grpc.StatusCode.DATA_LOSS),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ClowderError, grpc.StatusCode.INTERNAL),
)

# Methods not overridden below (PutBlob, PutManifest, DeleteManifest) answer UNIMPLEMENTED.
_Unimplemented = type(unimplemented_servicer(registry_pb2_grpc.RegistryServicer, registry_pb2.DESCRIPTOR, "Registry"))


class RegistryServicer(_Unimplemented):
    def __init__(self, store: ContentStore):
        self.store: Provider = store  # the servicer reads content; names and manifests come from the index
        self.index = ImageIndex(store)
        retain_freed_buffers()  # every FetchChunks message is a fresh MiB at this end too

    async def _abort(self, context: grpc.aio.ServicerContext, exc: ClowderError):
        await context.abort(STATUS_CODES.code(exc), str(exc))

    # -- names -------------------------------------------------------------------------------
    async def ListRepositories(self, request, context):
        return registry_pb2.ListRepositoriesResponse(repositories=self.index.tagged_repositories())

    async def ListTags(self, request, context):
        tags = self.index.repository_tags(request.repository)
        if not tags:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"repository {request.repository!r} is not on this node")
        return registry_pb2.ListTagsResponse(tags=tags)

    async def GetManifest(self, request, context):
        ref = request.reference
        try:
            if ref.startswith("sha256:"):
                digest = self.index.resolve(validate_digest(ref))
            else:
                digest = self.index.resolve(f"{request.repository}:{ref}")
            content = self.index.manifest_bytes(digest)
        except ClowderError as exc:
            return await self._abort(context, exc)
        return registry_pb2.GetManifestResponse(media_type=mt.OCI_MANIFEST, digest=digest, content=content,
                                                artifact_type=self.index.artifact_type(digest) or "")

    # -- blobs and chunks ----------------------------------------------------------------------
    async def StatBlob(self, request, context):
        try:
            info = self.store.info(request.digest)
        except NotFound:
            return registry_pb2.StatBlobResponse(exists=False)
        except ClowderError as exc:
            return await self._abort(context, exc)
        return registry_pb2.StatBlobResponse(exists=True, size=info.size, chunked=True)

    async def GetChunkIndex(self, request, context):
        try:
            info = self.store.info(request.digest)
            chunks = self.store.chunk_index(request.digest)
        except ClowderError as exc:
            return await self._abort(context, exc)
        return registry_pb2.GetChunkIndexResponse(
            digest=info.digest, size=info.size, chunker=CHUNKER,
            chunks=[registry_pb2.Chunk(id=cid, offset=off, length=length) for off, length, cid in chunks])

    async def HasChunks(self, request, context):
        known = self.store.chunk_locations(request.ids)
        return registry_pb2.HasChunksResponse(present=[cid in known for cid in request.ids])

    def _fallback(self, blob_digest: str) -> tuple[Path, dict[bytes, int]] | None:
        """The hinted blob's own file and where each of its chunks lies in it, if it has one."""
        if not blob_digest:
            return None
        try:
            info = self.store.info(blob_digest)
            if not info.has_file:
                return None
            return self.store.blob_path(blob_digest), {cid: off for off, _, cid in self.store.chunk_index(blob_digest)}
        except ClowderError:
            return None

    async def FetchChunks(self, request, context):
        ids = list(request.ids)
        if len(ids) > MAX_IDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(ids)} chunk ids asked, at most {MAX_IDS} per call")
        locations = self.store.chunk_locations(ids)
        for cid in ids:
            if cid not in locations:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"chunk {cid.hex()} is not on this node")
        if request.packed:
            limit = min(max(request.batch_bytes or PACKED_BATCH_BYTES, PACKED_BATCH_RANGE[0]), PACKED_BATCH_RANGE[1])
            read = self._read_packed
        else:
            limit, read = BATCH_BYTES, self._read_batch
        verify = request.verify
        batches = []
        start = 0
        while start < len(ids):
            end, size = start, 0
            while end < len(ids) and (end == start or size + locations[ids[end]][2] <= limit):
                size += locations[ids[end]][2]
                end += 1
            batches.append(ids[start:end])
            start = end
        loop = asyncio.get_running_loop()
        # One read ahead: the worker thread reads and hashes message k+1 while k is sent.
        pending = loop.run_in_executor(None, read, batches[0], locations, request.blob_digest, verify) \
            if batches else None
        for k in range(len(batches)):
            message, error = await pending
            if k + 1 < len(batches) and error is None:
                pending = loop.run_in_executor(None, read, batches[k + 1], locations, request.blob_digest, verify)
            if message is not None:  # the good chunks before a corrupt one still count for the client
                yield message
            if error:
                await context.abort(grpc.StatusCode.DATA_LOSS, error)

    def _runs(self, ids, locations, fds: dict[str, int]):
        """(fd, offset, length, first index, end index) for each run of ids that lie next to each
        other in one file."""
        i = 0
        while i < len(ids):
            loc, off, length = locations[ids[i]]
            j, end = i + 1, off + length
            while j < len(ids) and locations[ids[j]][0] == loc and locations[ids[j]][1] == end:
                end += locations[ids[j]][2]
                j += 1
            if loc not in fds:
                fds[loc] = os.open(self.store.location_path(loc), os.O_RDONLY)
            yield fds[loc], off, end - off, i, j
            i = j

    def _corrupt(self, cid: bytes, location: tuple[str, int, int], blob_digest: str) -> str:
        """Quarantine the blob whose own file holds the corrupt chunk, and the blob the client named;
        the DATA_LOSS message."""
        loc, offset, _ = location
        path = str(self.store.location_path(loc))
        for digest in {location_digest(loc), blob_digest} - {None, ""}:
            self.store.quarantine(Corruption(digest, path, offset, cid), "fetch-chunks")
        return (f"chunk {cid.hex()} is corrupt in {path} on the source node (blob {blob_digest or 'unknown'}); "
                "the blob is quarantined there until a push or pull of it repairs it")

    def _read_packed(self, ids, locations, blob_digest, verify):
        """One packed ChunkBatch of ids; verified: up to the first corrupt chunk (None if that is the
        first), and the DATA_LOSS message naming that one (None when all are good)."""
        fds: dict[str, int] = {}
        lengths = [locations[cid][2] for cid in ids]
        try:
            parts = [os.pread(fd, n, off) for fd, off, n, _, _ in self._runs(ids, locations, fds)]
        finally:
            for fd in fds.values():
                os.close(fd)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        error = None
        if len(data) != sum(lengths):  # a file shorter than the index says: find which chunk
            data = data.ljust(sum(lengths), b"\0")
        joined = b"".join(ids)
        bad = bad_chunks(data, lengths, joined) if verify else []
        if bad:
            fixed = bytearray(data)
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)
            for k in bad:
                chunk = self._second_copy(ids[k], lengths[k], blob_digest)
                if chunk is None:
                    error = self._corrupt(ids[k], locations[ids[k]], blob_digest)
                    ids, lengths, fixed, joined = ids[:k], lengths[:k], fixed[: offsets[k]], joined[: 32 * k]
                    break
                fixed[offsets[k] : offsets[k + 1]] = chunk
            data = bytes(fixed)
        if not ids:
            return None, error
        return registry_pb2.ChunkBatch(ids=joined, lengths=lengths, data=data), error

    def _read_batch(self, ids, locations, blob_digest, verify):
        """Read the chunks; verified: a ChunkBatch of ChunkData up to the first corrupt one (None if
        that is the first), and the DATA_LOSS message naming that one (None when all are good)."""
        out = []
        fds: dict[str, int] = {}
        try:
            for fd, off, n, i, j in self._runs(ids, locations, fds):
                data = memoryview(os.pread(fd, n, off))
                lengths = [locations[cid][2] for cid in ids[i:j]]
                bad = set(bad_chunks(data, lengths, b"".join(ids[i:j]))) if verify else set()
                pos = 0
                for k, (cid, length) in enumerate(zip(ids[i:j], lengths)):
                    chunk = data[pos : pos + length]
                    pos += length
                    if k in bad:
                        chunk = self._second_copy(cid, length, blob_digest)
                        if chunk is None:
                            batch = registry_pb2.ChunkBatch(chunks=out) if out else None
                            return batch, self._corrupt(cid, locations[cid], blob_digest)
                    out.append(registry_pb2.ChunkData(id=cid, data=bytes(chunk)))
        finally:
            for fd in fds.values():
                os.close(fd)
        return registry_pb2.ChunkBatch(chunks=out), None

    def _second_copy(self, cid: bytes, length: int, blob_digest: str) -> bytes | None:
        """The chunk's bytes from the hinted blob's own file, if it has one and they are good. Only
        for a corrupt chunk: the hinted blob's chunk map is built then, not for every call."""
        fallback = self._fallback(blob_digest)
        if fallback is None or cid not in fallback[1]:
            return None
        with open(fallback[0], "rb") as f:
            data = os.pread(f.fileno(), length, fallback[1][cid])
        if bad_chunks(data, [length], cid):
            return None
        log.warning("corrupt chunk sent from a second copy", extra={
            "chunk": cid.hex(), "location": self.store.chunk_locations([cid]).get(cid, ("?",))[0],
            "second_copy": str(fallback[0])})
        return data
