"""Chunking and hashing throughput: clowderd._native against pyfastcdc + blake3, side by side.

    python bench/chunker.py [--size-mb 1024]

Data is bf16-like (normal floats truncated to bf16 bit patterns), held in memory.
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


def best_seconds(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    n = args.size_mb << 20
    floats = np.random.default_rng(0).standard_normal(n // 2, dtype=np.float32)
    data = (floats.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    del floats
    view = memoryview(data)
    gb = len(data) / 1e9
    pieces = [view[i:i + 65536] for i in range(0, len(data) - 65535, 65536)]
    cdc = FastCDC(avg_size=65536)

    def pyfastcdc_cut():
        for _ in cdc.cut_buf(data):
            pass

    def pyfastcdc_blake3():
        for c in cdc.cut_buf(data):
            blake3.blake3(c.data).digest()

    rows = [
        ("clowder chunk()+blake3, threads=1", lambda: _native.chunk(data, threads=1)),
        ("clowder chunk()+blake3, threads=2", lambda: _native.chunk(data, threads=2)),
        ("clowder blake3 on 64 KiB pieces", lambda: [_native.blake3(p) for p in pieces]),
        ("blake3 package on 64 KiB pieces", lambda: [blake3.blake3(p).digest() for p in pieces]),
        ("pyfastcdc cut only, 1 core", pyfastcdc_cut),
        ("pyfastcdc + blake3 package, 1 core", pyfastcdc_blake3),
    ]
    speed = {}
    print(f"{args.size_mb} MiB bf16-like data, best of {args.repeat}; BLAKE3 kernel: {_native.BLAKE3_KERNEL}")
    print(f"{'what':40} {'GB/s':>7}")
    for name, fn in rows:
        speed[name] = gb / best_seconds(fn, args.repeat)
        print(f"{name:40} {speed[name]:7.2f}")
    ours = _native.chunk(data, threads=2)
    theirs = sum(1 for _ in cdc.cut_buf(data))
    print(f"chunks: clowder {len(ours)} (mean {len(data) / len(ours) / 1024:.0f} KiB), "
          f"pyfastcdc {theirs} (mean {len(data) / theirs / 1024:.0f} KiB)")

    def figure(name, value, unit, target):
        print(f"figure: {name} = {value:.1f} {unit} (target >= {target}) {'ok' if value >= target else 'short'}")

    figure("chunker_blake3_2cores", speed["clowder chunk()+blake3, threads=2"], "GB/s", 4.0)
    figure("chunker_blake3_vs_pyfastcdc_blake3",
           speed["clowder chunk()+blake3, threads=1"] / speed["pyfastcdc + blake3 package, 1 core"], "x", 1.0)


if __name__ == "__main__":
    main()
