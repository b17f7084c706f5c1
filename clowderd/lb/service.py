"""gRPC services of the lb role. Every method answers UNIMPLEMENTED (naming the method)
until it is implemented: subclass the servicer here and override methods one by one."""
from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from clowder.v1 import inference_pb2, inference_pb2_grpc
from clowderd.server import unimplemented_servicer

if TYPE_CHECKING:
    from clowderd.server import Process


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the lb role's services to its server."""
    inference_pb2_grpc.add_InferenceServicer_to_server(
        unimplemented_servicer(inference_pb2_grpc.InferenceServicer, inference_pb2.DESCRIPTOR,
                               "Inference"),
        server)
