"""Chunk-aware pulls from a Clowder storage node over gRPC (clowder.v1.Registry).

For a blob the node lacks: get its chunk index, take every chunk this node already has from the
local store (the node-wide chunk map), fetch only the others over several parallel FetchChunks
streams, write each at its offsets of a partial file (partial.py; resumable after a kill), check
every chunk's BLAKE3 as it arrives (a bad one is asked again, up to MAX_TRIES), then move the file
into the store with the source's chunk boundaries as cuts (so the blob's chunk index is the
source's) and its sha256 checked.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from clowder.v1 import registry_pb2, registry_pb2_grpc
from clowderd import _native as native
from clowderd.distribution.errors import TransferError
from clowderd.distribution.partial import PartialBlob
from clowderd.distribution.progress import Progress
from clowderd.errors import NotFound
from clowderd.store.content import ContentStore, pack_chunk_index

DEFAULT_STREAMS = 4
UNIT_BYTES = 32 << 20  # chunk bytes asked in one FetchChunks call
UNIT_IDS = 4096  # the server's limit per call
MAX_TRIES = 3  # fetches of one chunk whose bytes do not match its id before giving up
CHECKPOINT_SECONDS = 1.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),  # one connection per channel: streams run in parallel
]


def _rpc_error(exc: grpc.RpcError, what: str) -> Exception:
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {exc.details()}")
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return TransferError(f"{what}: the Clowder node is unreachable ({exc.details()})")
    return TransferError(f"{what}: {exc.code().name}: {exc.details()}")


class ChunkSource:
    """A Clowder storage node's Registry service; `streams` connections for parallel fetches."""

    def __init__(self, address: str, streams: int = DEFAULT_STREAMS):
        self.address = address
        self._channels = [grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(max(1, streams))]
        self.stubs = [registry_pb2_grpc.RegistryStub(ch) for ch in self._channels]

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def get_manifest(self, repository: str, reference: str) -> registry_pb2.GetManifestResponse:
        what = f"clowder://{self.address}/{repository}:{reference}".replace(":sha256:", "@sha256:")
        try:
            return self.stubs[0].GetManifest(
                registry_pb2.GetManifestRequest(repository=repository, reference=reference), timeout=30)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, what) from None

    def chunk_index(self, digest: str) -> tuple[int, list[tuple[int, int, bytes]]]:
        try:
            r = self.stubs[0].GetChunkIndex(registry_pb2.GetChunkIndexRequest(digest=digest), timeout=60)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, f"blob {digest} on {self.address}") from None
        return r.size, [(c.offset, c.length, c.id) for c in r.chunks]


@dataclass
class BlobPullStats:
    fetched_bytes: int = 0  # chunk bytes received from the source
    local_bytes: int = 0  # bytes taken from chunks this node already had
    resumed_bytes: int = 0  # bytes already in place from an interrupted pull


class _RateLimit:
    def __init__(self, bytes_per_second: float | None):
        self.rate = bytes_per_second
        self.start = time.monotonic()
        self.total = 0
        self.lock = threading.Lock()

    def consumed(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            self.total += n
            wait = self.total / self.rate - (time.monotonic() - self.start)
        if wait > 0:
            time.sleep(wait)


class _BlobAssembly:
    """The state of one blob's chunk pull, shared by its fetch threads."""

    def __init__(self, part: PartialBlob, chunks, progress: Progress, key: str, limit: _RateLimit):
        self.part = part
        self.chunks = chunks
        self.progress = progress
        self.key = key
        self.limit = limit
        self.positions: dict[bytes, list[int]] = {}
        for i, (_, _, cid) in enumerate(chunks):
            if not part.done[i]:
                self.positions.setdefault(cid, []).append(i)
        self.stats = BlobPullStats(resumed_bytes=sum(c[1] for i, c in enumerate(chunks) if part.done[i]))
        self.lock = threading.Lock()
        self.error: Exception | None = None

    def put(self, cid: bytes, data, source: str) -> bool:
        """Write a chunk at all its offsets if it hashes to its id; False when it does not."""
        if native.blake3(data) != cid:
            return False
        idxs = self.positions.get(cid, ())
        for i in idxs:
            _writeall(self.part.fd, data, self.chunks[i][0])
            self.part.done[i] = 1
        n = len(data) * len(idxs)
        with self.lock:
            if source == "local":
                self.stats.local_bytes += n
            else:
                self.stats.fetched_bytes += len(data)
                self.stats.local_bytes += n - len(data)
        self.progress.advance(self.key, n)
        return True


def _writeall(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _local_ids(store: ContentStore, ids: list[bytes]) -> set[bytes]:
    """Which of ids this node's chunk map knows."""
    found: set[bytes] = set()
    for i in range(0, len(ids), 500):
        batch = ids[i : i + 500]
        marks = ",".join("?" * len(batch))
        found.update(r[0] for r in store.db.execute(f"SELECT id FROM chunks WHERE id IN ({marks})", batch))
    return found


def _units(ids: list[bytes], sizes: dict[bytes, int]) -> list[list[bytes]]:
    units, cur, size = [], [], 0
    for cid in ids:
        if cur and (size + sizes[cid] > UNIT_BYTES or len(cur) >= UNIT_IDS):
            units.append(cur)
            cur, size = [], 0
        cur.append(cid)
        size += sizes[cid]
    if cur:
        units.append(cur)
    return units


def _fetch_worker(stub, work: "queue.Queue[list[bytes]]", asm: _BlobAssembly, digest: str, retries: dict) -> None:
    while asm.error is None:
        try:
            unit = work.get_nowait()
        except queue.Empty:
            return
        try:
            for batch in stub.FetchChunks(registry_pb2.FetchChunksRequest(ids=unit, blob_digest=digest)):
                for c in batch.chunks:
                    if not asm.put(c.id, c.data, "remote"):
                        with asm.lock:
                            retries[c.id] = retries.get(c.id, 0) + 1
                            if retries[c.id] >= MAX_TRIES:
                                raise TransferError(f"chunk {c.id.hex()} of blob {digest} arrived corrupt "
                                                    f"{MAX_TRIES} times; giving up")
                        work.put([c.id])
                    asm.limit.consumed(len(c.data))
                    if asm.error is not None:
                        return
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DATA_LOSS:
                asm.error = TransferError(f"the source reports corrupt data: {exc.details()}")
            else:
                asm.error = _rpc_error(exc, f"fetching chunks of blob {digest}")
        except Exception as exc:  # noqa: BLE001 - handed to the pulling thread
            asm.error = exc


def pull_blob(store: ContentStore, source: ChunkSource, digest: str, progress: Progress, key: str,
              limit_rate: float | None = None) -> BlobPullStats:
    """Pull one blob into the store (see the module docstring); returns what came from where."""
    size, chunks = source.chunk_index(digest)
    part = PartialBlob(store, digest, size, native.blake3(pack_chunk_index(chunks)), len(chunks))
    try:
        asm = _BlobAssembly(part, chunks, progress, key, _RateLimit(limit_rate))
        progress.advance(key, asm.stats.resumed_bytes)
        ids = list(asm.positions)
        sizes = {chunks[idxs[0]][2]: chunks[idxs[0]][1] for idxs in asm.positions.values()}
        missing = []
        have = _local_ids(store, ids)
        for cid in ids:
            if not (cid in have and asm.put(cid, store.read_chunk(cid), "local")):
                missing.append(cid)
        work: queue.Queue = queue.Queue()
        for unit in _units(missing, sizes):
            work.put(unit)
        retries: dict[bytes, int] = {}
        threads = [threading.Thread(target=_fetch_worker, args=(stub, work, asm, digest, retries), daemon=True)
                   for stub in source.stubs[: max(1, min(len(source.stubs), work.qsize()))]]
        for t in threads:
            t.start()
        last = time.monotonic()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
                if time.monotonic() - last >= CHECKPOINT_SECONDS:
                    part.checkpoint()
                    last = time.monotonic()
        part.checkpoint()
        if asm.error is not None:
            raise asm.error
        if not all(part.done):  # a retried chunk whose worker had already finished
            raise TransferError(f"blob {digest}: {len(part.done) - sum(part.done)} chunks were not received")
        path = part.close_data()
        cuts = [off for off, _, _ in chunks[1:]]
        try:
            store.ingest_temp_file(path, cuts, expected_digest=digest)
        finally:
            part.discard()
        progress.done(key)
        return asm.stats
    finally:
        part.close()
