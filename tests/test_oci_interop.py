"""Standard OCI clients against the storage role: skopeo copies a full aimage from Clowder into
CNCF distribution and back, byte for byte; oras pulls it."""
import hashlib
import json
import shutil
import subprocess

import httpx
import pytest

from clowderd.aimage import mediatypes as mt
from clowderd.aimage.build import build
from clowderd.aimage.clowderfile import load_clowderfile
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex
from tests import modelgen
from tests.oci_client import node_url, start_storage_node

SECRET = "interop-secret"


@pytest.fixture(scope="module")
def node_with_aimage(tmp_path_factory):
    """A storage node with tokens (write on everything) and anonymous reads, holding tiny:v1: a
    tiny llama (model layers), a LoRA adapter (EP layers) and a configuration."""
    work = tmp_path_factory.mktemp("interop")
    tokens = work / "tokens.toml"
    tokens.write_text('[[token]]\nname = "interop"\nsecret_sha256 = "%s"\nrepositories = ["**"]\naccess = "write"\n'
                      % hashlib.sha256(SECRET.encode()).hexdigest())
    proc = start_storage_node(tmp_path_factory, {"tokens_file": str(tokens), "anonymous_read": True})
    model = modelgen.write_llama(work / "tiny", **modelgen.TINY)
    adapter = modelgen.write_lora_adapter(work / "lora", model)
    (work / "Clowderfile").write_text(f"base: {model}\nadapters:\n  - name: french\n    path: {adapter}\n")
    store = ContentStore(proc.data_dir / "store")
    try:
        result = build(store, load_clowderfile(work / "Clowderfile"), "tiny:v1")
        manifest = ImageIndex(store).manifest_bytes(result.manifest_digest)
    finally:
        store.close()
    yield proc, result.manifest_digest, manifest
    proc.stop()


def _skopeo(*args: str) -> None:
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed")
    r = subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                        "--preserve-digests", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _blob_digests(manifest: bytes) -> list[str]:
    doc = json.loads(manifest)
    return [doc["config"]["digest"]] + [layer["digest"] for layer in doc["layers"]]


def test_skopeo_copies_an_aimage_to_distribution_and_back_byte_for_byte(node_with_aimage, docker_registry):
    proc, digest, manifest = node_with_aimage
    doc = json.loads(manifest)
    kinds = {layer["mediaType"] for layer in doc["layers"]}
    assert kinds & mt.MODEL_LAYER_TYPES and kinds & mt.EP_LAYER_TYPES and doc["config"]["mediaType"] == mt.AIMAGE_CONFIG
    clowder = proc.config["storage"]["http_listen"]
    registry = docker_registry().host
    _skopeo(f"docker://{clowder}/tiny:v1", f"docker://{registry}/models/tiny:v1")
    r = httpx.get(f"http://{registry}/v2/models/tiny/manifests/v1",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert r.headers["Docker-Content-Digest"] == digest and r.content == manifest

    _skopeo("--dest-creds", f"ci:{SECRET}", f"docker://{registry}/models/tiny:v1", f"docker://{clowder}/copies/tiny:back")
    with httpx.Client(base_url=node_url(proc)) as client:
        r = client.get("/v2/copies/tiny/manifests/back")
        assert r.headers["Docker-Content-Digest"] == digest and r.content == manifest
        for blob in _blob_digests(manifest):
            data = client.get(f"/v2/copies/tiny/blobs/{blob}").content
            assert "sha256:" + hashlib.sha256(data).hexdigest() == blob


def test_skopeo_push_without_a_token_is_refused(node_with_aimage, tmp_path):
    proc, _, _ = node_with_aimage
    clowder = proc.config["storage"]["http_listen"]
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed")
    r = subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                        f"docker://{clowder}/tiny:v1", f"docker://{clowder}/stolen/tiny:v1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and ("401" in r.stderr or "unauthorized" in r.stderr.lower()), r.stderr


def test_oras_pulls_an_aimage_from_clowder(node_with_aimage, tmp_path):
    oras_client = pytest.importorskip("oras.client")
    proc, digest, manifest = node_with_aimage
    clowder = proc.config["storage"]["http_listen"]
    client = oras_client.OrasClient(hostname=clowder, insecure=True)
    files = client.pull(target=f"{clowder}/tiny:v1", outdir=str(tmp_path / "out"))
    got = {"sha256:" + hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}
    assert got == {layer["digest"] for layer in json.loads(manifest)["layers"]}
