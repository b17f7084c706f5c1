"""A pulled blob assembled from pieces in any order: aligned windows in memory, each written whole as
soon as it is complete, and hashed in blob order.

Chunks arrive out of order from several streams. Each piece is copied into the buffer of the window
it falls in (8 MiB, smaller for a blob under 256 MiB, so that a resumed pull still finds some of it
done; page-aligned, from a small pool). The moment every byte of a window is there, whichever
window it is, one thread writes it with a single O_DIRECT pwrite: the bytes go from that buffer to
the device, with no page cache to fill and no dirty pages for fsync or the kernel's dirty-page
throttling to wait on. On a VM where buffered writes to a fresh file crawl once a few GB are
dirty, that is what lets a pull run at the network's speed. Another thread adds the windows to the
blob's sha256 in blob order, each once it is written, from its buffer while it is still there.

A chunk is marked done (for the resume journal) once every window it touches is written. Windows
are written as they complete, not in blob order, so a pull killed while one stream lags keeps
every whole window the others brought, not only those before the first gap.

Memory is bounded: a piece for a window more than AHEAD windows past the one being hashed (a slow
stream, a chunk repeated far away, chunks from the local store) is written through the page cache
at once and read back when its window's turn comes, as are the chunks of an interrupted pull that
are already in the file. A window with some bytes in the file already is read back whole and
written through the page cache as well (not at all when all of it was there): a direct write would
first have the kernel write back its dirty pages. Where the filesystem refuses O_DIRECT, or the
device refuses a write for its alignment, the windows are written with plain pwrite, and the
result is the same.
"""
from __future__ import annotations

import bisect
import errno
import hashlib
import mmap
import os
import queue
import threading
from typing import Sequence

from clowderd.distribution.errors import TransferError

WINDOW = 8 << 20
MIN_WINDOW = 64 << 10
AHEAD = 12  # windows that may sit in memory ahead of the one being hashed
ALIGN = 4096  # O_DIRECT offset, length and buffer alignment (a page: safe for any block size)


def window_size(size: int) -> int:
    """At least 32 windows per blob where that keeps them over MIN_WINDOW: a window is also the
    unit in which a killed pull's progress is kept."""
    w = WINDOW
    while w > MIN_WINDOW and size < 32 * w:
        w //= 2
    return w


def write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_into(fd: int, buf: memoryview, offset: int, label: str) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise TransferError(f"{label} ended at {offset} while reading it back")
        buf, offset = buf[n:], offset + n


class WindowAssembly:
    """The blob in the file open read-write as fd (already its full size) assembled from `chunks`
    (offset, length, id), which tile it; chunks already marked in `done` are in the file.
    direct_fd: a descriptor of the same file opened with O_DIRECT, or -1. label names the blob in
    errors. put() may be called from any thread; finish() returns the sha256 once every byte is
    written. `marked` counts the chunks marked done so far (a caller checkpoints when it grows)."""

    def __init__(self, fd: int, size: int, chunks: Sequence[tuple[int, int, bytes]], done: bytearray, *,
                 direct_fd: int = -1, label: str = "the blob"):
        self.fd, self.direct_fd, self.size, self.label = fd, direct_fd, size, label
        self.chunks, self.done = chunks, done
        self.starts = [off for off, _, _ in chunks]
        self.marked = sum(done)
        self.window = window_size(size)
        self.nwin = (size + self.window - 1) // self.window
        self.need = [min(self.window, size - w * self.window) for w in range(self.nwin)]  # bytes not yet there
        self.on_disk: list[list[tuple[int, int]]] = [[] for _ in range(self.nwin)]
        self.written = bytearray(self.nwin)  # every byte of the window is in the file
        self.bufs: dict[int, mmap.mmap] = {}
        self.pool: list[mmap.mmap] = []
        self.cond = threading.Condition()
        self.next_window = 0  # the window the hashing thread waits for (or hashes)
        for i, (off, length, _) in enumerate(chunks):
            if done[i]:
                for w, off_w, n in self._pieces(off, off + length):
                    self.on_disk[w].append((off_w, n))
                    self.need[w] -= n
        for w in range(self.nwin):
            self.written[w] = not self.need[w]
        self.sha = hashlib.sha256()
        self.stopped = False
        self.error: BaseException | None = None
        self.complete: queue.Queue = queue.Queue()  # windows complete in memory, to be written
        self.threads = [threading.Thread(target=self._guard, args=(fn,), name=name, daemon=True)
                        for fn, name in ((self._hash_windows, "assembly-sha256"), (self._write_windows, "assembly-write"))]
        for t in self.threads:
            t.start()

    # -- producers --------------------------------------------------------------------------
    def put(self, offset: int, data) -> None:
        """Place data (the exact bytes of [offset, offset + len)) in the blob."""
        view = memoryview(data).cast("B")
        start, end = offset, offset + len(view)
        if offset < 0 or end > self.size:
            raise TransferError(f"{self.label}: bytes [{offset}, {end}) fall outside the blob's {self.size}")
        for w, off, n in self._pieces(start, end):
            piece = view[off - start : off - start + n]
            with self.cond:
                if self.stopped:  # a failed pull: nothing more goes into the file
                    raise self.error or TransferError(f"{self.label}: the assembly was stopped")
                if w < self.next_window or n > self.need[w]:
                    raise TransferError(f"{self.label}: bytes at offset {off} arrived twice")
                buf = None
                if w < self.next_window + AHEAD:
                    buf = self.bufs.get(w)
                    if buf is None:
                        buf = self.bufs[w] = self._buffer()
            if buf is None:
                write_all(self.fd, piece, off)
            else:
                at = off - w * self.window
                buf[at : at + n] = piece
            with self.cond:
                if buf is None:
                    self.on_disk[w].append((off, n))
                self.need[w] -= n
                if not self.need[w]:
                    if w in self.bufs:
                        self.complete.put(w)
                    else:  # every piece of it went to the file already
                        self._window_written(w)

    def _pieces(self, offset: int, end: int):
        """(window, offset, length) of each piece of [offset, end) that lies in one window."""
        while offset < end:
            w = offset // self.window
            n = min((w + 1) * self.window, end) - offset
            yield w, offset, n
            offset += n

    def _buffer(self) -> mmap.mmap:
        # Anonymous maps are page-aligned, as O_DIRECT wants; reused, so each is faulted in once.
        return self.pool.pop() if self.pool else mmap.mmap(-1, self.window)

    def _window_written(self, w: int) -> None:
        """Under cond: window w is all in the file; mark the chunks whose windows all are."""
        self.written[w] = 1
        lo, hi = w * self.window, (w + 1) * self.window
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        chunks, done, written, window = self.chunks, self.done, self.written, self.window
        while i < len(chunks) and chunks[i][0] < hi:
            off, length, _ = chunks[i]
            if not done[i] and all(written[v] for v in range(off // window, (off + length - 1) // window + 1)):
                done[i] = 1
                self.marked += 1
            i += 1
        self.cond.notify_all()

    def wait_marked(self, seen: int, timeout: float) -> int:
        """`marked` once it differs from seen, or after timeout."""
        with self.cond:
            self.cond.wait_for(lambda: self.marked != seen, timeout)
            return self.marked

    # -- the two threads ----------------------------------------------------------------------
    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to finish()
            with self.cond:
                if self.error is None:
                    self.error = exc
                self.stopped = True
                self.cond.notify_all()

    def _write_windows(self) -> None:
        """Write each window as it completes, until finish() or stop() says there are no more."""
        while (w := self.complete.get()) is not None:
            with self.cond:
                if self.stopped and self.error is not None:
                    return
                buf, ranges = self.bufs[w], self.on_disk[w]
            base, length = w * self.window, min(self.window, self.size - w * self.window)
            view = memoryview(buf)
            try:
                for off, n in ranges:  # make the buffer whole, so that it is hashed from memory
                    read_into(self.fd, view[off - base : off - base + n], off, self.label)
            finally:
                view.release()
            self._write(buf, base, length, direct=not ranges)
            with self.cond:
                self._window_written(w)

    def _hash_windows(self) -> None:
        for w in range(self.nwin):
            with self.cond:
                while not self.written[w] and not self.stopped:
                    self.cond.wait()
                if not self.written[w]:  # stopped: the windows that were complete are still written
                    return
                staged = self.bufs.pop(w, None)
                buf = staged or self._buffer()
                self.next_window = w + 1
            base, length = w * self.window, min(self.window, self.size - w * self.window)
            view = memoryview(buf)
            if staged is None:  # every byte of it went to the file: read it back
                read_into(self.fd, view[:length], base, self.label)
            self.sha.update(view[:length])
            view.release()
            with self.cond:
                self.pool.append(buf)

    def _write(self, buf: mmap.mmap, base: int, length: int, direct: bool) -> None:
        view = memoryview(buf)
        try:
            # The last window's partial block goes through the page cache: the file keeps its size.
            whole = length - length % ALIGN if direct and self.direct_fd >= 0 else 0
            if whole:
                try:
                    write_all(self.direct_fd, view[:whole], base)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # A device that wants coarser alignment than ALIGN: the page cache from here on.
                    self.direct_fd = -1
                    write_all(self.fd, view[:whole], base)
            if whole < length:
                write_all(self.fd, view[whole:length], base + whole)
        finally:
            view.release()

    # -- the end ------------------------------------------------------------------------------
    def finish(self) -> bytes:
        """The sha256 of the blob, once every window is written and hashed."""
        self.threads[0].join()  # the hashing thread ends after the last window (or on a failure)
        self._end()
        if self.error is not None:
            raise self.error
        if self.next_window != self.nwin:
            raise TransferError(f"{self.label}: assembled {self.next_window} of {self.nwin} windows")
        return self.sha.digest()

    def stop(self) -> None:
        """Abandon the assembly (a failed pull): the windows already complete are written (and
        their chunks marked), then the threads end."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.threads[0].join()
        self._end()

    def _end(self) -> None:
        self.complete.put(None)  # after every window already queued: the writer writes them first
        self.threads[1].join()
        for buf in [*self.pool, *self.bufs.values()]:
            buf.close()
        self.pool.clear()
        self.bufs.clear()
