"""Fuzzing the OCI API over HTTP: malformed manifests, wrong digests, bad ranges, oversized
bodies, bad names and truncated uploads. Every answer is a success or a spec error (4xx with the
JSON error body), never a 500; and the store keeps no partial blob and no blob whose bytes do not
match its digest."""
import hashlib
import json
import string
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clowderd.store.content import ContentStore
from clowderd.storage.oci.errors import STATUS
from tests.fuzz_fixtures import Cases, fuzz_client
from tests.oci_client import digest_of, image_manifest, node_url, push_blob

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
cases = Cases()

names = st.one_of(
    st.sampled_from(["ok", "a/b/c", "UPPER", "a/../b", "..", "a//b", "-a", "a-", "a__b", "x" * 300, "a/./b", "é"]),
    st.text(alphabet=string.ascii_letters + string.digits + "._-/", min_size=1, max_size=40),
)
digests = st.one_of(
    st.sampled_from(["sha256:" + "0" * 64, "sha512:" + "a" * 128, "sha256:" + "G" * 64, "sha256:", "md5:abc", ""]),
    st.builds(lambda b: digest_of(b), st.binary(max_size=8)),
    st.text(alphabet=string.hexdigits + ":", max_size=72),
)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=20)
manifest_keys = st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "subject", "artifactType"])


@pytest.fixture(scope="module")
def client(oci_node, request):
    with fuzz_client(request, node_url(oci_node), "OCI", cases) as c:
        yield c


def check(r: httpx.Response) -> httpx.Response:
    cases.count += 1
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text)
    if r.status_code >= 400 and r.request.method != "HEAD":  # a HEAD answer has no body
        body = r.json()
        assert isinstance(body.get("errors"), list) and body["errors"], body
        code = body["errors"][0]["code"]
        assert code in STATUS and STATUS[code] in (r.status_code, 400), (r.status_code, body)
    return r


@SETTINGS
@given(body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                      st.dictionaries(manifest_keys, json_values, max_size=7).map(lambda d: json.dumps(d).encode())),
       content_type=st.sampled_from([None, "application/vnd.oci.image.manifest.v1+json",
                                     "application/vnd.oci.image.index.v1+json", "text/plain", ""]),
       reference=st.one_of(st.sampled_from(["v1", "latest"]), digests, st.text(max_size=20)))
def test_malformed_manifests_get_spec_errors(client, body, content_type, reference):
    headers = {"Content-Type": content_type} if content_type is not None else {}
    r = check(client.put(f"/v2/fuzz/manifests/{quote(reference, safe='') or 'x'}", content=body, headers=headers))
    assert r.status_code != 201


@SETTINGS
@given(mutation=st.sampled_from(["size", "digest", "config", "layers", "schema", "type"]), value=json_values)
def test_mutated_valid_manifests_get_spec_errors(client, mutation, value):
    push_blob(client, "fuzz/m", b"{}")
    doc = json.loads(image_manifest(b"{}", []))
    target = {"size": ("config", "size"), "digest": ("config", "digest"), "config": (None, "config"),
              "layers": (None, "layers"), "schema": (None, "schemaVersion"), "type": (None, "mediaType")}[mutation]
    (doc[target[0]] if target[0] else doc)[target[1]] = value
    check(client.put("/v2/fuzz/m/manifests/t", content=json.dumps(doc).encode(),
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}))


@SETTINGS
@given(name=names, digest=digests, method=st.sampled_from(["GET", "HEAD", "DELETE"]),
       kind=st.sampled_from(["blobs", "manifests", "referrers"]))
def test_bad_names_and_digests_get_spec_errors(client, name, digest, method, kind):
    path = f"/v2/{quote(name, safe='/').replace('.', '%2E')}/{kind}/{quote(digest, safe=':') or 'x'}"
    r = check(client.request(method, path))
    if "UPPER" in name or ".." in name.split("/"):
        assert r.status_code in (400, 404, 405)


@SETTINGS
@given(rng=st.one_of(st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(-5, 300), st.integers(-5, 300)),
                     st.builds(lambda a: f"bytes={a}-", st.integers(0, 300)),
                     st.builds(lambda a: f"bytes=-{a}", st.integers(0, 300)),
                     # what a client can send: HTTP strips a header value's outer whitespace, httpx refuses it
                     st.text(max_size=20).filter(lambda t: t.isprintable() and t.isascii() and t == t.strip()),
                     st.just("bytes=0-1,3-4")))
def test_bad_ranges_are_206_or_416(client, rng):
    data = bytes(range(200))
    digest = push_blob(client, "fuzz/range", data)
    r = check(client.get(f"/v2/fuzz/range/blobs/{digest}", headers={"Range": rng}))
    if r.status_code == 206:
        start, end = map(int, r.headers["Content-Range"].split()[1].split("/")[0].split("-"))
        assert r.content == data[start:end + 1]
    else:
        assert r.status_code in (200, 416)


@SETTINGS
@given(data=st.binary(min_size=1, max_size=3000), cut=st.integers(0, 3000),
       chunks=st.lists(st.tuples(st.integers(0, 3000), st.integers(-2, 3000)), max_size=4),
       finish=st.sampled_from(["right", "truncated", "wrong", "none", "cancel"]))
def test_truncated_and_disordered_uploads_never_store_a_partial_blob(client, data, cut, chunks, finish):
    r = check(client.post("/v2/fuzz/up/blobs/uploads/"))
    location = r.headers["Location"]
    cut = min(cut, len(data))
    check(client.patch(location, content=data[:cut], headers={"Content-Range": f"0-{max(cut - 1, 0)}"} if cut else {}))
    for start, end in chunks:  # out-of-order, overlapping or inconsistent Content-Range headers
        check(client.patch(location, content=data[start:end + 1] if end >= start else b"x",
                           headers={"Content-Range": f"{start}-{end}"}))
    status = check(client.get(location))
    if status.status_code != 204:
        return
    received = int(status.headers["Range"].split("-")[1]) + 1 if cut else 0
    if finish == "cancel":
        check(client.delete(location))
        return
    digest = {"right": digest_of(data[:received] + data[received:]), "truncated": digest_of(data),
              "wrong": digest_of(b"nope" + data), "none": None}[finish]
    params = {"digest": digest} if digest else {}
    body = data[received:] if finish == "right" else b""
    r = check(client.put(location, params=params, content=body))
    if finish == "none":
        check(client.delete(location))
    elif r.status_code == 201:
        assert client.get(f"/v2/fuzz/up/blobs/{digest}").content == data
    elif received < len(data) or finish == "wrong":
        assert client.head(f"/v2/fuzz/up/blobs/{digest}").status_code in (200, 404)


@SETTINGS
@given(size=st.sampled_from([(4 << 20) + 1, 5 << 20]))
def test_oversized_manifest_bodies_get_413(client, size):
    r = check(client.put("/v2/fuzz/big/manifests/v1", content=b"{" + b" " * (size - 1),
                         headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}))
    assert r.status_code == 413


def test_the_store_kept_no_partial_and_no_corrupt_blob(client, oci_node):
    root = oci_node.data_dir / "store"
    assert not list((root / "partial").iterdir()), "upload files left after every session ended"
    assert not list((root / "tmp").iterdir())
    store = ContentStore(root)
    try:
        blobs = store.blobs()
        assert blobs
        for info in blobs:
            with store.open(info.digest) as f:
                assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == info.digest
    finally:
        store.close()
