"""Pull: a chunk-aware pull between two Clowder nodes against skopeo and curl from docker-registry.

    python bench/pull.py [--preset bench_1b|smollm2_135m|tiny] [--streams 4] [--workdir DIR] [--kills 5]

A generated llama-shaped model (1.54 GB for bench_1b) and a fine-tune of it (write_variant, 10% of
tensors changed) are built into the store of a clowderd with the controller and storage roles (node A),
whose chunk API takes only certificates of its cluster. The base is also pushed to Debian's
docker-registry. Every transfer runs over loopback, reading from the page cache:
- clowder pull: `clowderctl pull clowder://A/bench:base` into an empty data dir (a new process: an admin
                certificate for the admin token, then gRPC chunk streams over mutual TLS, BLAKE3 per
                chunk, assembly, sha256 + chunk index on ingest)
- skopeo copy:  `skopeo copy docker://REGISTRY/bench:base dir:DIR` (every layer of the same image)
- curl:         `curl -o FILE` of the big weights blob alone from the registry (the ceiling)
Each of the three runs --repeat times, in turn, each run into a fresh directory after an untimed
`sync` (so no run pays for the writeback of the one before); the best time of each counts.
Then: the variant pulled onto the node that has the base (bytes received / variant size), and
--kills pulls over --streams streams, each SIGKILLed at full speed once it has received a random
5-95% of the image and then run again. For each: (bytes the killed pull received, as the kernel
counted them on its connections to node A, + chunk bytes the second pull received) / the image's
size (its blobs' sizes summed); the figure is the mean over the kills, the worst is printed too.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.ingest import figure  # noqa: E402
from clowderd.aimage.build import build  # noqa: E402
from clowderd.aimage.clowderfile import load_clowderfile  # noqa: E402
from clowderd.distribution.push import push  # noqa: E402
from clowderd.distribution.refs import parse_remote  # noqa: E402
from clowderd.store.content import ContentStore  # noqa: E402
from tests import modelgen  # noqa: E402
from tests.clowderd_proc import REPO_ROOT, ClowderdProcess, _default_config  # noqa: E402
from tests.registry_proc import RegistryProcess  # noqa: E402

PRESETS = {"bench_1b": modelgen.BENCH_1B, "smollm2_135m": modelgen.SMOLLM2_135M, "tiny": modelgen.TINY}
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def clowderctl(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "clowderctl.main", "--data-dir", str(data_dir), *args]


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{r.stderr}")
    return seconds, r.stdout


def build_into(store: ContentStore, model_dir: Path, tag: str) -> str:
    cf = model_dir.parent / f"{model_dir.name}.Clowderfile"
    cf.write_text(f"base: {model_dir}\n")
    return build(store, load_clowderfile(cf), tag).manifest_digest


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def received_from(port: int) -> int:
    """Bytes the kernel has received so far on this machine's established TCP connections to port
    (`ss -ti`, bytes_received): what a pulling process got from the storage node on that port,
    counted below gRPC (framing, manifest and chunk indexes included), whether it read them yet or not."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))


def killed_then_resumed(data_dir: Path, ref: str, port: int, streams: int, total: int,
                        rng: random.Random) -> tuple[float, int, dict] | None:
    """Start a pull at full speed, SIGKILL it once it has received a random fraction (5-95%) of
    total, pull again. Returns the fraction, the bytes the killed pull had received from the node
    (read by `ss` while the process is stopped, just before the kill) and the second pull's result;
    None when the pull ended before the kill."""
    target = rng.uniform(0.05, 0.95)
    proc = subprocess.Popen(clowderctl(data_dir, "pull", "-q", "--streams", str(streams), ref), env=ENV,
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    received = 0
    while proc.poll() is None:
        if received_from(port) >= target * total:
            proc.send_signal(signal.SIGSTOP)  # frozen at a random point of its work
            received = received_from(port)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    if not received:
        return None
    _, out = timed(clowderctl(data_dir, "pull", "-o", "json", "--streams", str(streams), ref))
    return target, received, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="bench_1b")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--kills", type=int, default=5, help="pulls killed at a random moment and resumed")
    ap.add_argument("--seed", type=int, default=None, help="for the moments of the kills")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=args.workdir))
    node = registry = None
    try:
        print(f"generating {args.preset} and a variant in {work} ...", flush=True)
        base = modelgen.write_llama(work / "models" / "base", **PRESETS[args.preset])
        modelgen.write_variant(base, work / "models" / "variant", change_fraction=0.1)
        roles = ("controller", "storage")
        cfg = _default_config(work / "node-a", roles)
        (work / "node-a").mkdir()
        node = ClowderdProcess(work / "node-a", cfg, roles)
        node.wait_ready()
        # clowderctl pulls as an admin: the certificate it gets for the admin token opens the chunk API.
        ENV.update(CLOWDER_CONTROLLER=node.addresses["controller"],
                   CLOWDER_TOKEN=(node.data_dir / "controller" / "admin-token").read_text().strip())
        store = ContentStore(node.data_dir / "store")
        build_into(store, base, "bench:base")
        build_into(store, work / "models" / "variant", "bench:variant")
        registry = RegistryProcess(work)
        registry.wait_ready()
        push(store, "bench:base", parse_remote(f"{registry.host}/bench:base"))
        base_blobs = [b for b in store.blobs() if b.digest in set(_image_blobs(store, "bench:base"))]
        big = max(base_blobs, key=lambda b: b.size)
        total = sum(b.size for b in base_blobs)
        for b in store.blobs():
            warm(store.path(b.digest))
        for p in (registry.root).rglob("data"):
            warm(p)
        store.close()
        src = f"clowder://{node.addresses['storage']}"

        best = {"clowder": float("inf"), "skopeo": float("inf"), "curl": float("inf")}
        for _ in range(args.repeat):  # the last clowder pull's dst-1 gets the variant below
            for d in (work / "dst-1", work / "skopeo", work / "curl.blob"):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            os.sync()
            t, _ = timed(clowderctl(work / "dst-1", "pull", "-q", "--streams", str(args.streams), f"{src}/bench:base"))
            best["clowder"] = min(best["clowder"], t)
            os.sync()
            t, _ = timed(["skopeo", "copy", "--src-tls-verify=false", f"docker://{registry.host}/bench:base",
                          f"dir:{work / 'skopeo'}"])
            best["skopeo"] = min(best["skopeo"], t)
            os.sync()
            t, _ = timed(["curl", "-sSf", "-o", str(work / "curl.blob"),
                          f"http://{registry.host}/v2/bench/blobs/{big.digest}"])
            best["curl"] = min(best["curl"], t)
        t_pull, t_skopeo, t_curl = best["clowder"], best["skopeo"], best["curl"]
        rows = [("clowder pull (chunk-aware gRPC)", total, t_pull), ("skopeo copy docker:// -> dir:", total, t_skopeo),
                ("curl -o (weights blob only)", big.size, t_curl)]

        _, out = timed(clowderctl(work / "dst-1", "pull", "-o", "json", f"{src}/bench:variant"))
        variant = json.loads(out)
        variant_size = sum(p.stat().st_size for p in (work / "models" / "variant").iterdir())
        rng, kills = random.Random(args.seed), []
        for _ in range(3 * args.kills):
            if len(kills) == args.kills:
                break
            shutil.rmtree(work / "dst-2", ignore_errors=True)
            got = killed_then_resumed(work / "dst-2", f"{src}/bench:base", int(src.rsplit(":", 1)[1]), args.streams,
                                      total, rng)
            if got is not None:
                kills.append(got)

        print(f"\n{'transfer':<34} {'bytes':>14} {'seconds':>8} {'GB/s':>6}")
        for name, nbytes, seconds in rows:
            print(f"{name:<34} {nbytes:>14,} {seconds:>8.2f} {nbytes / seconds / 1e9:>6.2f}")
        print(f"variant pull: {variant['fetched_bytes']:,} bytes received of {variant_size:,}; "
              f"{variant['local_bytes']:,} from local chunks")
        overheads = []
        for target, received, resumed in kills:
            overheads.append((received + resumed["fetched_bytes"]) / total)
            print(f"killed at {target:4.0%}: {received:,} bytes received; the resumed pull received "
                  f"{resumed['fetched_bytes']:,} and found {resumed['resumed_bytes']:,} in place: "
                  f"{overheads[-1]:.3f} x the image's {total:,} bytes")
        print()
        print(figure("pull_vs_skopeo", t_skopeo / t_pull, "x", ">=", 2.0))
        print(figure("pull_vs_curl", (total / t_pull) / (big.size / t_curl), "x", ">=", 0.8))
        print(figure("variant_pull_bytes_sent", variant["fetched_bytes"] / variant_size, "of variant size", "<=", 0.15))
        if len(kills) >= 5:
            print(f"resumed pulls: worst {max(overheads):.3f} x, mean over {len(kills)} kills below")
            print(figure("resumed_pull_bytes_overhead", sum(overheads) / len(overheads), "x of the image's size",
                         "<=", 1.1))
        else:
            print(f"figure: resumed_pull_bytes_overhead = n/a (only {len(kills)} pulls could be killed before "
                  "they ended) short")
    finally:
        if node is not None:
            node.stop()
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def _image_blobs(store: ContentStore, name: str) -> list[str]:
    from clowderd.store.images import ImageIndex

    index = ImageIndex(store)
    return index.image_blobs(index.resolve(name))


if __name__ == "__main__":
    main()
