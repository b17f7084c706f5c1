"""Dedup: three related models in one store, against file-level dedup (Ollama, KitOps), side by side.

    python bench/dedup.py [--preset bench_1b|smollm2_135m] [--workdir DIR]

1. the base (a generated llama-shaped bf16 model, at least 1 GB for the default preset);
2. a fine-tune: the base with 10% of its tensors changed;
3. the base's tensors in another order, with an extra metadata key in the safetensors header.
Each is built as an aimage into one fresh store. File-level dedup stores every file whose bytes
differ: all three weight files here.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clowderd.aimage.build import build  # noqa: E402
from clowderd.aimage.clowderfile import load_clowderfile  # noqa: E402
from clowderd.store.content import ContentStore, file_sha256  # noqa: E402
from bench.ingest import PRESETS, figure  # noqa: E402
from tests import modelgen  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="bench_1b")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="clowder-bench-dedup-") as tmp:
        tmp = Path(tmp)
        base = modelgen.write_llama(tmp / "base", **PRESETS[args.preset])
        changed = modelgen.write_variant(base, tmp / "finetune", change_fraction=0.1)
        modelgen.write_reordered(base, tmp / "reordered", {"clowder.bench": "reordered"})
        base_bytes = dir_bytes(base)
        print(f"base {base_bytes / 1e9:.2f} GB; fine-tune changes {len(changed)} tensors")

        store = ContentStore(tmp / "store")
        for name in ("base", "finetune", "reordered"):
            cf = tmp / f"{name}.Clowderfile"
            cf.write_text(f"base: ./{name}\n")
            t = time.perf_counter()
            result = build(store, load_clowderfile(cf), f"bench:{name}")
            usage = store.usage()
            print(f"{name:10s} built in {time.perf_counter() - t:5.1f} s: {result.stored_bytes / 1e9:6.3f} GB new; "
                  f"store holds {usage.stored_bytes / 1e9:.3f} GB for {usage.logical_bytes / 1e9:.3f} GB logical")

        # File-level dedup keeps one copy per distinct file content.
        distinct: dict[str, int] = {}
        for name in ("base", "finetune", "reordered"):
            for p in (tmp / name).rglob("*"):
                if p.is_file():
                    distinct[file_sha256(p)] = p.stat().st_size
        file_level = sum(distinct.values())
        ours = store.usage().stored_bytes
        print(f"stored: clowder {ours / 1e9:.3f} GB, file-level dedup {file_level / 1e9:.3f} GB, base {base_bytes / 1e9:.3f} GB")
        print(figure("dedup_stored_vs_base", ours / base_bytes, "x", "<=", 1.15))
        print(figure("file_level_dedup_vs_clowder", file_level / ours, "x", ">=", 2.0))
        store.close()


if __name__ == "__main__":
    main()
