"""What this node has to offer: CPUs and memory (psutil), the disk of the data directory, and NVIDIA GPUs
(NVML, through nvidia-ml-py). A node without the NVIDIA driver, or whose NVML fails, reports no GPUs and
says why once in the log. Also the last whole check of its content store (the scrub's last pass, or
`clowderctl fsck`), as saved in the store's root."""
from __future__ import annotations

import logging
import os
import shutil
import time

from pathlib import Path

import psutil
import pynvml

from clowder.v1 import common_pb2
from clowderd.errors import StoreError
from clowderd.store import fsck

log = logging.getLogger(__name__)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older nvidia-ml-py returns bytes


def _memory(handle: object) -> object:
    """Total and used bytes as nvidia-smi shows them: version 2 leaves the driver's reserved memory out of
    `used` (version 1 counts it, about 600 MB on an H200); older drivers have only version 1."""
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    except pynvml.NVMLError:
        return pynvml.nvmlDeviceGetMemoryInfo(handle)


class Inventory:
    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self._store_check_error = ""
        self._nvml = False
        try:
            pynvml.nvmlInit()
            self._nvml = True
        except pynvml.NVMLError as e:
            log.info("no NVIDIA GPUs reported", extra={"reason": f"NVML: {e}"})

    def take(self) -> common_pb2.ResourceInventory:
        """The inventory now. Blocking (NVML, statfs): call it from a thread."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        memory = psutil.virtual_memory()
        disk = shutil.disk_usage(self.data_dir)
        out = common_pb2.ResourceInventory(
            cpu_count=cpus, cpu_load=os.getloadavg()[0] / cpus, memory_total=memory.total,
            memory_available=memory.available, disk_free=disk.free, disk_total=disk.total, gpus=self._gpus())
        out.observed_at.FromNanoseconds(time.time_ns())
        check = self._store_check()
        if check is not None:
            out.store_check.CopyFrom(check)
        return out

    def _store_check(self) -> common_pb2.StoreCheck | None:
        try:
            report = fsck.load_last(Path(self.data_dir) / "store")
        except StoreError as e:
            if str(e) != self._store_check_error:
                log.warning("cannot report the last check of the store", extra={"error": str(e)})
                self._store_check_error = str(e)
            return None
        if report is None:
            return None
        check = common_pb2.StoreCheck(kind=report.kind, blobs_checked=report.blobs_checked,
                                      bytes_checked=report.bytes_checked,
                                      quarantined=[p.digest for p in report.problems])
        check.finished_at.FromNanoseconds(int(report.finished * 1e9))
        return check

    def _gpus(self) -> list[common_pb2.GpuInfo]:
        if not self._nvml:
            return []
        gpus = []
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as e:
            log.warning("NVML cannot list the GPUs", extra={"error": str(e)})
            return []
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = _memory(handle)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                gpus.append(common_pb2.GpuInfo(
                    index=index, uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    model=_text(pynvml.nvmlDeviceGetName(handle)), memory_total=memory.total,
                    memory_used=memory.used, compute_capability=f"{major}.{minor}", driver_version=driver))
            except pynvml.NVMLError as e:  # e.g. a GPU that fell off the bus: report the others
                log.warning("NVML cannot read a GPU", extra={"gpu_index": index, "error": str(e)})
        return gpus

    def close(self) -> None:
        if self._nvml:
            pynvml.nvmlShutdown()
            self._nvml = False
