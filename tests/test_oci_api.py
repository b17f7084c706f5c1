"""The storage role's OCI Distribution v1.1 endpoints (end-1..end-13), against a real
`clowderd --roles storage` over HTTP."""
import json
import os
import signal

import httpx

from clowderd.store.content import ContentStore
from tests.clowderd_proc import ClowderdProcess
from tests.oci_client import (digest_of, error_code, image_manifest, node_url, push_blob, push_image,
                              start_storage_node)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def test_api_version_check_answers_200_with_the_version_header(oci):
    r = oci.get("/v2/")
    assert r.status_code == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_monolithic_upload_then_blob_get_and_head(oci):
    data = os.urandom(3000)
    digest = push_blob(oci, "mono/blob", data)
    r = oci.get(f"/v2/mono/blob/blobs/{digest}")
    assert r.status_code == 200 and r.content == data
    assert r.headers["Docker-Content-Digest"] == digest
    h = oci.head(f"/v2/mono/blob/blobs/{digest}")
    assert h.status_code == 200 and h.headers["Content-Length"] == "3000" and h.content == b""


def test_blob_range_gives_206_with_content_range_and_416_past_the_end(oci):
    data = bytes(range(256)) * 4
    digest = push_blob(oci, "ranges", data)
    r = oci.get(f"/v2/ranges/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert oci.get(f"/v2/ranges/blobs/{digest}", headers={"Range": "bytes=-5"}).content == data[-5:]
    assert oci.get(f"/v2/ranges/blobs/{digest}", headers={"Range": "bytes=1000-"}).content == data[1000:]
    r = oci.get(f"/v2/ranges/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    assert error_code(r) == "SIZE_INVALID"


def test_blob_in_another_repository_is_unknown_here(oci):
    digest = push_blob(oci, "owner/a", b"only in a")
    r = oci.get(f"/v2/owner/b/blobs/{digest}")
    assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"


def test_chunked_upload_in_order_with_status_then_put_completes(oci):
    data = os.urandom(10_000)
    r = oci.post("/v2/chunked/blobs/uploads/")
    assert r.status_code == 202 and r.headers["Range"] == "0-0"
    location, uuid = r.headers["Location"], r.headers["Docker-Upload-UUID"]
    assert location.endswith(uuid)
    r = oci.patch(location, content=data[:4000], headers={"Content-Range": "0-3999", "Content-Type": "application/octet-stream"})
    assert r.status_code == 202 and r.headers["Range"] == "0-3999"
    r = oci.get(location)
    assert r.status_code == 204 and r.headers["Range"] == "0-3999"
    r = oci.patch(location, content=data[5000:6000], headers={"Content-Range": "5000-5999"})
    assert r.status_code == 416 and r.headers["Range"] == "0-3999"
    r = oci.patch(location, content=data[4000:], headers={"Content-Range": f"4000-{len(data) - 1}"})
    assert r.status_code == 202
    r = oci.put(location, params={"digest": digest_of(data)})
    assert r.status_code == 201 and r.headers["Docker-Content-Digest"] == digest_of(data)
    assert r.headers["Location"] == f"/v2/chunked/blobs/{digest_of(data)}"
    assert oci.get(f"/v2/chunked/blobs/{digest_of(data)}").content == data
    assert oci.get(location).status_code == 404


def test_post_then_single_put_with_the_body(oci):
    data = b"post-put " * 50
    location = oci.post("/v2/postput/blobs/uploads/").headers["Location"]
    r = oci.put(location, params={"digest": digest_of(data)}, content=data)
    assert r.status_code == 201


def test_wrong_digest_is_refused_and_nothing_is_stored(oci, oci_node):
    wrong = digest_of(b"something else")
    r = oci.post("/v2/wrong/blobs/uploads/", params={"digest": wrong}, content=b"the real bytes")
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"
    assert oci.head(f"/v2/wrong/blobs/{digest_of(b'the real bytes')}").status_code == 404
    store = oci_node.data_dir / "store"
    assert not list((store / "partial").iterdir()) and not list((store / "tmp").iterdir())


def test_cancelled_upload_is_gone(oci):
    location = oci.post("/v2/cancel/blobs/uploads/").headers["Location"]
    oci.patch(location, content=b"abc")
    assert oci.delete(location).status_code == 204
    r = oci.get(location)
    assert r.status_code == 404 and error_code(r) == "BLOB_UPLOAD_UNKNOWN"


def test_cross_repository_mount_gives_201_or_falls_back_to_a_session(oci):
    digest = push_blob(oci, "src/repo", b"mount me")
    r = oci.post("/v2/dst/repo/blobs/uploads/", params={"mount": digest, "from": "src/repo"})
    assert r.status_code == 201 and r.headers["Location"] == f"/v2/dst/repo/blobs/{digest}"
    assert oci.get(f"/v2/dst/repo/blobs/{digest}").content == b"mount me"
    r = oci.post("/v2/dst/repo/blobs/uploads/", params={"mount": digest_of(b"absent"), "from": "src/repo"})
    assert r.status_code == 202 and "Docker-Upload-UUID" in r.headers


def test_manifest_put_get_head_by_tag_and_digest(oci):
    digest, manifest = push_image(oci, "a/b/c", "v1", [b"layer one", b"layer two"])
    assert digest == digest_of(manifest)
    for ref in ("v1", digest):
        r = oci.get(f"/v2/a/b/c/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and r.content == manifest
        assert r.headers["Content-Type"] == OCI_MANIFEST and r.headers["Docker-Content-Digest"] == digest
        h = oci.head(f"/v2/a/b/c/manifests/{ref}")
        assert h.status_code == 200 and h.headers["Content-Length"] == str(len(manifest))


def test_manifest_with_a_missing_blob_is_manifest_blob_unknown(oci):
    manifest = image_manifest(b"{}", [b"never pushed"])
    push_blob(oci, "missing", b"{}")
    r = oci.put("/v2/missing/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and error_code(r) == "MANIFEST_BLOB_UNKNOWN"
    assert digest_of(b"never pushed") in r.json()["errors"][0]["detail"]["digests"]


def test_bad_manifests_are_manifest_invalid_and_oversized_is_413(oci):
    for body in (b"not json", b"[]", b'{"schemaVersion": 1}',
                 json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}).encode()):
        r = oci.put("/v2/bad/manifests/v1", content=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400 and error_code(r) == "MANIFEST_INVALID", body
    r = oci.put("/v2/bad/manifests/v1", content=b" " * ((4 << 20) + 1), headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 413 and error_code(r) == "SIZE_INVALID"


def test_manifest_put_by_wrong_digest_is_digest_invalid(oci):
    push_blob(oci, "bydigest", b"{}")
    manifest = image_manifest(b"{}", [])
    r = oci.put(f"/v2/bydigest/manifests/{digest_of(b'other')}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"
    r = oci.put(f"/v2/bydigest/manifests/{digest_of(manifest)}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201


def test_docker_schema2_manifest_and_an_index_are_accepted(oci):
    push_blob(oci, "multi", b"{}")
    push_blob(oci, "multi", b"L")
    docker = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": digest_of(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": digest_of(b"L"), "size": 1}],
    }).encode()
    r = oci.put("/v2/multi/manifests/docker", content=docker,
                headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
    assert r.status_code == 201
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": digest_of(docker),
         "size": len(docker), "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    r = oci.put("/v2/multi/manifests/index", content=index, headers={"Content-Type": OCI_INDEX})
    assert r.status_code == 201
    r = oci.get("/v2/multi/manifests/index")
    assert r.headers["Content-Type"] == OCI_INDEX and r.content == index
    assert oci.get("/v2/multi/manifests/docker").headers["Content-Type"] == \
        "application/vnd.docker.distribution.manifest.v2+json"


def test_delete_tag_and_delete_manifest_by_digest(oci):
    digest, _ = push_image(oci, "deleting", "t1", [b"d1"])
    r = oci.put("/v2/deleting/manifests/t2", content=oci.get(f"/v2/deleting/manifests/{digest}").content,
                headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201
    assert oci.delete("/v2/deleting/manifests/t1").status_code == 202
    assert error_code(oci.get("/v2/deleting/manifests/t1")) == "MANIFEST_UNKNOWN"
    assert oci.delete(f"/v2/deleting/manifests/{digest}").status_code == 202
    assert oci.get(f"/v2/deleting/manifests/{digest}").status_code == 404
    assert oci.get("/v2/deleting/manifests/t2").status_code == 404


def test_delete_blob_unlinks_it_from_the_repository(oci):
    digest = push_blob(oci, "blobdel", b"delete me")
    assert oci.delete(f"/v2/blobdel/blobs/{digest}").status_code == 202
    assert oci.head(f"/v2/blobdel/blobs/{digest}").status_code == 404


def test_tags_list_paginates_with_link(oci):
    for tag in ("c", "a", "b", "d"):
        push_image(oci, "paged", tag, [b"p"])
    assert oci.get("/v2/paged/tags/list").json() == {"name": "paged", "tags": ["a", "b", "c", "d"]}
    r = oci.get("/v2/paged/tags/list", params={"n": 2})
    assert r.json()["tags"] == ["a", "b"]
    assert r.headers["Link"] == '</v2/paged/tags/list?n=2&last=b>; rel="next"'
    r = oci.get(r.headers["Link"].split(">")[0][1:])
    assert r.json()["tags"] == ["c", "d"] and "Link" not in r.headers
    assert oci.get("/v2/paged/tags/list", params={"n": 0}).json()["tags"] == []
    r = oci.get("/v2/never/pushed/tags/list")
    assert r.status_code == 404 and error_code(r) == "NAME_UNKNOWN"


def test_catalog_lists_repositories_with_pagination(oci):
    push_image(oci, "cat/one", "v", [b"c1"])
    push_image(oci, "cat/two", "v", [b"c2"])
    repos = oci.get("/v2/_catalog").json()["repositories"]
    assert {"cat/one", "cat/two"} <= set(repos) and repos == sorted(repos)
    r = oci.get("/v2/_catalog", params={"n": 1, "last": "cat/one"})
    assert r.json()["repositories"] == ["cat/two"] and "Link" in r.headers


def test_referrers_lists_manifests_with_that_subject_and_filters_by_artifact_type(oci):
    subject_digest, subject = push_image(oci, "refs", "v1", [b"base"])
    subject_desc = {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": len(subject)}
    push_blob(oci, "refs", b"sig")
    for artifact_type, body in (("application/vnd.example.sig", b"sig"), ("application/vnd.example.sbom", b"sig")):
        manifest = image_manifest(b"{}", [body], subject=subject_desc, artifact_type=artifact_type,
                                  annotations={"kind": artifact_type})
        r = oci.put(f"/v2/refs/manifests/{digest_of(manifest)}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201 and r.headers["OCI-Subject"] == subject_digest
    r = oci.get(f"/v2/refs/referrers/{subject_digest}")
    assert r.status_code == 200 and r.headers["Content-Type"] == OCI_INDEX
    found = r.json()["manifests"]
    assert sorted(d["artifactType"] for d in found) == ["application/vnd.example.sbom", "application/vnd.example.sig"]
    assert all(d["annotations"]["kind"] == d["artifactType"] for d in found)
    r = oci.get(f"/v2/refs/referrers/{subject_digest}", params={"artifactType": "application/vnd.example.sig"})
    assert [d["artifactType"] for d in r.json()["manifests"]] == ["application/vnd.example.sig"]
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert oci.get(f"/v2/refs/referrers/{digest_of(b'nothing')}").json()["manifests"] == []


def test_bad_names_and_digests_are_spec_errors(oci):
    assert error_code(oci.get("/v2/Upper/tags/list")) == "NAME_INVALID"
    assert error_code(oci.get("/v2/a/../b/tags/list")) in ("NAME_INVALID", "NAME_UNKNOWN")
    r = oci.get("/v2/ok/blobs/sha256:xyz")
    assert r.status_code == 400 and error_code(r) == "DIGEST_INVALID"
    r = oci.request("PATCH", "/v2/ok/manifests/v1")
    assert r.status_code == 405 and error_code(r) == "UNSUPPORTED"


def test_sigterm_stops_the_http_api_cleanly(tmp_path_factory):
    proc = start_storage_node(tmp_path_factory)
    url = node_url(proc)
    with httpx.Client(base_url=url) as client:
        location = client.post("/v2/stop/blobs/uploads/").headers["Location"]
        client.patch(location, content=b"partial")
    assert proc.stop() == 0
    assert not list((proc.data_dir / "store" / "partial").iterdir())
    try:
        httpx.get(url + "/v2/", timeout=1)
        raise AssertionError("still serving after SIGTERM")
    except httpx.ConnectError:
        pass


def test_a_pushed_safetensors_blob_is_cut_at_tensor_boundaries(oci, oci_node, tiny_llama):
    from clowderd.aimage.safetensors import read_header, tensor_boundaries
    from clowderd.store.content import ContentStore

    weights = tiny_llama / "model.safetensors"
    digest = push_blob(oci, "st/model", weights.read_bytes())
    store = ContentStore(oci_node.data_dir / "store")
    try:
        starts = {off for off, _, _ in store.chunk_index(digest)}
    finally:
        store.close()
    assert set(tensor_boundaries(read_header(weights))) <= starts


def test_an_upload_a_killed_node_left_is_dropped_when_the_node_starts_again(tmp_path_factory):
    node = start_storage_node(tmp_path_factory)
    with httpx.Client(base_url=node_url(node), timeout=30) as client:
        r = client.post("/v2/crash/blobs/uploads/")
        uuid = r.headers["Docker-Upload-UUID"]
        r = client.patch(r.headers["Location"], content=os.urandom(4000), headers={"Content-Range": "0-3999"})
        assert r.status_code == 202
    node.stop(signal.SIGKILL)
    store = ContentStore(node.data_dir / "store")
    try:
        assert [(s.ref, s.size) for s in store.ingest_statuses()] == [(f"oci-upload-{uuid}", 4000)]
        again = ClowderdProcess(node.workdir, node.config, ("storage",))
        try:
            again.wait_ready()
            assert store.ingest_statuses() == []
        finally:
            again.stop()
    finally:
        store.close()


def _corrupt_stored_blob(node, digest: str, offset: int) -> int:
    """Flip a byte of the blob's file on the node; returns where its chunk starts."""
    from clowderd.store.content import ContentStore
    from tests.store_fixtures import flip_byte

    store = ContentStore(node.data_dir / "store")
    try:
        path = store.blob_path(digest)
        chunk_start = max(off for off, _, _ in store.chunk_index(digest) if off <= offset)
    finally:
        store.close()
    flip_byte(path, offset)
    return chunk_start


def _broken_off_body(oci, url: str, **kw) -> tuple[httpx.Response, bytes]:
    """GET url expecting the body to end early; (the response, the bytes that did arrive)."""
    got = bytearray()
    with oci.stream("GET", url, **kw) as r:
        try:
            for piece in r.iter_raw():
                got += piece
        except httpx.RemoteProtocolError:
            return r, bytes(got)
    raise AssertionError(f"the whole body of {len(got)} bytes arrived")


def _quarantine_records(node, digest: str) -> list[dict]:
    return [r for r in node.log_records() if r["msg"] == "corrupt blob quarantined" and r["digest"] == digest]


def test_a_corrupt_blob_is_cut_off_before_its_bad_chunk_then_unknown_until_pushed_again(oci, oci_node):
    data = os.urandom(10 << 20)
    digest = push_blob(oci, "corrupt/whole", data)
    chunk_start = _corrupt_stored_blob(oci_node, digest, 9 << 20)
    r, got = _broken_off_body(oci, f"/v2/corrupt/whole/blobs/{digest}")
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(data))
    assert 0 < len(got) <= chunk_start and got == data[: len(got)]  # good bytes only, and not all of them
    [record] = _quarantine_records(oci_node, digest)
    assert record["path"].endswith(digest.split(":")[1]) and record["offset"] == chunk_start
    assert record["found_by"] == "oci-get" and record["level"] == "error"
    r = oci.get(f"/v2/corrupt/whole/blobs/{digest}")
    assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"
    message = r.json()["errors"][0]["message"]
    assert "quarantined" in message and f"offset {chunk_start:,}" in message and "push" in message
    assert oci.head(f"/v2/corrupt/whole/blobs/{digest}").status_code == 404  # so a pusher uploads it again
    push_blob(oci, "corrupt/whole", data)
    r = oci.get(f"/v2/corrupt/whole/blobs/{digest}")
    assert r.status_code == 200 and r.content == data


def test_a_ranged_get_checks_the_chunks_it_sends(oci, oci_node):
    data = os.urandom(3 << 20)
    digest = push_blob(oci, "corrupt/ranged", data)
    r = oci.get(f"/v2/corrupt/ranged/blobs/{digest}", headers={"Range": "bytes=1000-2000999"})
    assert r.status_code == 206 and r.content == data[1000:2001000]
    _corrupt_stored_blob(oci_node, digest, 1_500_000)
    r, got = _broken_off_body(oci, f"/v2/corrupt/ranged/blobs/{digest}", headers={"Range": "bytes=1000-2000999"})
    assert r.status_code == 206 and len(got) < 2_000_000 and got == data[1000 : 1000 + len(got)]
    assert len(_quarantine_records(oci_node, digest)) == 1
    assert oci.get(f"/v2/corrupt/ranged/blobs/{digest}", headers={"Range": "bytes=0-9"}).status_code == 404


def test_a_corrupt_manifest_is_unknown_saying_why_until_it_is_pushed_again(oci, oci_node):
    digest, manifest = push_image(oci, "corrupt/manifest", "v1", [os.urandom(100)])
    _corrupt_stored_blob(oci_node, digest, 10)
    r = oci.get("/v2/corrupt/manifest/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"
    assert "quarantined" in r.json()["errors"][0]["message"] and _quarantine_records(oci_node, digest)
    r = oci.put("/v2/corrupt/manifest/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201
    assert oci.get("/v2/corrupt/manifest/manifests/v1", headers={"Accept": OCI_MANIFEST}).content == manifest
