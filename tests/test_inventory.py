"""The node inventory: psutil for CPUs and memory, NVML for GPUs; a node whose NVML is missing or failing
reports what it can and never fails."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pynvml
import pytest

from clowderd.inventory import Inventory


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


def test_a_node_without_the_nvidia_driver_reports_no_gpus(tmp_path, monkeypatch, caplog):
    def missing():
        raise nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    with caplog.at_level(logging.INFO, logger="clowderd.inventory"):
        inventory = Inventory(str(tmp_path))
    taken = inventory.take()
    inventory.close()
    assert list(taken.gpus) == []
    assert taken.cpu_count > 0 and 0 < taken.memory_available <= taken.memory_total
    assert 0 < taken.disk_free <= taken.disk_total and taken.observed_at.seconds > 0
    assert any("NVML" in getattr(r, "reason", "") for r in caplog.records)


@pytest.fixture
def two_gpus(monkeypatch):
    """NVML with two GPUs, the second of which cannot be read, and a driver without memory info v2."""
    handles = {0: "h0", 1: "h1"}

    def handle(index):
        if index == 1:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return handles[index]

    def memory(h, version=None):
        if version is not None:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(total=80 << 30, used=3 << 30)

    for name, value in {
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: b"550.54.15", "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": handle, "nvmlDeviceGetMemoryInfo": memory,
        "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
        "nvmlDeviceGetUUID": lambda h: "GPU-3f9c", "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
    }.items():
        monkeypatch.setattr(pynvml, name, value)


def test_gpus_are_reported_with_their_identity_and_memory_and_an_unreadable_one_is_left_out(tmp_path, two_gpus):
    inventory = Inventory(str(tmp_path))
    gpus = list(inventory.take().gpus)
    inventory.close()
    assert len(gpus) == 1
    gpu = gpus[0]
    assert (gpu.index, gpu.uuid, gpu.model) == (0, "GPU-3f9c", "NVIDIA H100 80GB HBM3")
    assert (gpu.memory_total, gpu.memory_used) == (80 << 30, 3 << 30)
    assert (gpu.compute_capability, gpu.driver_version) == ("9.0", "550.54.15")


def test_the_last_check_of_the_store_is_reported_once_one_has_finished(tmp_path, caplog):
    from clowderd.store import fsck
    from clowderd.store.content import ContentStore

    inventory = Inventory(str(tmp_path))
    assert not inventory.take().HasField("store_check")
    store = ContentStore(tmp_path / "store")
    digest = "sha256:" + "a" * 64
    fsck.save_last(store, fsck.FsckReport(3, 3000, [fsck.Problem(digest, "corrupt", [])], kind="scrub",
                                          started=1000.0, finished=2000.5))
    check = inventory.take().store_check
    assert (check.kind, check.blobs_checked, check.bytes_checked) == ("scrub", 3, 3000)
    assert list(check.quarantined) == [digest]
    assert check.finished_at.ToNanoseconds() == 2_000_500_000_000
    (tmp_path / "store" / fsck.LAST_REPORT).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="clowderd.inventory"):
        assert not inventory.take().HasField("store_check") and not inventory.take().HasField("store_check")
    assert [r.getMessage() for r in caplog.records] == ["cannot report the last check of the store"]  # once
    store.close()
    inventory.close()
