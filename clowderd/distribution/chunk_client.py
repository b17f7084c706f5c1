"""Chunk-aware pulls from a Clowder storage node over gRPC (clowder.v1.Registry).

For a blob the node lacks: get its chunk index, take every chunk this node already has from the
local store (the node-wide chunk map), fetch only the others over several parallel FetchChunks
streams, write each at its offsets of a store ingest (ContentStore.writer, resumable after a kill),
check every chunk's BLAKE3 as it arrives (a bad one is asked again, with the source checking it
before it sends it, so that it quarantines what is corrupt on its disk; up to MAX_TRIES), and commit the
ingest with the source's chunk index once its sha256 is checked.

Fetches ask for packed batches: a message's chunks arrive as one contiguous run of bytes, which is
taken as a slice of the received message (no protobuf copy) and verified by one BLAKE3 call for
the whole message. Verified chunks go to a WindowAssembly (assembly.py), which writes each window
whole with direct I/O as soon as it fills and hashes the blob in order; the store then takes the
file with that sha256 and the verified chunk list (ContentStore.ingest_assembled_file) instead of
reading it all again.
"""
from __future__ import annotations

import contextlib
import queue
import struct
import threading
import time
from dataclasses import dataclass

import grpc

from clowder.v1 import registry_pb2, registry_pb2_grpc
from clowderd import _native as native
from clowderd.distribution.assembly import WindowAssembly
from clowderd.distribution.errors import TransferError
from clowderd.distribution.progress import Progress
from clowderd.errors import DigestMismatch, NotFound, StoreError
from clowderd.store.content import ContentStore, pack_chunk_index, parse_digest, tiling_error
from clowderd.store.verify import bad_chunks
from clowderd.trust.dial import Dialer

DEFAULT_STREAMS = 4
UNIT_BYTES = 16 << 20  # chunk bytes asked in one FetchChunks call
UNIT_IDS = 4096  # the server's limit per call
# Chunk bytes per packed message asked of the server: 1 MiB measured best (0.5-2 MiB alike; 4-16 MiB
# slower, their fresh buffers cost page faults at both ends).
BATCH_BYTES = 1 << 20
MAX_TRIES = 3  # fetches of one chunk whose bytes do not match its id before giving up
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),  # one connection per channel: streams run in parallel
]
FETCH_CHUNKS = "/clowder.v1.Registry/FetchChunks"
ID_SIZE = 32


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_retained = False


def retain_freed_buffers() -> None:
    """Have glibc keep freed message-sized buffers for reuse rather than give them back to the
    kernel (process-wide, once): every FetchChunks message is a fresh few-MiB buffer at both ends,
    and memory returned to the kernel costs page faults when it is touched again (on a VM, faults
    the host serves as well): about 15% off a 1.5 GB pull on a 2-core VM. Allocations under 32 MiB
    come from the heap, and up to 128 MiB of free heap is kept. A no-op without glibc."""
    global _retained
    if _retained:
        return
    _retained = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def _rpc_error(exc: grpc.RpcError, what: str) -> Exception:
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {exc.details()}")
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return TransferError(f"{what}: the Clowder node is unreachable ({exc.details()})")
    return TransferError(f"{what}: {exc.code().name}: {exc.details()}")


class ChunkSource:
    """A Clowder storage node's Registry service; `streams` connections for parallel fetches, each
    made by dialer (with this node's certificate, or plain gRPC)."""

    def __init__(self, address: str, streams: int, dialer: Dialer):
        self.address = address
        self._channels = [dialer.channel(address, "storage", CHANNEL_OPTIONS) for _ in range(max(1, streams))]
        self.stubs = [registry_pb2_grpc.RegistryStub(ch) for ch in self._channels]
        # FetchChunks with the messages left as received (bytes): _parse_packed slices them.
        self.fetchers = [ch.unary_stream(FETCH_CHUNKS, request_serializer=registry_pb2.FetchChunksRequest.SerializeToString,
                                         response_deserializer=None) for ch in self._channels]

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


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _parse_packed(raw: bytes):
    """(ids, lengths, data) of a packed ChunkBatch as received, ids and data as slices of it (no
    copy); None for any other form (chunks, an unusual encoding), which the caller hands to
    protobuf."""
    view = memoryview(raw)
    fields: dict[int, memoryview] = {}
    pos, end = 0, len(raw)
    try:
        while pos < end:
            tag, pos = _varint(raw, pos)
            if tag & 7 != 2 or (tag >> 3) not in (2, 3, 4) or (tag >> 3) in fields:
                return None
            size, pos = _varint(raw, pos)
            if pos + size > end:
                return None
            fields[tag >> 3] = view[pos : pos + size]
            pos += size
    except (IndexError, ValueError):
        return None
    ids, lengths, data = fields.get(2, b""), fields.get(3, b""), fields.get(4, b"")
    if len(lengths) % 4:
        return None
    return ids, struct.unpack(f"<{len(lengths) // 4}I", lengths), data


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

    def __init__(self, done: bytearray, chunks, sink: WindowAssembly, progress: Progress, key: str,
                 limit: _RateLimit):
        """done: which chunks an interrupted pull already left in place."""
        self.chunks = chunks
        self.sink = sink
        self.progress = progress
        self.key = key
        self.limit = limit
        self.positions: dict[bytes, list[int]] = {}
        for i, (_, _, cid) in enumerate(chunks):
            if not done[i]:
                self.positions.setdefault(cid, []).append(i)
        self.stats = BlobPullStats(resumed_bytes=sum(c[1] for i, c in enumerate(chunks) if done[i]))
        self.lock = threading.Lock()
        self.error: Exception | None = None

    def put(self, cid: bytes, data, source: str) -> bool:
        """Place a chunk at all its offsets if it hashes to its id; False when it does not."""
        if native.blake3(data) != cid:
            return False
        idxs = self.positions.pop(cid, ())
        for i in idxs:
            self.sink.put(self.chunks[i][0], data)
        self._count(len(data), len(data) * len(idxs), source == "local")
        return True

    def put_batch(self, ids, lengths, data) -> list[bytes]:
        """Place the chunks of a packed batch (see bad_chunks for ids, lengths) at all their
        offsets, one piece per run of them that lies next to each other in the blob; returns the
        ids of the chunks whose bytes do not hash to their id (not placed)."""
        bad = set(bad_chunks(data, lengths, ids))
        runs: list[list[int]] = []  # [offset in the blob, start in data, end in data]
        received = placed = pos = 0
        for k, length in enumerate(lengths):
            if k not in bad:
                idxs = self.positions.pop(bytes(ids[ID_SIZE * k : ID_SIZE * (k + 1)]), ())
                for i in idxs:
                    off = self.chunks[i][0]
                    last = runs[-1] if runs else None
                    if last is not None and last[2] == pos and last[0] + (last[2] - last[1]) == off:
                        last[2] = pos + length
                    else:
                        runs.append([off, pos, pos + length])
                received += length
                placed += length * len(idxs)
            pos += length
        view = memoryview(data)
        for off, start, end in runs:
            self.sink.put(off, view[start:end])
        self._count(received, placed, False)
        return [bytes(ids[ID_SIZE * k : ID_SIZE * (k + 1)]) for k in sorted(bad)]

    def _count(self, received: int, placed: int, local: bool) -> None:
        with self.lock:
            if local:
                self.stats.local_bytes += placed
            else:
                self.stats.fetched_bytes += received
                self.stats.local_bytes += placed - received
        if placed:
            self.progress.advance(self.key, placed)


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


def _receive(asm: _BlobAssembly, raw: bytes) -> tuple[list[bytes], int]:
    """Write the chunks of one FetchChunks message; returns the ids of the corrupt ones and the
    bytes received."""
    packed = _parse_packed(raw)
    if packed is None:
        try:
            message = registry_pb2.ChunkBatch.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError
            raise TransferError(f"the source sent a malformed FetchChunks message: {exc}") from None
        if message.chunks:  # a server that does not pack
            bad = [c.id for c in message.chunks if not asm.put(c.id, c.data, "remote")]
            return bad, sum(len(c.data) for c in message.chunks)
        packed = message.ids, tuple(message.lengths), message.data
    ids, lengths, data = packed
    if len(ids) != ID_SIZE * len(lengths) or sum(lengths) != len(data):
        raise TransferError(f"the source sent a malformed FetchChunks message ({len(lengths)} lengths, "
                            f"{len(ids)} bytes of ids, {len(data)} bytes of data)")
    return asm.put_batch(ids, lengths, data), len(data)


def _fetch_worker(fetch, work: "queue.Queue[list[bytes]]", asm: _BlobAssembly, digest: str, retries: dict) -> None:
    # Under a rate limit, messages of about 1/8 s each, so that the limit paces the stream evenly.
    batch = int(min(BATCH_BYTES, max(64 << 10, asm.limit.rate / 8))) if asm.limit.rate else BATCH_BYTES
    while asm.error is None:
        try:
            unit = work.get_nowait()
        except queue.Empty:
            return
        try:
            with asm.lock:  # chunks that arrived corrupt are asked again with the source checking them
                verify = any(cid in retries for cid in unit)
            request = registry_pb2.FetchChunksRequest(ids=unit, blob_digest=digest, packed=True, batch_bytes=batch,
                                                      verify=verify)
            for raw in fetch(request):
                bad, nbytes = _receive(asm, raw)
                for cid in bad:
                    with asm.lock:
                        retries[cid] = retries.get(cid, 0) + 1
                        if retries[cid] >= MAX_TRIES:
                            raise TransferError(f"chunk {cid.hex()} of blob {digest} arrived corrupt "
                                                f"{MAX_TRIES} times; giving up")
                    work.put([cid])
                asm.limit.consumed(nbytes)
                if asm.error is not None:
                    return
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DATA_LOSS:
                asm.error = TransferError(f"the source reports corrupt data: {exc.details()}")
            else:
                asm.error = _rpc_error(exc, f"fetching chunks of blob {digest}")
        except Exception as exc:  # noqa: BLE001 - handed to the pulling thread
            asm.error = exc


def ingest_ref(digest: str) -> str:
    """The store ingest a chunk pull of blob digest writes, and resumes after a failure."""
    return f"{parse_digest(digest)}.chunks"


def pull_blob(store: ContentStore, source: ChunkSource, digest: str, progress: Progress, key: str,
              limit_rate: float | None = None) -> BlobPullStats:
    """Pull one blob into the store (see the module docstring); returns what came from where."""
    retain_freed_buffers()
    size, chunks = source.chunk_index(digest)
    if why := tiling_error(chunks, size):
        raise TransferError(f"blob {digest}: the source's chunk index {why}")
    # The resume marks: one per chunk, kept for this chunk index only (the source's may change).
    ingest = store.writer(ingest_ref(digest), size=size, marks=len(chunks),
                          marks_key=native.blake3(pack_chunk_index(chunks)))
    sink = None
    try:
        sink = WindowAssembly(ingest.fileno(), size, chunks, ingest.marks, direct_fd=ingest.direct_fileno(),
                              label=f"blob {digest} in the store at {store.root}")
        asm = _BlobAssembly(ingest.marks, chunks, sink, progress, key, _RateLimit(limit_rate))
        progress.advance(key, asm.stats.resumed_bytes)
        ids = list(asm.positions)
        sizes = {chunks[idxs[0]][2]: chunks[idxs[0]][1] for idxs in asm.positions.values()}
        missing = []
        have = store.known_chunks(ids)
        for cid in ids:
            if not (cid in have and asm.put(cid, store.read_chunk(cid), "local")):
                missing.append(cid)
        work: queue.Queue = queue.Queue()
        for unit in _units(missing, sizes):
            work.put(unit)
        retries: dict[bytes, int] = {}
        threads = [threading.Thread(target=_fetch_worker, args=(fetch, work, asm, digest, retries), daemon=True)
                   for fetch in source.fetchers[: max(1, min(len(source.fetchers), work.qsize()))]]
        for t in threads:
            t.start()
        # Each window written is made durable, with its chunks' marks, right away: a kill loses
        # only what arrived since (an fdatasync after an O_DIRECT write costs ~1-3 ms).
        marked = sink.marked
        while any(t.is_alive() for t in threads):
            if (now := sink.wait_marked(marked, timeout=0.05)) != marked:
                marked = now
                ingest.checkpoint()
        if asm.error is not None:
            raise _disk_error(store, digest, asm.error)
        if asm.positions:  # a retried chunk whose worker had already finished
            raise TransferError(f"blob {digest}: {len(asm.positions)} chunks were not received")
        try:
            sha = sink.finish()
        except Exception as exc:  # noqa: BLE001 - said as one line (see _disk_error)
            raise _disk_error(store, digest, exc) from None
        finally:
            sink = None
        ingest.checkpoint()
        if "sha256:" + sha.hex() != digest:
            ingest.abort()
            raise DigestMismatch(f"blob {digest} from {source.address} assembles to sha256:{sha.hex()}")
        ingest.commit_assembled(digest, chunks, sha)
        progress.done(key)
        return asm.stats
    finally:
        if sink is not None:  # the pull failed: keep in the marks what the assembly wrote
            sink.stop()
            with contextlib.suppress(StoreError):
                ingest.checkpoint()
        ingest.close()


def _disk_error(store: ContentStore, digest: str, exc: BaseException) -> BaseException:
    """exc, or for a failure to read or write the blob's file (a full disk, a bad device), one line
    naming the store."""
    if isinstance(exc, OSError):
        return StoreError(f"blob {digest}: cannot write to the store at {store.root}: {exc.strerror or exc}")
    return exc
