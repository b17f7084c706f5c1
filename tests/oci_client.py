"""Helpers for tests of the storage role's OCI Distribution API: a clowderd storage node for a
whole test module, and small push helpers over httpx."""
from __future__ import annotations

import hashlib
import json
import signal
from typing import Any, Iterator, Mapping

import httpx
import pytest

from tests.clowderd_proc import ClowderdProcess, _default_config, deep_merge


def start_storage_node(tmp_path_factory: pytest.TempPathFactory, storage: Mapping[str, Any] | None = None) -> ClowderdProcess:
    """A real `clowderd --roles storage` with the HTTP API on a free loopback port."""
    workdir = tmp_path_factory.mktemp("oci-node")
    cfg = deep_merge(_default_config(workdir, ("storage",)), {"storage": dict(storage or {})})
    proc = ClowderdProcess(workdir, cfg, ("storage",))
    proc.wait_ready()
    return proc


def node_url(proc: ClowderdProcess, scheme: str = "http") -> str:
    return f"{scheme}://{proc.config['storage']['http_listen']}"


@pytest.fixture(scope="module")
def oci_node(tmp_path_factory) -> Iterator[ClowderdProcess]:
    proc = start_storage_node(tmp_path_factory)
    yield proc
    proc.stop(signal.SIGTERM, timeout=15)


@pytest.fixture
def oci(oci_node) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=node_url(oci_node), timeout=30) as client:
        yield client


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(client: httpx.Client, name: str, data: bytes, **kw) -> str:
    digest = digest_of(data)
    r = client.post(f"/v2/{name}/blobs/uploads/", params={"digest": digest}, content=data, **kw)
    assert r.status_code == 201, r.text
    return digest


def image_manifest(config: bytes, layers: list[bytes], *, subject: dict | None = None,
                   artifact_type: str | None = None, annotations: dict | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(b), "size": len(b)}
                   for b in layers],
    }
    if artifact_type:
        doc["artifactType"] = artifact_type
    if subject:
        doc["subject"] = subject
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc).encode()


def push_image(client: httpx.Client, name: str, tag: str, layers: list[bytes], config: bytes = b"{}", **kw) -> tuple[str, bytes]:
    """Push config and layers, then the manifest under tag; returns (manifest digest, manifest)."""
    for blob in [config, *layers]:
        push_blob(client, name, blob)
    manifest = image_manifest(config, layers, **kw)
    r = client.put(f"/v2/{name}/manifests/{tag}", content=manifest,
                   headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status_code == 201, r.text
    return r.headers["Docker-Content-Digest"], manifest


def error_code(response: httpx.Response) -> str:
    """The spec error code of an error answer (and checks the body has the spec's shape)."""
    body = response.json()
    assert set(body) == {"errors"} and body["errors"], body
    assert {"code", "message"} <= set(body["errors"][0]), body
    return body["errors"][0]["code"]
