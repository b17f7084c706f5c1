"""A client of the OCI Distribution v1.1 HTTP API (CNCF distribution, Harbor, zot, Clowder).

Auth: anonymous first; on 401 it answers the WWW-Authenticate challenge: Basic with the stored
credentials, or Bearer (GET the realm with service and scope, with Basic credentials if any, and
use the token returned). Blobs are streamed from and to files, never held whole in memory:
uploads are monolithic up to MONOLITHIC_MAX and chunked (PATCH with Content-Range) above;
downloads resume a partial file with a ranged GET.

TLS: HTTPS, verified against certifi's CAs, or against the bundle SSL_CERT_FILE (or the directory
SSL_CERT_DIR) names, for a registry with a private CA. A loopback registry is reached over plain
HTTP when it answers a plain HTTP request, else over HTTPS when it answers a TLS handshake (Docker
lets localhost go without TLS too; a certificate that does not verify is still an error).
`insecure` means plain HTTP.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import ssl
from typing import BinaryIO, Callable, Iterator

import httpx

from clowderd.aimage import mediatypes as mt
from clowderd.distribution.errors import AuthError, TransferError
from clowderd.distribution.refs import is_loopback
from clowderd.errors import DigestMismatch, NotFound, StoreError
from clowderd.store.writer import BlobWriter

MANIFEST_ACCEPT = ", ".join([
    mt.OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
MONOLITHIC_MAX = 32 << 20
UPLOAD_CHUNK = 64 << 20
IO_BLOCK = 1 << 20

_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
TLS_PROBE_TIMEOUT = 3.0


def _host_port(registry: str, default: int) -> tuple[str, int]:
    if registry.startswith("["):  # [v6]:port
        host, _, rest = registry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, _, port = registry.partition(":")
    return host, int(port) if port else default


def speaks_plain_http(registry: str, timeout: float = TLS_PROBE_TIMEOUT) -> bool:
    """Whether the server at registry (HOST[:PORT], default port 80) answers a plain HTTP request.
    Tried before a TLS handshake, which a plain HTTP server would log as an invalid request. A Go
    server on a TLS port answers plain HTTP with a 400 saying so: that is not plain HTTP."""
    host, port = _host_port(registry, 80)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {registry}\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while len(head) < 1024 and (got := sock.recv(1024 - len(head))):
                head += got
    except OSError:
        return False
    return head.startswith(b"HTTP/1.") and b"HTTPS server" not in head


def speaks_tls(registry: str, timeout: float = TLS_PROBE_TIMEOUT) -> bool:
    """Whether the server at registry (HOST[:PORT], default port 443) completes a TLS handshake.
    Nothing is verified here: it only picks the scheme, and the requests that follow verify."""
    host, port = _host_port(registry, 443)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host):
            return True
    except (OSError, ValueError):  # a plain HTTP answer, refused, reset, silent: not TLS
        return False


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _file_body(f: BinaryIO, offset: int, length: int, advance: Callable[[int], None]) -> Iterator[bytes]:
    fd = f.fileno()
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(IO_BLOCK, end - offset), offset)
        if not data:
            raise TransferError(f"{f.name}: ended early while uploading")
        offset += len(data)
        advance(len(data))
        yield data


class OciClient:
    def __init__(self, registry: str, *, insecure: bool = False, credentials: tuple[str, str] | None = None):
        self.registry = registry
        self._insecure = insecure
        self._base: str | None = None
        self.credentials = credentials
        self.http = httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0), follow_redirects=True)
        self._auth: dict[str, str] = {}  # scope -> Authorization header value

    @property
    def base(self) -> str:
        """scheme://registry, the scheme picked on first use (see the module docstring)."""
        if self._base is None:
            if self._insecure:
                scheme = "http"
            elif is_loopback(self.registry):
                scheme = "http" if speaks_plain_http(self.registry) or not speaks_tls(self.registry) else "https"
            else:
                scheme = "https"
            self._base = f"{scheme}://{self.registry}"
        return self._base

    def close(self) -> None:
        self.http.close()

    def _transport_error(self, method: str, url: str, exc: httpx.HTTPError) -> TransferError:
        cert = _certificate_error(exc)
        if cert is not None:
            return TransferError(
                f"{self.registry}: the TLS certificate is not trusted ({cert.verify_message or cert.reason}); "
                "if the registry uses a private CA, point SSL_CERT_FILE at a PEM bundle that holds it")
        return TransferError(f"{method} {url}: {exc}")

    def _broken_transfer(self, exc: httpx.HTTPError, what: str, digest: str, done: int, total: int | None,
                         again: str) -> TransferError:
        """A transfer of a blob that a transport failure (refused, reset, closed mid-body, timed out)
        broke off after `done` bytes: says where, what, how far it got, and what to do."""
        if _certificate_error(exc) is not None:
            return self._transport_error("", "", exc)
        of = f" of {total:,}" if total is not None else ""
        why = str(exc) or type(exc).__name__
        return TransferError(f"{self.registry}: {what} of blob {digest} broke off after {done:,}{of} bytes "
                             f"({why}); {again}")

    # -- requests and auth ---------------------------------------------------------------------
    def _request(self, method: str, url: str, scope: str, *, ok=(200,), headers=None, replayable=True,
                 broken: Callable[[httpx.HTTPError], TransferError] | None = None, **kw) -> httpx.Response:
        """One request (answering an auth challenge once); a transport failure becomes a
        TransferError: broken(exc) where given, else one that names the method and URL."""
        url = url if url.startswith("http") else self.base + url
        headers = dict(headers or {})
        for attempt in (0, 1):
            if scope in self._auth:
                headers["Authorization"] = self._auth[scope]
            try:
                r = self.http.request(method, url, headers=headers, **kw)
            except httpx.HTTPError as exc:
                raise (broken(exc) if broken else self._transport_error(method, url, exc)) from None
            if r.status_code == 401 and attempt == 0 and replayable:
                self._authenticate(r, scope)
                continue
            break
        if r.status_code == 401:
            if self.credentials and headers.get("Authorization", "").startswith("Basic "):
                raise AuthError(f"{self.registry} refused the credentials of user {self.credentials[0]!r} "
                                f"({self._why(r)}); check them with 'clowderctl login {self.registry}'")
            raise AuthError(f"{self.registry}: {self._why(r)}; log in with 'clowderctl login {self.registry}'")
        if r.status_code not in ok:
            raise self._error(method, url, r)
        return r

    def _why(self, r: httpx.Response) -> str:
        try:
            errors = r.json().get("errors") or []
            return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors) or r.reason_phrase
        except ValueError:
            return r.reason_phrase

    def _error(self, method: str, url: str, r: httpx.Response) -> Exception:
        msg = f"{method} {url}: {r.status_code} {self._why(r)}"
        return NotFound(msg) if r.status_code == 404 else TransferError(msg)

    def _authenticate(self, r: httpx.Response, scope: str) -> None:
        challenge = r.headers.get("www-authenticate", "")
        kind = challenge.split(" ", 1)[0].lower()
        if kind == "basic":
            if not self.credentials:
                raise AuthError(f"{self.registry} requires a login: clowderctl login {self.registry}")
            user, password = self.credentials
            self._auth[scope] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        elif kind == "bearer":
            params = dict(_CHALLENGE.findall(challenge))
            realm = params.pop("realm", None)
            if not realm:
                raise AuthError(f"{self.registry}: Bearer challenge without a realm: {challenge!r}")
            query = {"service": params.get("service", "")}
            if scope:
                query["scope"] = params.get("scope", scope)
            auth = httpx.BasicAuth(*self.credentials) if self.credentials else None
            try:
                t = self.http.get(realm, params=query, auth=auth)
            except httpx.HTTPError as exc:
                raise AuthError(f"{self.registry}: token service {realm}: {exc}") from None
            if t.status_code != 200:
                raise AuthError(f"{self.registry}: token service {realm} refused ({t.status_code}); "
                                f"check the credentials with 'clowderctl login {self.registry}'")
            try:
                body = t.json()
            except ValueError:
                kind = t.headers.get("content-type", "no content type")
                raise AuthError(f"{self.registry}: token service {realm} answered with {kind}, not a JSON token "
                                f"(it begins {t.content[:60]!r})") from None
            token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
            if not token or not isinstance(token, str):
                raise AuthError(f"{self.registry}: token service {realm} returned no token")
            self._auth[scope] = f"Bearer {token}"
        else:
            raise AuthError(f"{self.registry}: unsupported authentication challenge {challenge!r}")

    @staticmethod
    def _scope(repo: str, push: bool = False) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    # -- API -----------------------------------------------------------------------------------
    def ping(self) -> None:
        """GET /v2/, authenticating if asked: checks the registry speaks the API and the login works."""
        self._request("GET", "/v2/", "")

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(content, media type, digest) of a manifest by tag or digest; the digest is checked."""
        r = self._request("GET", f"/v2/{repo}/manifests/{reference}", self._scope(repo),
                          headers={"Accept": MANIFEST_ACCEPT})
        content = r.content
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        expected = reference if reference.startswith("sha256:") else r.headers.get("docker-content-digest")
        if expected and expected != digest:
            raise DigestMismatch(f"{self.registry}/{repo}@{reference}: manifest has digest {digest}, expected {expected}")
        return content, r.headers.get("content-type", "").split(";")[0], digest

    def put_manifest(self, repo: str, reference: str, content: bytes, media_type: str) -> str:
        r = self._request("PUT", f"/v2/{repo}/manifests/{reference}", self._scope(repo, True), ok=(201,),
                          content=content, headers={"Content-Type": media_type})
        return r.headers.get("docker-content-digest", "")

    def has_blob(self, repo: str, digest: str, push: bool = False) -> bool:
        r = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", self._scope(repo, push), ok=(200, 404))
        return r.status_code == 200

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; True when the registry mounted it (201)."""
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/", f"{self._scope(repo, True)} {self._scope(from_repo)}",
                          ok=(201, 202), params={"mount": digest, "from": from_repo})
        if r.status_code == 202:  # not mounted: drop the session it opened
            self._request("DELETE", str(r.url.join(r.headers["location"])), self._scope(repo, True),
                          ok=(200, 202, 204, 404))
        return r.status_code == 201

    def upload_blob(self, repo: str, digest: str, f: BinaryIO, size: int, advance: Callable[[int], None]) -> None:
        """Upload size bytes of file f as blob digest: one PUT up to MONOLITHIC_MAX, else PATCHes."""
        scope = self._scope(repo, True)
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/", scope, ok=(202,))
        location = r.url.join(r.headers["location"])
        sent = [0]

        def sending(n: int) -> None:
            sent[0] += n
            advance(n)

        def broken(exc: httpx.HTTPError) -> TransferError:
            return self._broken_transfer(exc, "upload", digest, sent[0], size,
                                         "run the same push again (blobs the registry has by then are skipped)")

        offset = 0
        if size > MONOLITHIC_MAX:
            while offset < size:
                n = min(UPLOAD_CHUNK, size - offset)
                r = self._request("PATCH", str(location), scope, ok=(202,), replayable=False, broken=broken,
                                  content=_file_body(f, offset, n, sending),
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Range": f"{offset}-{offset + n - 1}", "Content-Length": str(n)})
                location = r.url.join(r.headers["location"])
                offset += n
        put_url = location.copy_merge_params({"digest": digest})
        self._request("PUT", str(put_url), scope, ok=(201,), replayable=False, broken=broken,
                      content=_file_body(f, offset, size - offset, sending),
                      headers={"Content-Type": "application/octet-stream", "Content-Length": str(size - offset)})

    def download_blob(self, repo: str, digest: str, sink: BlobWriter, size: int | None,
                      advance: Callable[[int], None]) -> None:
        """Download blob digest (of size bytes, where the manifest says) into sink, a store ingest
        written in order, continuing what an earlier try left there. The digest is the caller's
        to check: the store checks it as it takes the file in, in the same pass that cuts its
        chunks, so hashing here too would read every byte twice.

        A transport failure, before or in the middle of the body, is a TransferError, and sink
        keeps every byte that arrived, so the next call resumes from there. A failure to write
        them (a full disk) is a StoreError naming the registry, the blob and the store; sink then
        keeps its bytes only where a later pull can resume from them (the registry serves byte
        ranges), and is emptied otherwise, so as not to leave the disk full for nothing. A body
        longer than size is refused and emptied as well: the store's free-space check counted
        size bytes."""
        have = sink.offset
        if size is not None and have > size:
            sink.truncate(0)
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        url = f"{self.base}/v2/{repo}/blobs/{digest}"
        scope = self._scope(repo)
        total: int | None = size
        resumable = False  # whether the registry serves the byte ranges a resume asks for

        def broken(exc: httpx.HTTPError) -> TransferError:
            again = (f"the {have:,} bytes that arrived are kept: run the same pull again to resume" if have
                     else "run the same pull again to retry")
            return self._broken_transfer(exc, "download", digest, have, total, again)

        def store(data) -> None:
            nonlocal have
            try:
                sink.write_at(have, data)
            except StoreError as exc:
                written = sink.offset
                if written and resumable:
                    then = f"the {written:,} bytes written are kept for the next pull to resume from"
                else:
                    sink.truncate(0)
                    then = "nothing of it was kept" + ("" if resumable else
                                                       " (the registry does not serve byte ranges: a pull starts over)")
                of = f" of {total:,}" if total is not None else ""
                raise StoreError(f"{self.registry}: download of blob {digest} stopped after {written:,}{of} bytes: "
                                 f"{exc}; {then}") from None
            have += len(data)

        self._request("HEAD", url, scope, broken=broken)  # authenticate before the streamed GET
        if scope in self._auth:
            headers["Authorization"] = self._auth[scope]
        try:
            with self.http.stream("GET", url, headers=headers) as r:
                if r.status_code == 416 and have:  # already complete
                    return
                if r.status_code not in (200, 206):
                    r.read()
                    raise self._error("GET", url, r)
                if r.status_code == 200 and have:  # the server ignored the range: start over
                    sink.truncate(0)
                    have = 0
                total = _content_total(r) or size
                resumable = r.status_code == 206 or r.headers.get("accept-ranges", "").lower() == "bytes"
                # Blocks as they come off the socket (iter_raw with a chunk size would hold back up to
                # that much on a failure), gathered into IO_BLOCK writes.
                pending = bytearray()
                try:
                    for block in r.iter_raw():
                        if size is not None and have + len(pending) + len(block) > size:
                            sink.truncate(0)
                            raise TransferError(f"{self.registry}: blob {digest} is longer than the {size:,} bytes "
                                                "its manifest gives it; nothing of it was kept")
                        pending += block
                        advance(len(block))
                        if len(pending) >= IO_BLOCK:
                            store(pending)
                            pending.clear()
                except httpx.HTTPError:
                    store(pending)  # every byte that arrived is kept
                    raise
                store(pending)
        except httpx.HTTPError as exc:
            raise broken(exc) from None

def _content_total(r: httpx.Response) -> int | None:
    """The whole blob's size by a 200's Content-Length or a 206's Content-Range, if given."""
    try:
        if r.status_code == 206:
            total = r.headers.get("content-range", "").rpartition("/")[2]
            return int(total) if total != "*" else None
        return int(r.headers["content-length"])
    except (KeyError, ValueError):
        return None
