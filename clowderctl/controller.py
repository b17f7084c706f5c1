"""Calling the controller's admin API (clowder.v1.Controller) from clowderctl.

The address comes from --controller, else $CLOWDER_CONTROLLER, else 127.0.0.1:7070; the admin token
from --token, else $CLOWDER_TOKEN, else the controller's own file DATA_DIR/controller/admin-token (on
the controller's node, as the user clowderd runs as). gRPC errors become one-line messages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import click
import grpc

from clowder.v1 import controller_pb2_grpc
from clowderctl.context import StoreContext
from clowderd.config import ADMIN_TOKEN_FILE, parse_address
from clowderd.errors import ClowderError, InvalidInput, NotFound

DEFAULT_CONTROLLER = "127.0.0.1:7070"
CALL_TIMEOUT_S = 30.0


def controller_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--controller and --token, which every command of the admin API takes."""
    command = click.option("--token", envvar="CLOWDER_TOKEN", metavar="TOKEN",
                           help="The admin token (also $CLOWDER_TOKEN) [default: the file "
                                "DATA_DIR/controller/admin-token].")(command)
    return click.option("--controller", envvar="CLOWDER_CONTROLLER", default=DEFAULT_CONTROLLER, show_default=True,
                        metavar="HOST:PORT", help="The controller's address (also $CLOWDER_CONTROLLER).")(command)


class ControllerClient:
    def __init__(self, address: str, token: str):
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._stub = controller_pb2_grpc.ControllerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        try:
            yield from getattr(self._stub, method)(request, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def pages(self, method: str, request: Any, field: str) -> Iterator[Any]:
        """Every item of a paged list."""
        while True:
            response = self.call(method, request)
            yield from getattr(response, field)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def _error(self, error: grpc.RpcError) -> ClowderError:
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            return ClowderError(f"cannot reach the controller at {self.address} ({details}); give its address with "
                                "--controller or $CLOWDER_CONTROLLER")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ClowderError(f"the controller at {self.address} refused the admin token: {details}")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(details)
        return ClowderError(f"the controller at {self.address} answered {code.name}: {details}")

    def close(self) -> None:
        self._channel.close()


def _local_admin_token(data_dir: Path) -> str:
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise ClowderError(f"no admin token: give --token or $CLOWDER_TOKEN ({path} does not exist; on the "
                           "controller's node it is DATA_DIR/controller/admin-token)") from None
    except PermissionError:
        raise ClowderError(f"cannot read {path}: permission denied; run as the user clowderd runs as, or give "
                           "--token") from None


def connect(controller: str, token: str | None) -> ControllerClient:
    """A client for the current command, closed when it ends."""
    ctx = click.get_current_context()
    address = str(parse_address(controller, "--controller", allow_port_zero=False))
    client = ControllerClient(address, token or _local_admin_token(ctx.find_object(StoreContext).data_dir))
    ctx.call_on_close(client.close)
    return client
