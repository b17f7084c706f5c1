"""Memory of two aimages that share a base, served by the worker's replica manager.

    python bench/shared_base.py [--device cpu|cuda] [--dtype bfloat16] [--shape smollm2|1b]

Two aimages are built into a temporary content store: one random-weight llama base (SmolLM2-135M's layers,
or a 1B shape's, with the tests' 512-token vocabulary so that answers are text) with a different LoRA EP
layer each. The worker's own ReplicaManager loads a replica of
each (a) as the worker does, the two sharing one engine host, and (b) with engine parameters that differ
in max_batch_size only, which gives each replica a host of its own: the cost of not sharing. Memory is the
engine hosts' GPU memory on CUDA (NVML, per process, and the device's used memory before and after) and
their proportional set size (PSS) on the CPU. On the CPU the weights' pages are shared either way: every
view hard-links the same store file, so two hosts map one copy through the page cache, and what sharing a
host saves there is the second process's own memory. Both runs answer the same request through each EP
layer, and the answers must match.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.ingest import figure  # noqa: E402
from clowder.v1 import common_pb2  # noqa: E402
from clowderd.aimage.build import build  # noqa: E402
from clowderd.aimage.clowderfile import load_clowderfile  # noqa: E402
from clowderd.engines.base import Finished, GenerateRequest, TextDelta  # noqa: E402
from clowderd.store.content import ContentStore  # noqa: E402
from clowderd.worker.replicas import ReplicaManager  # noqa: E402
from tests import modelgen  # noqa: E402
from tests.engine_fixtures import write_tiny_tokenizer  # noqa: E402

S = common_pb2.ReplicaState
SHAPES = {"smollm2": modelgen.SMOLLM2_135M, "1b": modelgen.BENCH_1B}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def build_images(workdir: Path, store: ContentStore, shape: dict, engine: dict) -> dict[str, tuple[str, str]]:
    """Two aimages on one base, each with its EP layer 'style': name -> (manifest digest, EP weights digest)."""
    base = modelgen.write_llama(workdir / "base", **{**shape, "vocab_size": 512, "tie_word_embeddings": False})
    write_tiny_tokenizer(base)
    images = {}
    for i, name in enumerate(("shared-a:v1", "shared-b:v1")):
        adapter = modelgen.write_lora_adapter(workdir / f"adapter-{i}", base, r=16, seed=i + 1)
        clowderfile = workdir / f"Clowderfile-{i}"
        clowderfile.write_text(json.dumps({"base": str(base), "adapters": [{"name": "style", "path": str(adapter)}],
                                           "config": {"engine": engine}}))
        result = build(store, load_clowderfile(clowderfile), name)
        weights = "sha256:" + hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
        images[name] = (result.manifest_digest, weights)
    return images


class Memory:
    """Memory the engine hosts hold: per process, and on CUDA the device's used memory too."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def device_used(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used if self.cuda else 0

    def of(self, pids: set[int]) -> int:
        if not self.cuda:
            return sum(psutil.Process(pid).memory_full_info().pss for pid in pids)
        used = {p.pid: p.usedGpuMemory or 0 for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)}
        return sum(used.get(pid, 0) for pid in pids)


async def wait_ready(manager: ReplicaManager, replica_id: str) -> None:
    replica = manager.get(replica_id)
    while replica.state != S.REPLICA_STATE_READY:
        if replica.state in (S.REPLICA_STATE_FAILED, S.REPLICA_STATE_STOPPED):
            raise RuntimeError(f"replica {replica_id} is {S.Name(replica.state)}: {replica.message}")
        await asyncio.sleep(0.1)


async def answer(manager: ReplicaManager, replica_id: str, adapter_digest: str) -> str:
    text = []
    request = GenerateRequest(messages=QUESTION, max_tokens=16, temperature=0)
    async with contextlib.aclosing(manager.generate(replica_id, request, adapter_digest)) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Finished):
                return "".join(text)
    raise RuntimeError("the stream ended without a Finished event")


async def serve_both(store: ContentStore, images: dict, memory: Memory, tag: str) -> tuple[int, int, int, list[str]]:
    """Load a replica of each image; (engine hosts, their memory, device memory added, answers)."""
    manager = ReplicaManager(store, "local")
    before = memory.device_used()
    ids = []
    for name, (digest, _) in images.items():
        replica_id = f"{tag}-{name.split(':')[0]}"
        manager.load(common_pb2.ReplicaSpec(replica_id=replica_id, deployment=replica_id, image=name,
                                            manifest_digest=digest, generation=1))
        await wait_ready(manager, replica_id)
        ids.append(replica_id)
    answers = [await answer(manager, rid, images[name][1]) for rid, name in zip(ids, images)]
    pids = {manager.get(rid).client.pid for rid in ids}
    held, added = memory.of(pids), memory.device_used() - before
    await manager.close(timeout=30)
    return len(pids), held, added, answers


def with_batch_size(store: ContentStore, images: dict, engine: dict, workdir: Path) -> dict:
    """The same two aimages, each with its own max_batch_size: no two replicas can share a host."""
    out = {}
    for i, name in enumerate(images):
        clowderfile = workdir / f"Clowderfile-own-{i}"
        params = {**engine["transformers"], "max_batch_size": 30 + i}
        clowderfile.write_text(json.dumps({"base": name, "config": {"engine": {"name": "transformers",
                                                                                "transformers": params}}}))
        own = name.replace("shared", "own")
        out[own] = (build(store, load_clowderfile(clowderfile), own).manifest_digest, images[name][1])
    return out


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="the engine's device: cpu or cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    args = p.parse_args()
    engine = {"name": "transformers", "transformers": {"device": args.device, "dtype": args.dtype}}
    memory = Memory(args.device)
    unit = "GPU memory (NVML)" if memory.cuda else "proportional set size"
    with tempfile.TemporaryDirectory(prefix="clowder-bench-shared-") as tmp:
        store = ContentStore(Path(tmp) / "store")
        t0 = time.perf_counter()
        shared_images = build_images(Path(tmp), store, SHAPES[args.shape], engine)
        own_images = with_batch_size(store, shared_images, engine, Path(tmp))
        weights = sum(f.stat().st_size for f in (Path(tmp) / "base").glob("*.safetensors"))
        print(f"two aimages on one {args.shape}-shaped base ({weights / (1 << 20):,.0f} MiB of weights) built in "
              f"{time.perf_counter() - t0:.1f} s; {args.device}, {args.dtype}", flush=True)
        hosts_s, held_s, added_s, answers_s = await serve_both(store, shared_images, memory, "shared")
        hosts_o, held_o, added_o, answers_o = await serve_both(store, own_images, memory, "own")
        store.close()
    if answers_s != answers_o:
        raise SystemExit(f"the answers differ: shared {answers_s}, a host each {answers_o}")
    if len(set(answers_s)) != 2:
        raise SystemExit(f"the two EP layers gave the same answer: {answers_s}")
    mib = 1 << 20
    print(f"| two aimages, one base | engine hosts | {unit} of the hosts | device memory added |")
    print("|---|---|---|---|")
    for label, hosts, held, added in (("shared (the worker's way)", hosts_s, held_s, added_s),
                                      ("a host each", hosts_o, held_o, added_o)):
        device = f"{added / mib:,.0f} MiB" if memory.cuda else "-"
        print(f"| {label} | {hosts} | {held / mib:,.0f} MiB | {device} |")
    if memory.cuda and not (held_s and held_o):  # NVML gave no per-process figures here
        print("NVML reports no per-process GPU memory on this machine: the ratio uses the device's memory added")
        held_s, held_o = added_s, added_o
    ratio = held_s / held_o
    if hosts_s != 1:
        raise SystemExit(f"the two aimages ran on {hosts_s} engine hosts, not one")
    if memory.cuda:
        print(figure("shared_base_gpu_memory_vs_host_each", ratio, "x", "<=", 0.6))
    else:
        print(figure("shared_base_cpu_memory_vs_host_each", ratio, "x", "<=", 0.9))


if __name__ == "__main__":
    asyncio.run(main())
