"""Ingest: Clowder's one-pass ingest against an Ollama/KitOps-style sha256-then-copy, side by side.

    python bench/ingest.py [--preset bench_1b|smollm2_135m] [--repeat 3] [--workdir DIR]

A generated llama-shaped safetensors model (bf16, realistic tensor shapes, at least 1 GB for the
default preset) is read from the page cache by every path:
- clowder:      ContentStore.ingest_file (sha256 + FastCDC + BLAKE3 per chunk + copy, one pass,
                fsync and rename, index rows committed), tensor boundaries forced as cuts
- anchor:       hashlib.sha256 over the file in 1 MiB reads, then shutil.copyfile into
                blobs/sha256-<hex> (what Ollama's and KitOps' ingest amount to; no fsync)
- anchor+fsync: the same, then fsync, for the same durability as Clowder's
- chunker:      clowderd._native.chunk over the mapped file, both cores (cut + BLAKE3 only)
"""
import argparse
import hashlib
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clowderd import _native  # noqa: E402
from clowderd.aimage.safetensors import read_header, tensor_boundaries  # noqa: E402
from clowderd.store.content import ContentStore, file_sha256  # noqa: E402
from tests import modelgen  # noqa: E402

PRESETS = {"bench_1b": modelgen.BENCH_1B, "smollm2_135m": modelgen.SMOLLM2_135M}


def figure(name: str, value: float, unit: str, op: str, target: float) -> str:
    ok = value >= target if op == ">=" else value <= target
    return f"figure: {name} = {value:.2f} {unit} (target {op} {target}) {'ok' if ok else 'short'}"


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def anchor_ingest(src: Path, blob_dir: Path, fsync: bool) -> None:
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    dst = blob_dir / f"sha256-{h.hexdigest()}"
    shutil.copyfile(src, dst)
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def clowder_ingest(src: Path, root: Path, cuts) -> None:
    store = ContentStore(root)
    store.ingest_file(src, cuts)
    store.close()


def chunker_only(src: Path, cuts) -> None:
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        _native.chunk(m, cuts, threads=2)


def timed(fn, repeat: int, reset) -> float:
    """Best wall time of repeat runs; reset() runs before each, untimed (sync, clean dirs)."""
    best = float("inf")
    for _ in range(repeat):
        reset()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="bench_1b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="clowder-bench-ingest-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        model = modelgen.write_llama(tmp / "model", **PRESETS[args.preset])
        src = model / "model.safetensors"
        size = src.stat().st_size
        print(f"model: {src} {size / 1e9:.2f} GB bf16, written in {time.perf_counter() - t:.1f} s")
        cuts = tensor_boundaries(read_header(src))
        warm(src)
        gb = size / 1e9

        def reset():
            for d in ("store", "anchor"):
                shutil.rmtree(tmp / d, ignore_errors=True)
            (tmp / "anchor").mkdir()
            os.sync()
            warm(src)

        results = {
            "clowder ingest (one pass, fsync, index)": timed(lambda: clowder_ingest(src, tmp / "store", cuts), args.repeat, reset),
            "anchor: sha256, then copy": timed(lambda: anchor_ingest(src, tmp / "anchor", False), args.repeat, reset),
            "anchor: sha256, then copy, fsync": timed(lambda: anchor_ingest(src, tmp / "anchor", True), args.repeat, reset),
            "sha256 alone (hashlib over the mapped file)": timed(lambda: file_sha256(src), 1, reset),
            "chunker + BLAKE3 alone, 2 threads": timed(lambda: chunker_only(src, cuts), args.repeat, reset),
        }
        print(f"{'path':45s} {'seconds':>8s} {'GB/s':>6s}")
        for name, sec in results.items():
            print(f"{name:45s} {sec:8.3f} {gb / sec:6.2f}")
        clowder = results["clowder ingest (one pass, fsync, index)"]
        print(f"native BLAKE3 kernel: {_native.BLAKE3_KERNEL}")
        print(figure("ingest_vs_sha256_copy", results["anchor: sha256, then copy"] / clowder, "x", ">=", 1.5))
        print(figure("ingest_vs_sha256_copy_fsync", results["anchor: sha256, then copy, fsync"] / clowder, "x", ">=", 1.5))
        print(figure("chunker_blake3_2cores", gb / results["chunker + BLAKE3 alone, 2 threads"], "GB/s", ">=", 4.0))


if __name__ == "__main__":
    main()
