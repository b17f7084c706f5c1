"""A pulled blob assembled in order: aligned windows in memory, each hashed and then written whole.

Chunks arrive out of order from several streams. Each piece is copied into the buffer of the window
it falls in (8 MiB, smaller for a blob under 256 MiB, so that a resumed pull still finds some of it
done; page-aligned, from a small pool). When every byte of the next window in blob
order is there, one thread adds it to the blob's sha256 and another writes it with a single
O_DIRECT pwrite: the bytes go from that buffer to the device, with no page cache to fill and no
dirty pages for fsync or the kernel's dirty-page throttling to wait on. On a VM where buffered
writes to a fresh file crawl once a few GB are dirty, that is what lets a pull run at the network's
speed. A chunk is marked done (for the resume journal) once the window holding its last byte is
written; windows are written in order, so all of its bytes are.

Memory is bounded: a piece for a window more than AHEAD windows past the one being hashed (a slow
stream, a chunk repeated far away, chunks from the local store) is written through the page cache
at once and read back when its window's turn comes, as are the chunks of an interrupted pull that
are already in the file. Such a window is written through the page cache as well (not at all when
all of it was there): a direct write would first have the kernel write back its dirty pages. Where
the filesystem refuses O_DIRECT, or the device refuses a write for its alignment, the windows are
written with plain pwrite, and the result is the same.
"""
from __future__ import annotations

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


def open_direct(path) -> int:
    """A write descriptor of path that bypasses the page cache, or -1 where that is refused."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
        raise


def write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_into(fd: int, buf: memoryview, offset: int, path) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise TransferError(f"{path} ended at {offset} while reading it back")
        buf, offset = buf[n:], offset + n


class WindowAssembly:
    """The blob at `path` (already its full size, open read-write as fd) assembled from `chunks`
    (offset, length, id), which tile it; chunks already marked in `done` are in the file. put()
    may be called from any thread; finish() returns the sha256 once every byte is written."""

    def __init__(self, fd: int, path, size: int, chunks: Sequence[tuple[int, int, bytes]], done: bytearray):
        self.fd, self.path, self.size = fd, path, size
        self.chunks, self.done = chunks, done
        self.window = window_size(size)
        self.nwin = (size + self.window - 1) // self.window
        self.need = [min(self.window, size - w * self.window) for w in range(self.nwin)]  # bytes not yet there
        self.on_disk: list[list[tuple[int, int]]] = [[] for _ in range(self.nwin)]
        self.bufs: dict[int, mmap.mmap] = {}
        self.pool: list[mmap.mmap] = []
        self.cond = threading.Condition()
        self.next_window = 0  # the window the hashing thread waits for (or hashes)
        self.next_mark = 0  # chunks before it are marked done
        for i, (off, length, _) in enumerate(chunks):
            if done[i]:
                self._landed_on_disk(off, length)
        self.sha = hashlib.sha256()
        self.stopped = False
        self.error: BaseException | None = None
        self.direct_fd = open_direct(path)
        self.written: queue.Queue = queue.Queue(maxsize=4)
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
            raise TransferError(f"{self.path}: bytes [{offset}, {end}) fall outside the blob's {self.size}")
        for w, off, n in self._pieces(start, end):
            piece = view[off - start : off - start + n]
            with self.cond:
                if w < self.next_window or n > self.need[w]:
                    raise TransferError(f"{self.path}: bytes at offset {off} arrived twice")
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
                    self.cond.notify_all()

    def _landed_on_disk(self, offset: int, length: int) -> None:
        for w, off, n in self._pieces(offset, offset + length):
            self.on_disk[w].append((off, n))
            self.need[w] -= n

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

    def _hash_windows(self) -> None:
        try:
            self._hash_each_window()
        finally:
            self.written.put(None)  # the writer's end

    def _hash_each_window(self) -> None:
        for w in range(self.nwin):
            with self.cond:
                while self.need[w] and not self.stopped:
                    self.cond.wait()
                if self.need[w]:  # stopped: the windows that were complete are still written
                    return
                staged = self.bufs.pop(w, None)
                buf = staged or self._buffer()
                ranges, self.on_disk[w] = self.on_disk[w], []
                self.next_window = w + 1
            base, length = w * self.window, min(self.window, self.size - w * self.window)
            view = memoryview(buf)
            for off, n in ranges:
                read_into(self.fd, view[off - base : off - base + n], off, self.path)
            self.sha.update(view[:length])
            view.release()
            # How the window is written: all of it from memory, by direct I/O; with some of it in the
            # file already, through the page cache (a direct write would first have the kernel write
            # back those dirty pages: every such byte twice to disk); all of it in the file: not at all.
            how = "none" if staged is None else "cached" if ranges else "direct"
            self.written.put((w, buf, length, how))

    def _write_windows(self) -> None:
        try:
            self._write_each_window()
        except BaseException:
            while self.written.get() is not None:  # keep taking windows: the hashing thread never blocks
                pass
            raise

    def _write_each_window(self) -> None:
        while (item := self.written.get()) is not None:
            w, buf, length, how = item
            base = w * self.window
            if how != "none":
                self._write(buf, base, length, direct=how == "direct")
            end = base + length
            chunks, done = self.chunks, self.done
            while self.next_mark < len(chunks) and chunks[self.next_mark][0] + chunks[self.next_mark][1] <= end:
                done[self.next_mark] = 1
                self.next_mark += 1
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
                    os.close(self.direct_fd)
                    self.direct_fd = -1
                    write_all(self.fd, view[:whole], base)
            if whole < length:
                write_all(self.fd, view[whole:length], base + whole)
        finally:
            view.release()

    # -- the end ------------------------------------------------------------------------------
    def finish(self) -> bytes:
        """The sha256 of the blob, once every window is hashed and written."""
        for t in self.threads:
            t.join()
        self._close()
        if self.error is not None:
            raise self.error
        if self.next_window != self.nwin:
            raise TransferError(f"{self.path}: assembled {self.next_window} of {self.nwin} windows")
        return self.sha.digest()

    def stop(self) -> None:
        """Abandon the assembly (a failed pull): the windows already complete are written, then
        the threads end."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()
        self._close()

    def _close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        for buf in [*self.pool, *self.bufs.values()]:
            buf.close()
        self.pool.clear()
        self.bufs.clear()
