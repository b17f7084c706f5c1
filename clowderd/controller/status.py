"""The controller's errors as gRPC status codes; the message is the error's own."""
from __future__ import annotations

import grpc

from clowderd.controller.images import StorageUnavailable
from clowderd.errors import AlreadyExists, Conflict, InvalidInput, NotFound

STATUS_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Conflict, grpc.StatusCode.ABORTED),
    (StorageUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
)
HANDLED = tuple(cls for cls, _ in STATUS_CODES)


def status_code(error: Exception) -> grpc.StatusCode:
    return next(code for cls, code in STATUS_CODES if isinstance(error, cls))
