"""Errors of the lb, in one place: each is an HTTP status with OpenAI's error JSON, and a gRPC status for
the Inference service. Worker errors and middleware refusals are turned into these here."""
from __future__ import annotations

import grpc

from clowderd.middleware.base import Refused

# OpenAI's error "type" per HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
               500: "server_error", 502: "server_error", 503: "service_unavailable_error", 504: "timeout_error"}

GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
              408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
              422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              500: grpc.StatusCode.INTERNAL, 502: grpc.StatusCode.UNAVAILABLE,
              503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}

# A worker's gRPC status as the lb's HTTP status. UNAVAILABLE and NOT_FOUND (the replica went away)
# are retried on another replica when no byte has reached the caller yet.
FROM_WORKER = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 503,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def grpc_code(self) -> grpc.StatusCode:
        return GRPC_CODES.get(self.status, grpc.StatusCode.INTERNAL)

    @classmethod
    def refused(cls, refusal: Refused) -> "ApiError":
        return cls(refusal.status, f"{refusal.middleware}: {refusal.message}", code=refusal.code)

    @classmethod
    def from_worker(cls, code: grpc.StatusCode, details: str, replica: str) -> "ApiError":
        status = FROM_WORKER.get(code, 502)
        message = f"replica {replica}: {details}" if status >= 500 else details
        return cls(status, message, code=code.name.lower())
