"""gRPC services of the controller role. Every method answers UNIMPLEMENTED (naming the method)
until it is implemented: subclass the servicer here and override methods one by one."""
from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from clowder.v1 import controller_pb2, controller_pb2_grpc
from clowderd.server import unimplemented_servicer

if TYPE_CHECKING:
    from clowderd.server import Process


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the controller role's services to its server."""
    controller_pb2_grpc.add_ControllerServicer_to_server(
        unimplemented_servicer(controller_pb2_grpc.ControllerServicer, controller_pb2.DESCRIPTOR,
                               "Controller"),
        server)
    controller_pb2_grpc.add_MembershipServicer_to_server(
        unimplemented_servicer(controller_pb2_grpc.MembershipServicer, controller_pb2.DESCRIPTOR,
                               "Membership"),
        server)
