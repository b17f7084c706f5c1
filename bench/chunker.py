"""Chunking and hashing throughput: clowderd._native against pyfastcdc + blake3, side by side.

    python bench/chunker.py [--size-mb 1024] [--repeat 5]

Data is bf16-like (normal floats truncated to bf16 bit patterns), held in memory, so every pass reads
it from DRAM, as the store's ingest and a pull's check do. Rows are measured in turns (each repeat runs
every row once) and each keeps its best; one-thread rows count the thread's CPU time, so that other
programs on a shared machine do not count against whichever row they happened to overlap; the 2-thread
row counts wall time.

The BLAKE3 rows hash the same pieces with each kernel this CPU runs (clowderd._native.BLAKE3_KERNELS,
fastest first) and with the `blake3` package, which picks its own best kernel (AVX-512 where there is
one): the figures compare our default kernel against it.
"""
import argparse
import os
import sys
import time

import blake3
import numpy as np
from pyfastcdc.cy import FastCDC

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clowderd import _native  # noqa: E402


def bf16_like(n_bytes):
    floats = np.random.default_rng(0).standard_normal(n_bytes // 2, dtype=np.float32)
    return (floats.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def with_kernel(kernel, fn):
    """fn run with `kernel` as the BLAKE3 kernel, the default one put back after."""
    def run():
        previous = _native.blake3_use_kernel(kernel)
        try:
            fn()
        finally:
            _native.blake3_use_kernel(previous)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    data = bf16_like(args.size_mb << 20)
    view = memoryview(data)
    gb = len(data) / 1e9
    pieces_64k = [view[i:i + (64 << 10)] for i in range(0, len(data) - (64 << 10) + 1, 64 << 10)]
    pieces_1m = [view[i:i + (1 << 20)] for i in range(0, len(data) - (1 << 20) + 1, 1 << 20)]
    cdc = FastCDC(avg_size=65536)

    def pyfastcdc_cut():
        for _ in cdc.cut_buf(data):
            pass

    def pyfastcdc_blake3():
        for c in cdc.cut_buf(data):
            blake3.blake3(c.data).digest()

    default = _native.BLAKE3_KERNEL
    rows = {  # name: (function, timer)
        "clowder chunk()+blake3, threads=1": (lambda: _native.chunk(data, threads=1), time.thread_time),
        "clowder chunk()+blake3, threads=2": (lambda: _native.chunk(data, threads=2), time.perf_counter),
        "pyfastcdc cut only, 1 core": (pyfastcdc_cut, time.thread_time),
        "pyfastcdc + blake3 package, 1 core": (pyfastcdc_blake3, time.thread_time),
    }
    for size, pieces in (("64 KiB", pieces_64k), ("1 MiB", pieces_1m)):
        rows[f"blake3 package, {size} pieces"] = (
            lambda pieces=pieces: [blake3.blake3(p).digest() for p in pieces], time.thread_time)
        for kernel in _native.BLAKE3_KERNELS:
            rows[f"clowder blake3 {kernel}, {size} pieces"] = (
                with_kernel(kernel, lambda pieces=pieces: [_native.blake3(p) for p in pieces]), time.thread_time)

    best = dict.fromkeys(rows, float("inf"))
    for _ in range(args.repeat):
        for name, (fn, timer) in rows.items():
            t = timer()
            fn()
            best[name] = min(best[name], timer() - t)
    speed = {name: gb / seconds for name, seconds in best.items()}

    print(f"{args.size_mb} MiB bf16-like data, best of {args.repeat}; "
          f"BLAKE3 kernels: {', '.join(_native.BLAKE3_KERNELS)} (default {default})")
    print(f"{'what':44} {'GB/s':>7}")
    for name in rows:
        print(f"{name:44} {speed[name]:7.2f}")
    ours = _native.chunk(data, threads=2)
    theirs = sum(1 for _ in cdc.cut_buf(data))
    print(f"chunks: clowder {len(ours)} (mean {len(data) / len(ours) / 1024:.0f} KiB), "
          f"pyfastcdc {theirs} (mean {len(data) / theirs / 1024:.0f} KiB)")

    def figure(name, value, unit, target):
        print(f"figure: {name} = {value:.2f} {unit} (target >= {target}) {'ok' if value >= target else 'short'}")

    figure("chunker_blake3_2cores", speed["clowder chunk()+blake3, threads=2"], "GB/s", 4.0)
    figure("chunker_blake3_vs_pyfastcdc_blake3",
           speed["clowder chunk()+blake3, threads=1"] / speed["pyfastcdc + blake3 package, 1 core"], "x", 1.0)
    for size, tag in (("64 KiB", "64k"), ("1 MiB", "1m")):
        figure(f"blake3_{tag}_vs_package",
               speed[f"clowder blake3 {default}, {size} pieces"] / speed[f"blake3 package, {size} pieces"], "x", 1.0)


if __name__ == "__main__":
    main()
