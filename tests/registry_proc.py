"""Debian's CNCF distribution registry (`docker-registry`) on a free loopback port, for interop
tests: ``registry = docker_registry()`` gives an object with ``.host`` ("127.0.0.1:PORT")."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.clowderd_proc import free_port

BINARY = "/usr/bin/docker-registry"


class RegistryProcess:
    def __init__(self, workdir: Path):
        self.host = f"127.0.0.1:{free_port()}"
        self.root = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.config_path.write_text(
            "version: 0.1\n"
            "log: {level: error}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.root}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '{self.host}'}}\n"
        )
        self.log_path = workdir / "registry.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([BINARY, "serve", str(self.config_path)], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"docker-registry exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"docker-registry not answering on {self.host}: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def docker_registry(tmp_path_factory):
    """Factory: start a docker-registry; stopped at teardown. Skips when it is not installed."""
    if not shutil.which(BINARY):
        pytest.skip(f"{BINARY} is not installed (Debian package docker-registry)")
    started: list[RegistryProcess] = []

    def start() -> RegistryProcess:
        reg = RegistryProcess(tmp_path_factory.mktemp("docker-registry"))
        started.append(reg)
        reg.wait_ready()
        return reg

    yield start
    for reg in started:
        reg.stop()
