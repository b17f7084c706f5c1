"""The OCI Distribution error codes and the one place that turns them into HTTP answers.

Every failure the API reports is an OCIError: the spec's code, the HTTP status that goes with it,
a message naming what was wrong (the field, the limit, the digest) and an optional detail object.
It is rendered as ``{"errors": [{"code", "message", "detail"}]}``.
"""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

# code -> HTTP status (OCI Distribution Specification v1.1, "Error Codes").
STATUS = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOO_MANY_REQUESTS": 429,
    # Not a client error: the store could not complete the operation (disk full, I/O error).
    "UNKNOWN": 500,
}


class OCIError(Exception):
    def __init__(self, code: str, message: str, *, status: int | None = None, detail: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS[code]
        self.detail = detail
        self.headers = headers or {}


def error_response(err: OCIError) -> JSONResponse:
    body = {"errors": [{"code": err.code, "message": err.message, "detail": err.detail or {}}]}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


async def handle_oci_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OCIError)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404 (no route) and 405 (method not allowed), in the spec's error format."""
    status = getattr(exc, "status_code", 404)
    if status == 405:
        return error_response(OCIError("UNSUPPORTED", f"{request.method} is not supported on {request.url.path}",
                                        headers=dict(getattr(exc, "headers", None) or {})))
    return error_response(OCIError("NAME_UNKNOWN", f"no OCI endpoint at {request.url.path}", status=404))
