"""gRPC services of the worker role. Every method answers UNIMPLEMENTED (naming the method)
until it is implemented: subclass the servicer here and override methods one by one."""
from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from clowder.v1 import worker_pb2, worker_pb2_grpc
from clowderd.server import unimplemented_servicer

if TYPE_CHECKING:
    from clowderd.server import Process


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the worker role's services to its server."""
    worker_pb2_grpc.add_WorkerServicer_to_server(
        unimplemented_servicer(worker_pb2_grpc.WorkerServicer, worker_pb2.DESCRIPTOR, "Worker"),
        server)
