"""The controller's errors as gRPC status codes; the message is the error's own."""
from __future__ import annotations

import grpc

from clowderd.controller.images import StorageUnavailable
from clowderd.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from clowderd.server import StatusCodes

STATUS_CODES = StatusCodes(
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Conflict, grpc.StatusCode.ABORTED),
    (StorageUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
)
HANDLED, status_code = STATUS_CODES.handled, STATUS_CODES.code
