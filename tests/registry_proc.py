"""Debian's CNCF distribution registry (`docker-registry`) on a free loopback port, for interop
tests: ``registry = docker_registry()`` gives an object with ``.host`` ("127.0.0.1:PORT").

Optional: ``users={"alice": "pw"}`` turns on `auth: htpasswd` (a bcrypt htpasswd file written
here; distribution 2.8 takes it over plain HTTP too), and ``tls=(cert, key)`` serves HTTPS (see
tests/tls_certs.py for a throwaway CA)."""
from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from clowderd.store.content import ContentStore
from tests.clowderd_proc import free_port

BINARY = "/usr/bin/docker-registry"


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """A bcrypt htpasswd file, the only hash distribution's htpasswd auth accepts."""
    bcrypt = pytest.importorskip("bcrypt", reason="bcrypt (the test extra) writes the htpasswd file")
    path.write_text("".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                            for user, pw in users.items()))
    return path


class RegistryProcess:
    def __init__(self, workdir: Path, *, users: Mapping[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None, ca_file: Path | None = None):
        self.host = f"127.0.0.1:{free_port()}"
        self.root = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.tls, self.ca_file = tls, ca_file
        self.scheme = "https" if tls else "http"
        http = f"addr: '{self.host}'"
        if tls:
            http += f", tls: {{certificate: {tls[0]}, key: {tls[1]}}}"
        config = ("version: 0.1\n"
                  "log: {level: error}\n"
                  f"storage: {{filesystem: {{rootdirectory: {self.root}}}, delete: {{enabled: true}}}}\n"
                  f"http: {{{http}}}\n")
        if users:
            htpasswd = write_htpasswd(workdir / "htpasswd", users)
            config += f"auth: {{htpasswd: {{realm: clowder-test, path: {htpasswd}}}}}\n"
        self.config_path.write_text(config)
        self.log_path = workdir / "registry.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([BINARY, "serve", str(self.config_path)], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def client(self, **kw) -> httpx.Client:
        """An httpx client for the registry's API that trusts its CA (when it has TLS)."""
        verify = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True
        return httpx.Client(base_url=self.url, verify=verify, timeout=30, **kw)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"docker-registry exited with {self.proc.returncode}: {self.log_path.read_text()}")
                try:
                    if client.get("/v2/", timeout=1).status_code in (200, 401):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        pytest.fail(f"docker-registry not answering on {self.url}: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def assert_same_image(registry, data_dir, repo, tag, digest, **client_kw):
    """The registry holds repo:tag with this digest, and data_dir's store has every byte of it."""
    with registry.client(**client_kw) as client:
        remote = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert remote.status_code == 200, remote.text
        assert "sha256:" + hashlib.sha256(remote.content).hexdigest() == digest
        doc = json.loads(remote.content)
        store = ContentStore(data_dir / "store")
        try:
            assert store.read_bytes(digest) == remote.content
            for d in [doc["config"], *doc["layers"]]:
                blob = client.get(f"/v2/{repo}/blobs/{d['digest']}").content
                assert "sha256:" + hashlib.sha256(blob).hexdigest() == d["digest"]
                assert store.read_bytes(d["digest"]) == blob
        finally:
            store.close()



@pytest.fixture
def docker_registry(tmp_path_factory):
    """Factory: start a docker-registry (keyword arguments: see RegistryProcess); stopped at
    teardown. Skips when it is not installed."""
    if not shutil.which(BINARY):
        pytest.skip(f"{BINARY} is not installed (Debian package docker-registry)")
    started: list[RegistryProcess] = []

    def start(**kw) -> RegistryProcess:
        reg = RegistryProcess(tmp_path_factory.mktemp("docker-registry"), **kw)
        started.append(reg)
        reg.wait_ready()
        return reg

    yield start
    for reg in started:
        reg.stop()
