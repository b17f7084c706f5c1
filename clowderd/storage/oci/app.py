"""The OCI Distribution Specification v1.1 HTTP API of the storage role, over the content store.

One handler per endpoint (end-1..end-13 of the spec); each parses its own request, checks the
repository name and the caller's access, and answers or raises OCIError (errors.py renders it).
Store calls that touch the disk or hash run in threads; the store gives each thread its own
index connection.

A blob's bytes are sent as read against its chunk index (clowderd.store.verify), whole or ranged: a
chunk that does not check out ends the response before its bytes, so the client gets fewer bytes than
Content-Length and a closed connection, never a complete-looking corrupt body; the store quarantines
the blob and logs it, and from then on the blob is BLOB_UNKNOWN here, saying why, until a push of it
repairs it. A manifest is checked against its digest when it is read, and is MANIFEST_UNKNOWN once
found corrupt.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from clowderd.errors import NotFound, Quarantined, StoreError
from clowderd.store.images import ImageIndex
from clowderd.store.protocols import Provider
from clowderd.store.verify import BlobBytes
from clowderd.storage.oci import manifests as mf
from clowderd.storage.oci.auth import Authorizer
from clowderd.storage.oci.errors import OCIError, error_response, handle_http_exception, handle_oci_error
from clowderd.storage.oci.names import check_digest, check_repository, check_tag, is_digest_reference, is_repository
from clowderd.storage.oci.uploads import UploadSessions, range_header

log = logging.getLogger("clowderd.storage.oci")

API_VERSION_HEADERS = [(b"docker-distribution-api-version", b"registry/2.0")]
MAX_PAGE = 10_000
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


@dataclass
class Registry:
    store: Provider
    index: ImageIndex
    sessions: UploadSessions
    auth: Authorizer


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _repository(request: Request, action: str) -> str:
    """The request's repository name, checked, with the caller allowed to do action on it."""
    name = check_repository(request.path_params["name"])
    _registry(request).auth.check(request.headers.get("authorization"), name, action)
    return name


def _page_size(request: Request) -> int | None:
    value = request.query_params.get("n")
    if value is None:
        return None
    if not value.isdigit() or int(value) > MAX_PAGE:
        raise OCIError("SIZE_INVALID", f"n: expected a page size from 0 to {MAX_PAGE}, got {value!r}",
                       detail={"n": value})
    return int(value)


def _paginate(items: list[str], request: Request, path: str) -> tuple[list[str], dict[str, str]]:
    """Items after ?last=, at most ?n= of them, and a Link header to the next page if any remain."""
    n = _page_size(request)
    last = request.query_params.get("last")
    if last is not None:
        items = [i for i in items if i > last]
    if n is None or len(items) <= n:
        return items, {}
    page = items[:n]
    query = urlencode({"n": n, "last": page[-1]}) if page else urlencode({"n": n})
    return page, {"Link": f'<{path}?{query}>; rel="next"'}


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _upload_headers(name: str, session_id: str, size: int) -> dict[str, str]:
    return {"Location": f"/v2/{name}/blobs/uploads/{session_id}", "Range": range_header(size),
            "Docker-Upload-UUID": session_id}


def _blob_created(name: str, digest: str) -> Response:
    return Response(status_code=201, headers={"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest})


# -- end-1: API version check ---------------------------------------------------------------------

async def ping(request: Request) -> Response:
    _registry(request).auth.check_ping(request.headers.get("authorization"))
    return JSONResponse({})


# -- end-2: blobs --------------------------------------------------------------------------------

def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (start, end) a Range header asks for; None without one; 416 when it cannot be met."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip())
    unsatisfiable = OCIError("SIZE_INVALID", f"Range {header!r} cannot be served from a blob of {size} bytes "
                             "(one range: bytes=START-END, bytes=START- or bytes=-SUFFIX)", status=416,
                             headers={"Content-Range": f"bytes */{size}"})
    if not m or m.group(1) == m.group(2) == "":
        raise unsatisfiable
    first, last = m.group(1), m.group(2)
    if first == "":
        start, end = max(size - int(last), 0), size - 1
        if int(last) == 0:
            raise unsatisfiable
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            raise unsatisfiable
    if start >= size:
        raise unsatisfiable
    return start, end


class CheckedBlobResponse(StreamingResponse):
    """Bytes start..end of a blob, sent a run of whole chunks at a time as they are read and checked,
    the next run read in a worker thread while this one is sent. A run that does not check out ends
    the response without its last message: the server closes the connection short of Content-Length
    (uvicorn logs that the response was not completed; the store has logged the blob)."""

    def __init__(self, blob: BlobBytes, start: int, end: int, status_code: int, headers: dict[str, str]):
        super().__init__(_checked_pieces(blob, start, end), status_code=status_code, headers=headers)

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for piece in self.body_iterator:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        except Quarantined:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _checked_pieces(blob: BlobBytes, start: int, end: int) -> AsyncIterator[memoryview]:
    loop = asyncio.get_running_loop()
    runs = blob.runs(start, end + 1)
    ahead = None
    try:
        for k, (i, j) in enumerate(runs):
            data = await (ahead or loop.run_in_executor(None, blob.read, i, j))
            ahead = loop.run_in_executor(None, blob.read, *runs[k + 1]) if k + 1 < len(runs) else None
            first = blob.chunks[i][0]  # the run holds whole chunks: cut it to the range asked for
            # A view, not bytes: the transport keeps what the socket does not take at once without
            # first copying it out of a bytes slice.
            yield memoryview(data)[max(start - first, 0) : end + 1 - first]
    finally:
        if ahead is not None:  # the client went away, or this run was corrupt: drop the next one
            ahead.cancel()


async def get_blob(request: Request) -> Response:
    name = _repository(request, "read")
    digest = check_digest(request.path_params["digest"])
    reg = _registry(request)
    unknown = OCIError("BLOB_UNKNOWN", f"blob {digest} is not in repository {name}", detail={"digest": digest})
    if not await asyncio.to_thread(reg.index.repository_references_blob, name, digest):
        raise unknown
    try:
        blob = await asyncio.to_thread(BlobBytes, reg.store, digest, "oci-get") if request.method == "GET" else None
        info = blob.info if blob else await asyncio.to_thread(reg.store.info, digest)
    except Quarantined as exc:
        raise OCIError("BLOB_UNKNOWN", str(exc), detail={"digest": digest, "quarantined": True}) from None
    except NotFound:
        raise unknown from None
    headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
               "ETag": f'"{digest}"', "Cache-Control": "max-age=31536000, immutable"}
    if blob is None:
        return Response(headers={**headers, "Content-Length": str(info.size)})
    wanted = _parse_range(request.headers.get("range"), info.size)
    start, end = wanted or (0, info.size - 1)
    headers["Content-Length"] = str(end - start + 1)
    if wanted:
        headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
    return CheckedBlobResponse(blob, start, end, status_code=206 if wanted else 200, headers=headers)


async def delete_blob(request: Request) -> Response:
    name = _repository(request, "write")
    digest = check_digest(request.path_params["digest"])
    if not await asyncio.to_thread(_registry(request).index.unlink_blob, name, digest):
        raise OCIError("BLOB_UNKNOWN", f"blob {digest} was not pushed or mounted into repository {name}",
                       detail={"digest": digest})
    return Response(status_code=202)


# -- end-3..end-6, end-11, end-13: uploads --------------------------------------------------------

async def start_upload(request: Request) -> Response:
    name = _repository(request, "write")
    reg = _registry(request)
    query = request.query_params
    if "mount" in query:
        digest = check_digest(query["mount"])
        source = query.get("from")
        if (source and is_repository(source) and reg.auth.can_read(request.headers.get("authorization"), source)
                and await asyncio.to_thread(reg.index.repository_has_blob, source, digest)):
            await asyncio.to_thread(reg.index.link_blob, name, digest)
            return _blob_created(name, digest)
    elif "digest" in query:
        digest = check_digest(query["digest"])
        session = reg.sessions.start(name)
        try:
            await reg.sessions.append(session, request.stream(), None, _content_length(request))
        except BaseException:
            reg.sessions.discard(session)
            raise
        await reg.sessions.finish(session, digest)
        await asyncio.to_thread(reg.index.link_blob, name, digest)
        return _blob_created(name, digest)
    session = reg.sessions.start(name)
    return Response(status_code=202, headers=_upload_headers(name, session.id, 0))


def _chunk_range(request: Request) -> tuple[int | None, int | None]:
    """(start, length) of a chunk from Content-Range / Content-Length; None where not given."""
    length = _content_length(request)
    header = request.headers.get("content-range")
    if header is None:
        return None, length
    m = _CONTENT_RANGE.fullmatch(header.strip())
    if not m or int(m.group(2)) < int(m.group(1)):
        raise OCIError("BLOB_UPLOAD_INVALID", f"Content-Range {header!r} is not START-END with START <= END",
                       status=416)
    start, end = int(m.group(1)), int(m.group(2))
    if length is not None and length != end - start + 1:
        raise OCIError("SIZE_INVALID", f"Content-Range {header!r} is {end - start + 1} bytes, Content-Length is {length}",
                       detail={"content_range": header, "content_length": length})
    return start, end - start + 1


async def upload_chunk(request: Request) -> Response:
    name = _repository(request, "write")
    reg = _registry(request)
    session = reg.sessions.get(name, request.path_params["uuid"])
    start, length = _chunk_range(request)
    async with session.lock:
        try:
            await reg.sessions.append(session, request.stream(), start, length)
        except OCIError as exc:
            if exc.status == 416:
                exc.headers["Location"] = f"/v2/{name}/blobs/uploads/{session.id}"
            raise
    return Response(status_code=202, headers=_upload_headers(name, session.id, session.size))


async def finish_upload(request: Request) -> Response:
    name = _repository(request, "write")
    reg = _registry(request)
    session = reg.sessions.get(name, request.path_params["uuid"])
    if "digest" not in request.query_params:
        raise OCIError("DIGEST_INVALID", "the request that completes an upload needs ?digest=sha256:...")
    digest = check_digest(request.query_params["digest"])
    start, length = _chunk_range(request)
    async with session.lock:
        await reg.sessions.append(session, request.stream(), start, length)
        await reg.sessions.finish(session, digest)
    await asyncio.to_thread(reg.index.link_blob, name, digest)
    return _blob_created(name, digest)


async def upload_status(request: Request) -> Response:
    name = _repository(request, "write")
    session = _registry(request).sessions.get(name, request.path_params["uuid"])
    return Response(status_code=204, headers=_upload_headers(name, session.id, session.size))


async def cancel_upload(request: Request) -> Response:
    name = _repository(request, "write")
    reg = _registry(request)
    session = reg.sessions.get(name, request.path_params["uuid"])
    async with session.lock:
        reg.sessions.discard(session)
    return Response(status_code=204)


# -- end-3, end-7, end-9: manifests -------------------------------------------------------------

async def _find_manifest(reg: Registry, name: str, reference: str) -> tuple[str, str | None]:
    if is_digest_reference(reference):
        check_digest(reference)
    else:
        check_tag(reference, code="MANIFEST_UNKNOWN")
    found = await asyncio.to_thread(reg.index.repository_manifest, name, reference)
    if found is None:
        raise OCIError("MANIFEST_UNKNOWN", f"manifest {reference} is not in repository {name}",
                       detail={"name": name, "reference": reference})
    return found


async def get_manifest(request: Request) -> Response:
    name = _repository(request, "read")
    reg = _registry(request)
    digest, media_type = await _find_manifest(reg, name, request.path_params["reference"])
    try:
        body = await asyncio.to_thread(reg.store.read_bytes, digest)
    except Quarantined as exc:
        raise OCIError("MANIFEST_UNKNOWN", str(exc), detail={"name": name, "digest": digest, "quarantined": True}) \
            from None
    return Response(body, headers={"Docker-Content-Digest": digest, "Content-Type": media_type or mf.media_type_of(body),
                                   "ETag": f'"{digest}"'})


async def _read_manifest_body(request: Request) -> bytes:
    too_large = OCIError("SIZE_INVALID", f"manifest is larger than the limit of {mf.MAX_MANIFEST_BYTES} bytes",
                         status=413, detail={"limit": mf.MAX_MANIFEST_BYTES})
    declared = _content_length(request)
    if declared is not None and declared > mf.MAX_MANIFEST_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > mf.MAX_MANIFEST_BYTES:
            raise too_large
    return bytes(body)


async def put_manifest(request: Request) -> Response:
    name = _repository(request, "write")
    reg = _registry(request)
    reference = request.path_params["reference"]
    tag = None
    if is_digest_reference(reference):
        check_digest(reference)
    else:
        tag = check_tag(reference)
    body = await _read_manifest_body(request)
    parsed = mf.parse_manifest(body, request.headers.get("content-type"))
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if tag is None and reference != digest:
        raise OCIError("DIGEST_INVALID", f"manifest has digest {digest}, the URL says {reference}",
                       detail={"digest": reference})
    missing = await asyncio.to_thread(reg.index.missing_from_repository, name, parsed.blobs, parsed.children)
    if missing:
        raise OCIError("MANIFEST_BLOB_UNKNOWN", f"manifest references {len(missing)} blob(s) or manifest(s) not in "
                       f"repository {name}: {', '.join(missing)}", detail={"digests": missing})
    await asyncio.to_thread(reg.index.add_repository_manifest, name, body, parsed.media_type, parsed.artifact_type,
                            parsed.blobs, parsed.children, parsed.subject, tag)
    headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest}
    if parsed.subject:
        headers["OCI-Subject"] = parsed.subject
    return Response(status_code=201, headers=headers)


async def delete_manifest(request: Request) -> Response:
    name = _repository(request, "write")
    reg = _registry(request)
    reference = request.path_params["reference"]
    if is_digest_reference(reference):
        check_digest(reference)
        deleted = await asyncio.to_thread(reg.index.delete_repository_manifest, name, reference)
    else:
        check_tag(reference, code="MANIFEST_UNKNOWN")
        deleted = await asyncio.to_thread(reg.index.delete_repository_tag, name, reference)
    if not deleted:
        raise OCIError("MANIFEST_UNKNOWN", f"manifest {reference} is not in repository {name}",
                       detail={"name": name, "reference": reference})
    return Response(status_code=202)


# -- end-8: tags, end-12: referrers, catalog ----------------------------------------------------

async def list_tags(request: Request) -> Response:
    name = _repository(request, "read")
    index = _registry(request).index
    tags = await asyncio.to_thread(index.repository_tags, name)
    if not tags and name not in await asyncio.to_thread(index.repositories):
        raise OCIError("NAME_UNKNOWN", f"repository {name} is not known to this registry", detail={"name": name})
    page, headers = _paginate(tags, request, f"/v2/{quote(name)}/tags/list")
    return JSONResponse({"name": name, "tags": page}, headers=headers)


async def list_referrers(request: Request) -> Response:
    name = _repository(request, "read")
    reg = _registry(request)
    subject = check_digest(request.path_params["digest"])
    wanted = request.query_params.get("artifactType")
    descriptors = []
    for digest, media_type, artifact_type in await asyncio.to_thread(reg.index.referrers, name, subject):
        if wanted is not None and artifact_type != wanted:
            continue
        try:
            body = await asyncio.to_thread(reg.store.read_bytes, digest)
        except Quarantined:
            continue  # logged when it was found; it is listed again once a push repairs it
        descriptor = {"mediaType": media_type, "digest": digest, "size": len(body)}
        if artifact_type:
            descriptor["artifactType"] = artifact_type
        annotations = mf.annotations_of(body)
        if annotations:
            descriptor["annotations"] = annotations
        descriptors.append(descriptor)
    headers = {"OCI-Filters-Applied": "artifactType"} if wanted is not None else {}
    return JSONResponse({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": descriptors},
                        media_type=mf.OCI_INDEX, headers=headers)


async def catalog(request: Request) -> Response:
    reg = _registry(request)
    authorization = request.headers.get("authorization")
    if reg.auth.enabled:
        reg.auth.identify(authorization)  # wrong credentials get 401, not a silently empty list
    names = [n for n in await asyncio.to_thread(reg.index.repositories)
             if is_repository(n) and reg.auth.can_read(authorization, n)]
    page, headers = _paginate(names, request, "/v2/_catalog")
    return JSONResponse({"repositories": page}, headers=headers)


class _APIVersionHeader:
    """Adds Docker-Distribution-API-Version to every answer, errors included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *API_VERSION_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_header if scope["type"] == "http" else send)


async def _handle_store_error(request: Request, exc: Exception) -> Response:
    log.error("store error", extra={"path": request.url.path, "error": str(exc)})
    return error_response(OCIError("UNKNOWN", str(exc)))


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error", extra={"path": request.url.path})
    return error_response(OCIError("UNKNOWN", f"internal error: {type(exc).__name__}"))


def create_app(registry: Registry) -> Starlette:
    n = "/v2/{name:path}"
    routes = [
        Route("/v2/", ping, methods=["GET"]),
        Route("/v2/_catalog", catalog, methods=["GET"]),
        Route(n + "/tags/list", list_tags, methods=["GET"]),
        Route(n + "/referrers/{digest}", list_referrers, methods=["GET"]),
        Route(n + "/manifests/{reference}", get_manifest, methods=["GET", "HEAD"]),
        Route(n + "/manifests/{reference}", put_manifest, methods=["PUT"]),
        Route(n + "/manifests/{reference}", delete_manifest, methods=["DELETE"]),
        Route(n + "/blobs/uploads/", start_upload, methods=["POST"]),
        Route(n + "/blobs/uploads", start_upload, methods=["POST"]),
        Route(n + "/blobs/uploads/{uuid}", upload_chunk, methods=["PATCH"]),
        Route(n + "/blobs/uploads/{uuid}", finish_upload, methods=["PUT"]),
        Route(n + "/blobs/uploads/{uuid}", upload_status, methods=["GET"]),
        Route(n + "/blobs/uploads/{uuid}", cancel_upload, methods=["DELETE"]),
        Route(n + "/blobs/{digest}", get_blob, methods=["GET", "HEAD"]),
        Route(n + "/blobs/{digest}", delete_blob, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_APIVersionHeader)], exception_handlers={
        OCIError: handle_oci_error, HTTPException: handle_http_exception,
        StoreError: _handle_store_error, Exception: _handle_unexpected,
    })
    app.router.redirect_slashes = False
    app.state.registry = registry
    return app
