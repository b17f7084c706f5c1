"""Who may read and push on the storage role's OCI API: tokens with repository scopes, anonymous
reads on or off, Basic and Bearer credentials; and HTTPS with a certificate from the config."""
import hashlib
import ssl
import subprocess

import httpx
import pytest

from clowderd.config import ConfigError
from clowderd.storage.oci.auth import load_tokens
from tests.oci_client import digest_of, error_code, node_url, push_blob, start_storage_node

TOKENS = {"writer": ("smollm2/*", "write"), "reader": ("smollm2/*", "read"), "other": ("team/**", "write")}


def _tokens_file(path):
    path.write_text("".join(
        f'[[token]]\nname = "{n}"\nsecret_sha256 = "{hashlib.sha256(n.encode()).hexdigest()}"\n'
        f'repositories = ["{repo}"]\naccess = "{access}"\n' for n, (repo, access) in TOKENS.items()))
    return path


@pytest.fixture(scope="module")
def closed_node(tmp_path_factory):
    tokens = _tokens_file(tmp_path_factory.mktemp("tokens") / "tokens.toml")
    proc = start_storage_node(tmp_path_factory, {"tokens_file": str(tokens), "anonymous_read": False})
    yield proc
    proc.stop()


@pytest.fixture
def client(closed_node):
    with httpx.Client(base_url=node_url(closed_node)) as c:
        yield c


def bearer(name):
    return {"Authorization": f"Bearer {name}"}


def test_ping_without_credentials_gets_401_with_a_basic_challenge(client):
    r = client.get("/v2/")
    assert r.status_code == 401 and error_code(r) == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"].startswith('Basic realm="clowder"')
    assert client.get("/v2/", headers=bearer("reader")).status_code == 200


def test_write_token_pushes_with_bearer_or_basic_password(client):
    push_blob(client, "smollm2/a", b"bearer", headers=bearer("writer"))
    push_blob(client, "smollm2/a", b"basic", auth=("anyone", "writer"))


def test_read_token_cannot_push_and_wrong_scope_is_denied(client):
    r = client.post("/v2/smollm2/a/blobs/uploads/", headers=bearer("reader"))
    assert r.status_code == 403 and error_code(r) == "DENIED"
    r = client.post("/v2/smollm2/a/blobs/uploads/", headers=bearer("other"))
    assert r.status_code == 403 and error_code(r) == "DENIED"
    r = client.post("/v2/smollm2/a/b/blobs/uploads/", headers=bearer("writer"))  # '*' is one component
    assert r.status_code == 403
    assert client.post("/v2/team/x/y/blobs/uploads/", headers=bearer("other")).status_code == 202


def test_reads_need_a_token_when_anonymous_read_is_off(client):
    digest = push_blob(client, "smollm2/r", b"read me", headers=bearer("writer"))
    r = client.get(f"/v2/smollm2/r/blobs/{digest}")
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    assert client.get(f"/v2/smollm2/r/blobs/{digest}", headers=bearer("reader")).content == b"read me"
    assert client.get(f"/v2/smollm2/r/blobs/{digest}", headers=bearer("other")).status_code == 403


def test_unknown_token_and_garbage_credentials_get_401(client):
    assert error_code(client.get("/v2/smollm2/r/tags/list", headers=bearer("nope"))) == "UNAUTHORIZED"
    r = client.get("/v2/smollm2/r/tags/list", headers={"Authorization": "Basic !!!"})
    assert r.status_code == 401
    assert client.get("/v2/smollm2/r/tags/list", headers={"Authorization": "Digest x"}).status_code == 401


def test_catalog_lists_only_what_the_token_may_read(client):
    push_blob(client, "team/hidden", b"h", headers=bearer("other"))
    push_blob(client, "smollm2/seen", b"s", headers=bearer("writer"))
    repos = client.get("/v2/_catalog", headers=bearer("reader")).json()["repositories"]
    assert "smollm2/seen" in repos and "team/hidden" not in repos


def test_anonymous_read_lets_clients_without_a_token_pull_but_not_push(tmp_path_factory):
    tokens = _tokens_file(tmp_path_factory.mktemp("tokens") / "tokens.toml")
    proc = start_storage_node(tmp_path_factory, {"tokens_file": str(tokens), "anonymous_read": True})
    with httpx.Client(base_url=node_url(proc)) as c:
        digest = push_blob(c, "smollm2/pub", b"public", headers=bearer("writer"))
        assert c.get(f"/v2/smollm2/pub/blobs/{digest}").content == b"public"
        assert c.get(f"/v2/smollm2/pub/blobs/{digest}", auth=("", "")).content == b"public"
        r = c.post("/v2/smollm2/pub/blobs/uploads/", params={"digest": digest_of(b"x")}, content=b"x")
        assert r.status_code == 401
    assert proc.stop() == 0


def test_tokens_file_errors_name_the_entry_and_field(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[[token]]\nname = "a"\nsecret_sha256 = "plain-secret"\nrepositories = ["x"]\naccess = "write"\n')
    with pytest.raises(ConfigError, match=r"token\[0\] \(a\): secret_sha256"):
        load_tokens(str(path), "storage.tokens_file")
    path.write_text('[[token]]\nname = "a"\nsecret_sha256 = "%s"\nrepositories = ["x"]\naccess = "admin"\n' % ("0" * 64))
    with pytest.raises(ConfigError, match="access"):
        load_tokens(str(path), "storage.tokens_file")


def test_https_with_the_configured_certificate(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    proc = start_storage_node(tmp_path_factory, {"tls_cert": str(cert), "tls_key": str(key)})
    r = httpx.get(node_url(proc, "https") + "/v2/", verify=ssl.create_default_context(cafile=str(cert)))
    assert r.status_code == 200 and r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert proc.stop() == 0


def test_the_grpc_chunk_api_of_a_node_whose_reads_need_a_token_reads_for_nobody_over_plain_grpc(closed_node):
    """With insecure = true, gRPC cannot tell a node from anyone else: the chunk API must not be the way
    around the tokens the OCI API asks for."""
    import grpc

    from clowder.v1 import registry_pb2, registry_pb2_grpc

    stub = registry_pb2_grpc.RegistryStub(closed_node.channel("storage"))
    for call in (lambda: stub.ListRepositories(registry_pb2.ListRepositoriesRequest(), timeout=10),
                 lambda: list(stub.FetchChunks(registry_pb2.FetchChunksRequest(ids=[b"\0" * 32]), timeout=10))):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "anonymous_read = false" in refused.value.details()
