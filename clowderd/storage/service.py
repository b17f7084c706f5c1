"""gRPC services of the storage role. Every method answers UNIMPLEMENTED (naming the method)
until it is implemented: subclass the servicer here and override methods one by one."""
from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from clowder.v1 import registry_pb2, registry_pb2_grpc
from clowderd.server import unimplemented_servicer

if TYPE_CHECKING:
    from clowderd.server import Process


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the storage role's services to its server."""
    registry_pb2_grpc.add_RegistryServicer_to_server(
        unimplemented_servicer(registry_pb2_grpc.RegistryServicer, registry_pb2.DESCRIPTOR,
                               "Registry"),
        server)
