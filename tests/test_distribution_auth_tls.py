"""clowderctl login, push and pull against registries that want a password or speak HTTPS, with real
processes: Debian's docker-registry (CNCF distribution 2.8) with `auth: htpasswd` and with TLS, and a
Clowder storage node with TLS and tokens. The certificates come from a CA made for the test, which
the client trusts only when told to (SSL_CERT_FILE)."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil

import pytest

from tests import registry_proc
from tests.oci_client import start_storage_node
from tests.test_distribution_oci import build_tiny, ctl
from tests.tls_certs import make_tls_files

USER, PASSWORD = "alice", "correct horse"
MANIFEST = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def start_registry(tmp_path_factory, **kw):
    if not shutil.which(registry_proc.BINARY):
        pytest.skip(f"{registry_proc.BINARY} is not installed (Debian package docker-registry)")
    reg = registry_proc.RegistryProcess(tmp_path_factory.mktemp("docker-registry"), **kw)
    reg.wait_ready()
    return reg


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    reg = start_registry(tmp_path_factory, users={USER: PASSWORD})
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, tls):
    reg = start_registry(tmp_path_factory, tls=(tls.cert, tls.key), ca_file=tls.ca)
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama):
    """A data directory holding tiny:v1, and its digest; tests copy it rather than build again."""
    src = tmp_path_factory.mktemp("built") / "src"
    return src, build_tiny(src, tiny_llama)


@pytest.fixture
def src(built, tmp_path):
    shutil.copytree(built[0], tmp_path / "src", ignore=shutil.ignore_patterns("xdg"))
    return tmp_path / "src"


def auth_json(data_dir):
    path = data_dir / "xdg" / "clowder" / "auth.json"
    return json.loads(path.read_text())["auths"] if path.exists() else {}


def login(data_dir, registry, password=PASSWORD, env=None):
    return ctl(data_dir, "login", registry.host, "-u", USER, "--password-stdin", input=password + "\n", env=env)


def assert_clear_error(r, host, *words):
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert host in r.stderr, r.stderr
    for word in words:
        assert word in r.stderr.lower(), r.stderr


# -- basic auth (htpasswd) ------------------------------------------------------------------------

def test_push_to_an_htpasswd_registry_without_login_fails_naming_the_registry(auth_registry, src):
    r = ctl(src, "push", "-q", "tiny:v1", f"{auth_registry.host}/nologin/tiny:v1")
    assert_clear_error(r, auth_registry.host, f"clowderctl login {auth_registry.host}")
    with auth_registry.client(auth=(USER, PASSWORD)) as client:
        assert client.get("/v2/nologin/tiny/manifests/v1", headers=MANIFEST).status_code == 404


def test_pull_from_an_htpasswd_registry_without_login_fails_naming_the_registry(auth_registry, tmp_path):
    r = ctl(tmp_path / "d", "pull", f"{auth_registry.host}/nologin/tiny:v1")
    assert_clear_error(r, auth_registry.host, f"clowderctl login {auth_registry.host}")


def test_login_then_push_and_pull_round_trip_an_aimage_byte_identically(auth_registry, built, src, tmp_path):
    _, digest = built
    dst = tmp_path / "dst"
    r = login(src, auth_registry)
    assert r.returncode == 0 and auth_registry.host in r.stdout, r.stderr
    assert auth_json(src)[auth_registry.host]
    dest = f"{auth_registry.host}/basic/tiny:v1"
    r = ctl(src, "push", "-q", "tiny:v1", dest)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest

    assert login(dst, auth_registry).returncode == 0
    r = ctl(dst, "pull", "-o", "json", dest)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == digest
    registry_proc.assert_same_image(auth_registry, dst, "basic/tiny", "v1", digest, auth=(USER, PASSWORD))


def test_login_with_a_wrong_password_fails_clearly_and_stores_nothing(auth_registry, tmp_path):
    d = tmp_path / "d"
    r = login(d, auth_registry, password="wrong")
    assert_clear_error(r, auth_registry.host, f"refused the credentials of user '{USER}'")
    assert not (d / "xdg" / "clowder" / "auth.json").exists()
    # A refused login leaves an earlier good one as it was.
    assert login(d, auth_registry).returncode == 0
    before = auth_json(d)
    assert login(d, auth_registry, password="wrong").returncode == 1
    assert auth_json(d) == before


def test_stored_credentials_the_registry_refuses_fail_clearly(auth_registry, src):
    assert login(src, auth_registry).returncode == 0
    path = src / "xdg" / "clowder" / "auth.json"
    data = json.loads(path.read_text())
    data["auths"][auth_registry.host]["auth"] = base64.b64encode(f"{USER}:stale".encode()).decode()
    path.write_text(json.dumps(data))
    r = ctl(src, "push", "-q", "tiny:v1", f"{auth_registry.host}/stale/tiny:v1")
    assert_clear_error(r, auth_registry.host, "refused the credentials", f"clowderctl login {auth_registry.host}")


def test_logout_removes_the_credentials_and_push_is_refused_again(auth_registry, src):
    assert login(src, auth_registry).returncode == 0
    assert ctl(src, "push", "-q", "tiny:v1", f"{auth_registry.host}/logout/tiny:v1").returncode == 0
    r = ctl(src, "logout", auth_registry.host)
    assert r.returncode == 0, r.stderr
    assert auth_registry.host not in auth_json(src)
    r = ctl(src, "push", "-q", "tiny:v1", f"{auth_registry.host}/logout/tiny:v2")
    assert_clear_error(r, auth_registry.host, "login")


# -- TLS --------------------------------------------------------------------------------------------

def test_push_and_pull_over_https_succeed_when_the_ca_is_trusted(tls_registry, tls, built, src, tmp_path):
    _, digest = built
    dst = tmp_path / "dst"
    trust = {"SSL_CERT_FILE": str(tls.ca)}
    dest = f"{tls_registry.host}/tls/tiny:v1"
    r = ctl(src, "push", "-q", "tiny:v1", dest, env=trust)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest
    r = ctl(dst, "pull", "-q", dest, env=trust)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest
    registry_proc.assert_same_image(tls_registry, dst, "tls/tiny", "v1", digest)


def test_https_registry_with_an_untrusted_ca_fails_with_a_certificate_error(tls_registry, src, tmp_path):
    """No SSL_CERT_FILE: push, pull and login refuse the certificate (no fallback to plain HTTP)."""
    for r in (ctl(src, "push", "-q", "tiny:v1", f"{tls_registry.host}/untrusted/tiny:v1"),
              ctl(tmp_path / "d", "pull", f"{tls_registry.host}/tls/tiny:v1"),
              ctl(tmp_path / "d", "login", tls_registry.host, "-u", USER, "--password-stdin", input="x\n")):
        assert_clear_error(r, tls_registry.host, "certificate is not trusted", "ssl_cert_file")
    with tls_registry.client() as client:
        assert client.get("/v2/untrusted/tiny/manifests/v1", headers=MANIFEST).status_code == 404
    assert not (tmp_path / "d" / "xdg" / "clowder" / "auth.json").exists()


def test_insecure_forces_plain_http_even_to_an_https_registry(tls_registry, tls, tmp_path):
    r = ctl(tmp_path / "d", "pull", "--insecure", f"{tls_registry.host}/tls/tiny:v1", env={"SSL_CERT_FILE": str(tls.ca)})
    assert_clear_error(r, f"http://{tls_registry.host}/v2/", "400 bad request")
    assert "400 400" not in r.stderr


def test_push_and_pull_over_https_to_a_clowder_storage_node_with_a_token(tmp_path_factory, tls, built, src, tmp_path):
    _, digest = built
    secret = "tls-token-secret"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "ci"\nsecret_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
                      'repositories = ["**"]\naccess = "write"\n')
    node = start_storage_node(tmp_path_factory, {"tls_cert": str(tls.cert), "tls_key": str(tls.key),
                                                 "tokens_file": str(tokens)})
    try:
        host = node.config["storage"]["http_listen"]
        trust = {"SSL_CERT_FILE": str(tls.ca)}
        r = ctl(src, "pull", f"{host}/tiny:v1")
        assert_clear_error(r, host, "certificate")
        r = ctl(src, "login", host, "-u", "ci", "--password-stdin", input=secret + "\n", env=trust)
        assert r.returncode == 0, r.stderr
        r = ctl(src, "push", "-q", "tiny:v1", f"{host}/models/tiny:v1", env=trust)
        assert r.returncode == 0, r.stderr
        dst = tmp_path / "dst"
        shutil.copytree(src / "xdg", dst / "xdg")
        r = ctl(dst, "pull", "-q", f"{host}/models/tiny:v1", env=trust)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == digest
    finally:
        node.stop()


def test_a_plain_http_storage_node_on_loopback_is_reached_without_a_tls_probe_in_its_log(tmp_path_factory, built,
                                                                                           src, tmp_path):
    _, digest = built
    node = start_storage_node(tmp_path_factory)  # no tokens file: open, as on a single node
    try:
        host = node.config["storage"]["http_listen"]
        r = ctl(src, "push", "-q", "tiny:v1", f"{host}/models/tiny:v1")
        assert r.returncode == 0, r.stderr
        r = ctl(tmp_path / "dst", "pull", "-q", f"{host}/models/tiny:v1")
        assert r.returncode == 0 and r.stdout.strip() == digest, r.stderr
        warnings = [rec for rec in node.log_records() if rec.get("level") in ("warning", "error")
                    and not rec["msg"].startswith("insecure = true")]  # a node of no cluster says so at start
        assert warnings == []  # a TLS ClientHello to a plain HTTP server is logged as an invalid request
    finally:
        node.stop()
