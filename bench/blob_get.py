"""The OCI blob GET of a storage node, each chunk checked against its id before it is sent, against
Debian's docker-registry sending the same blob from its filesystem unchecked.

    python bench/blob_get.py [--size-gb 1] [--repeat 3] [--workdir DIR]

A blob of random bytes is ingested into the store of a clowderd storage node and linked into a
repository, and pushed to docker-registry. curl GETs it from each over loopback into /dev/null, in
turn, --repeat times, everything in the page cache (each is fetched once first, untimed); the best
time of each counts. Then a ranged GET of the middle half from the node, as curl resumes it.
"""
import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.ingest import figure  # noqa: E402
from clowderd.store.content import ContentStore  # noqa: E402
from clowderd.store.images import ImageIndex  # noqa: E402
from tests.clowderd_proc import ClowderdProcess, _default_config  # noqa: E402
from tests.registry_proc import RegistryProcess  # noqa: E402

REPOSITORY = "bench/blob"


def random_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(0, size, 16 << 20):
            block = os.urandom(min(16 << 20, size - f.tell()))
            h.update(block)
            f.write(block)
    return "sha256:" + h.hexdigest()


def curl_seconds(url: str, size: int, *extra: str) -> float:
    out = subprocess.run(["curl", "-sS", "-f", "-L", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
                          *extra, url], capture_output=True, text=True, check=True).stdout.split()
    if int(out[1]) != size:
        sys.exit(f"{url}: curl received {out[1]} bytes, expected {size}")
    return float(out[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-blob-get-", dir=args.workdir))
    size = int(args.size_gb * 1e9)
    node = registry = None
    try:
        source = workdir / "blob"
        digest = random_file(source, size)
        config = _default_config(workdir / "node", ("storage",))
        config["log"]["level"] = "warning"
        (workdir / "node").mkdir()
        store = ContentStore(Path(config["data_dir"]) / "store")
        store.ingest_file(source)
        ImageIndex(store).link_blob(REPOSITORY, digest)
        store.close()
        node = ClowderdProcess(workdir / "node", config, ("storage",))
        node.wait_ready()
        (workdir / "registry").mkdir()
        registry = RegistryProcess(workdir / "registry")
        registry.wait_ready()
        with registry.client() as client, open(source, "rb") as f:  # distribution 2.8 has no one-POST upload
            location = client.post(f"/v2/{REPOSITORY}/blobs/uploads/").headers["Location"]
            separator = "&" if "?" in location else "?"
            client.put(f"{location}{separator}digest={digest}", content=f, timeout=600).raise_for_status()
        source.unlink()
        urls = {"clowder": f"http://{config['storage']['http_listen']}/v2/{REPOSITORY}/blobs/{digest}",
                "docker-registry": f"{registry.url}/v2/{REPOSITORY}/blobs/{digest}"}
        best = {name: float("inf") for name in urls}
        for name, url in urls.items():  # untimed: into the page cache
            curl_seconds(url, size)
        for _ in range(args.repeat):
            for name, url in urls.items():
                best[name] = min(best[name], curl_seconds(url, size))
        half = size // 4, size // 4 + size // 2 - 1
        ranged = min(curl_seconds(urls["clowder"], half[1] - half[0] + 1, "-r", f"{half[0]}-{half[1]}")
                     for _ in range(args.repeat))
        gb = size / 1e9
        print(f"{gb:.2f} GB blob over loopback, best of {args.repeat}: clowder {best['clowder']:.2f} s "
              f"({gb / best['clowder']:.2f} GB/s), docker-registry {best['docker-registry']:.2f} s "
              f"({gb / best['docker-registry']:.2f} GB/s); the middle half ranged from clowder {ranged:.2f} s "
              f"({gb / 2 / ranged:.2f} GB/s)")
        print(figure("blob_get_vs_docker_registry", best["docker-registry"] / best["clowder"], "x", ">=", 0.5))
    finally:
        if node is not None:
            node.stop(signal.SIGTERM, timeout=15)
        if registry is not None:
            registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
